"""Evaluate a trained detector: checkpoint -> COCO metrics (mmdetection's ``tools/test.py``).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out results.pkl]
    python tools/test.py CONFIG MODEL.onnx            # the exported model, in onnxruntime
    python tools/test.py CONFIG MODEL.onnx --backend openvino

An ``.onnx`` file (written by ``tools/deploy/export_onnx.py``) is evaluated in onnxruntime or
OpenVINO through ``dcn_plugin.models.deploy.ONNXRuntimeDetector`` / ``OpenVINODetector``, with the
config's data pipeline, preprocessor and metric, so its metrics compare directly with the PyTorch
model's.
"""

from __future__ import annotations

import argparse
import os.path as osp

from mmengine.runner import Runner

from dcn_plugin.engine import add_run_arguments, load_config, mmengine_safe_loading, shutdown_distributed

# Runtimes for an exported .onnx file -> the model that runs it.
EXPORTED_BACKENDS = {"onnxruntime": "dcn_plugin.ONNXRuntimeDetector",
                     "openvino": "dcn_plugin.OpenVINODetector"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Test (and evaluate) a detector")
    parser.add_argument("config", help="test config file path")
    parser.add_argument("checkpoint", help="checkpoint file (.pth), or an exported ONNX model (.onnx)")
    parser.add_argument("--backend", choices=["pytorch", *EXPORTED_BACKENDS],
                        help="how to run the model (default: onnxruntime for a .onnx file, else pytorch)")
    parser.add_argument("--out", help="dump the predictions to this pickle file")
    add_run_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f"checkpoint: no such file {args.checkpoint!r}")
    cfg = load_config(args)
    backend = args.backend or ("onnxruntime" if args.checkpoint.endswith(".onnx") else "pytorch")
    if backend in EXPORTED_BACKENDS:
        cfg.model = dict(type=EXPORTED_BACKENDS[backend], onnx_file=args.checkpoint,
                         data_preprocessor=cfg.model.get("data_preprocessor"))
    else:
        cfg.load_from = args.checkpoint
    runner = Runner.from_cfg(cfg)
    if args.out is not None:
        if not args.out.endswith((".pkl", ".pickle")):
            raise ValueError(f"--out: the output file must be a .pkl file, got {args.out!r}")
        runner.test_evaluator.metrics.append(_dump_metric(args.out))
    with mmengine_safe_loading():
        metrics = runner.test()
    shutdown_distributed()
    return metrics


def _dump_metric(path: str):
    from mmengine.evaluator import DumpResults

    return DumpResults(out_file_path=path)


if __name__ == "__main__":
    main()
