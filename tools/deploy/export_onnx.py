"""Export a trained detector to ONNX (standard ops only: DeformConv, NonMaxSuppression, ...) and check it.

    python tools/deploy/export_onnx.py CONFIG CHECKPOINT --out FILE [--opset N] [--dynamic-batch]
        [--dynamic-shape] [--check] [--num-images N] [--batch-size N] [--threads N]

The graph runs from the data preprocessor's output to the final detections (backbone, neck, head,
decoding, clipping, rescaling and NMS; inputs ``inputs``, ``img_shapes``, ``scale_factors``,
outputs ``boxes``, ``scores``, ``labels``: see ``dcn_plugin.models.deploy``). The example batch
is the first images of the config's test split; without ``--dynamic-batch`` / ``--dynamic-shape``
the model takes batches of ``--batch-size`` images of that size.

``--check`` runs PyTorch (eager), onnxruntime and OpenVINO on the first ``--num-images`` test
images, in this process and with ``--threads`` threads each, and prints the largest difference
between each runtime's detections and PyTorch's, and the three latencies. Evaluate the exported
model with ``python tools/test.py CONFIG FILE [--backend openvino]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import os.path as osp
import statistics
import time
import warnings
from collections import Counter

import torch
from mmengine.config import Config, DictAction

from dcn_plugin.engine import mmengine_safe_loading


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Export a detector to ONNX and check it in onnxruntime and "
                                                 "OpenVINO")
    parser.add_argument("config", help="config file path")
    parser.add_argument("checkpoint", help="checkpoint file (.pth)")
    parser.add_argument("--out", required=True, help="the ONNX file to write")
    parser.add_argument("--opset", type=int, default=None,
                        help="ONNX opset (default 20; DeformConv needs 19)")
    parser.add_argument("--dynamic-batch", action="store_true", help="accept any batch size")
    parser.add_argument("--dynamic-shape", action="store_true", help="accept any batch and input size")
    parser.add_argument("--check", action="store_true",
                        help="compare onnxruntime and OpenVINO with PyTorch on test images, and time them")
    parser.add_argument("--num-images", type=int, default=32, help="test images for --check")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="images per batch (of the export without --dynamic-batch, and of --check)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads of PyTorch, onnxruntime and OpenVINO in --check")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config settings")
    return parser.parse_args(argv)


def build_detector(cfg: Config, checkpoint: str) -> torch.nn.Module:
    from mmengine.runner import load_checkpoint

    from dcn_plugin.registry import MODELS

    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint: no such file {checkpoint!r}")
    model = MODELS.build(cfg.model)
    with mmengine_safe_loading():
        load_checkpoint(model, checkpoint, map_location="cpu", strict=True, logger="silent")
    return model.eval()


def load_batches(cfg: Config, model, num_images: int, batch_size: int) -> list[tuple]:
    """The first ``num_images`` images of the test split as ``(inputs, img_shapes, scale_factors)``
    batches of ``batch_size``, through the model's data preprocessor."""
    from mmengine.dataset import pseudo_collate

    from dcn_plugin.registry import DATASETS
    from dcn_plugin.structures import batch_geometry

    if num_images < 1 or batch_size < 1:
        raise ValueError(f"--num-images and --batch-size must be positive, got {num_images} and {batch_size}")
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    count = min(num_images, len(dataset))
    batches = []
    for start in range(0, count, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, count))]
        data = model.data_preprocessor(pseudo_collate(items), False)
        shapes, factors = batch_geometry([s.metainfo for s in data["data_samples"]])
        batches.append((data["inputs"], shapes, factors))
    return batches


def _image_detections(output: tuple, image: int) -> tuple:
    boxes, scores, labels = (t[image] for t in output)
    keep = labels >= 0
    return boxes[keep], scores[keep], labels[keep]


def detection_differences(reference: tuple, other: tuple) -> tuple[float, float, int]:
    """Largest box (pixels) and score difference between each detection of either output and the
    nearest detection of the same label in the other (inf where there is none), and the number of
    images whose detection counts differ. Outputs are ``(boxes, scores, labels)`` batches."""
    box_error = score_error = 0.0
    count_mismatches = 0
    for image in range(reference[0].shape[0]):
        a, b = _image_detections(reference, image), _image_detections(other, image)
        count_mismatches += int(len(a[2]) != len(b[2]))
        for (boxes, scores, labels), (boxes2, scores2, labels2) in ((a, b), (b, a)):
            if len(labels) == 0:
                continue
            distance = (boxes[:, None] - boxes2[None]).abs().amax(-1) if len(labels2) else None
            if distance is None or not (labels[:, None] == labels2[None]).any(1).all():
                return float("inf"), float("inf"), count_mismatches
            distance = distance.masked_fill(labels[:, None] != labels2[None], float("inf"))
            nearest = distance.argmin(1)
            box_error = max(box_error, distance.min(1).values.max().item())
            score_error = max(score_error, (scores - scores2[nearest]).abs().max().item())
    return box_error, score_error, count_mismatches


def latencies(functions: dict, batches: list, rounds: int = 3) -> dict:
    """Median time per image (ms) of each function over ``rounds`` passes on ``batches``, after a
    warm-up. The functions take turns on each batch, so a busy machine slows them alike."""
    samples = {name: [] for name in functions}
    for fn in functions.values():
        fn(*batches[0])
    for _ in range(rounds):
        for batch in batches:
            for name, fn in functions.items():
                start = time.perf_counter()
                fn(*batch)
                samples[name].append((time.perf_counter() - start) * 1000 / batch[0].shape[0])
    return {name: statistics.median(times) for name, times in samples.items()}


def check(model, path: str, batches: list, threads: int) -> dict:
    """Compares onnxruntime and OpenVINO with PyTorch on ``batches`` and times the three; prints and
    returns the numbers."""
    from dcn_plugin.export import inference_session
    from dcn_plugin.export.openvino import compile_model
    from dcn_plugin.models.deploy import INPUT_NAMES, OUTPUT_NAMES, DetectorExport

    torch.set_num_threads(threads)
    session = inference_session(path, threads)
    compiled = compile_model(path, threads)
    ov_outputs = [compiled.output(name) for name in OUTPUT_NAMES]
    pytorch = DetectorExport(model).eval()

    def feed(inputs) -> dict:
        return {name: t.numpy() for name, t in zip(INPUT_NAMES, inputs, strict=True)}

    def run_pytorch(*inputs):
        with torch.no_grad():
            return pytorch(*inputs)

    def run_onnxruntime(*inputs):
        return tuple(torch.from_numpy(a) for a in session.run(list(OUTPUT_NAMES), feed(inputs)))

    def run_openvino(*inputs):
        result = compiled(feed(inputs))
        return tuple(torch.from_numpy(result[port]) for port in ov_outputs)

    runtimes = dict(onnxruntime=run_onnxruntime, openvino=run_openvino)
    differences = {name: dict(box_error=0.0, score_error=0.0, count_mismatches=0) for name in runtimes}
    detections = 0
    for batch in batches:
        reference = run_pytorch(*batch)
        detections += int((reference[2] >= 0).sum())
        for name, run in runtimes.items():
            box, score, count = detection_differences(reference, run(*batch))
            d = differences[name]
            d.update(box_error=max(d["box_error"], box), score_error=max(d["score_error"], score),
                     count_mismatches=d["count_mismatches"] + count)
    times = latencies(dict(pytorch=run_pytorch, **runtimes), batches)
    result = dict(images=sum(b[0].shape[0] for b in batches), detections=detections, differences=differences,
                  latency_ms=times)
    print(f"check on {result['images']} test images ({detections} PyTorch detections), batch "
          f"{batches[0][0].shape[0]}, {threads} threads:")
    for name, d in differences.items():
        print(f"  {name}: largest difference: boxes {d['box_error']:.3g} px, scores {d['score_error']:.3g}; "
              f"images with different detection counts: {d['count_mismatches']}")
    speeds = [f"{name} {times[name]:.1f} ms ({times['pytorch'] / times[name]:.2f}x)" for name in runtimes]
    print(f"  latency per image: PyTorch eager {times['pytorch']:.1f} ms, " + ", ".join(speeds))
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    # The exporter's notes on torchvision ops it skips, empty attributes and shared dynamic axes.
    for name in ("torch.onnx", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*(LeafSpec|axis name).*")
    import dcn_plugin.datasets  # noqa: F401  (registers the dataset and transforms)
    from dcn_plugin.models.deploy import export_detector

    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    model = build_detector(cfg, args.checkpoint)
    dynamic = args.dynamic_batch or args.dynamic_shape
    batches = load_batches(cfg, model, max(args.num_images, 2 if dynamic else 1), args.batch_size)
    example = batches[0] if batches[0][0].shape[0] >= 2 or not dynamic else \
        tuple(torch.cat(parts) for parts in zip(batches[0], batches[1], strict=True))
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    program = export_detector(model, *example, args.out, opset_version=args.opset,
                              dynamic_batch=args.dynamic_batch, dynamic_shape=args.dynamic_shape)
    ops = Counter(node.op_type for node in program.model_proto.graph.node)
    dynamic_dims = ("batch" if args.dynamic_batch or args.dynamic_shape else "") + \
        (", height, width" if args.dynamic_shape else "")
    print(f"wrote {args.out} ({osp.getsize(args.out) / 2**20:.1f} MiB, opset "
          f"{program.model_proto.opset_import[0].version}, example input {list(example[0].shape)}, dynamic: "
          f"{dynamic_dims or 'none'}): "
          + ", ".join(f"{op} x{ops[op]}" for op in ("DeformConv", "Conv", "NonMaxSuppression") if ops[op]))
    result = dict(out=args.out)
    if args.check:
        checked = batches[:max(1, -(-args.num_images // args.batch_size))]
        if not dynamic:  # the model takes batches of the example's size only
            checked = [b for b in checked if b[0].shape[0] == example[0].shape[0]]
        result.update(check(model, args.out, checked, args.threads))
    return result


if __name__ == "__main__":
    main()
