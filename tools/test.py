"""Evaluate a trained detector: checkpoint -> COCO metrics (mmdetection's ``tools/test.py``).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out results.pkl]
"""

from __future__ import annotations

import argparse
import os
import os.path as osp

from mmengine.config import Config, DictAction
from mmengine.runner import Runner

from dcn_plugin.engine import mmengine_safe_loading, setup_cpu_distributed


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Test (and evaluate) a detector")
    parser.add_argument("config", help="test config file path")
    parser.add_argument("checkpoint", help="checkpoint file")
    parser.add_argument("--work-dir", help="the dir to save the evaluation metrics")
    parser.add_argument("--out", help="dump the predictions to this pickle file")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override config settings, e.g. test_dataloader.batch_size=1")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f"checkpoint: no such file {args.checkpoint!r}")
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint
    setup_cpu_distributed(cfg, args.launcher)
    runner = Runner.from_cfg(cfg)
    if args.out is not None:
        if not args.out.endswith((".pkl", ".pickle")):
            raise ValueError(f"--out: the output file must be a .pkl file, got {args.out!r}")
        runner.test_evaluator.metrics.append(_dump_metric(args.out))
    with mmengine_safe_loading():
        return runner.test()


def _dump_metric(path: str):
    from mmengine.evaluator import DumpResults

    return DumpResults(out_file_path=path)


if __name__ == "__main__":
    main()
