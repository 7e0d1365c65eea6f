"""Train a detector from a config (mmdetection's ``tools/train.py`` arguments).

    python tools/train.py configs/quickstart/fcos_r18-dcnv2-c3-c5_fpn_shapes.py
    python tools/train.py CONFIG --resume            # continue from the work dir's last checkpoint
    bash tools/dist_train.sh CONFIG 2                # torchrun, one process per GPU (or CPU, gloo)
"""

from __future__ import annotations

import argparse

import torch
from mmengine.config import Config
from mmengine.runner import Runner

from dcn_plugin.engine import add_run_arguments, load_config, mmengine_safe_loading, shutdown_distributed


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a detector")
    parser.add_argument("config", help="train config file path")
    add_run_arguments(parser)
    parser.add_argument("--amp", action="store_true", help="automatic mixed precision training")
    parser.add_argument("--auto-scale-lr", action="store_true",
                        help="scale the learning rate by total batch size / auto_scale_lr.base_batch_size")
    parser.add_argument("--resume", nargs="?", type=str, const="auto",
                        help="resume from this checkpoint; without a path, from the latest one in the "
                             "work dir")
    return parser.parse_args(argv)


def build_config(args) -> Config:
    cfg = load_config(args)
    if args.amp and torch.cuda.is_available():
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    elif args.amp:  # mmengine's AmpOptimWrapper is GPU-only; CPU autocast runs in bfloat16
        cfg.optim_wrapper.type = "CPUAutocastOptimWrapper"
    if args.auto_scale_lr:
        cfg.auto_scale_lr = dict(cfg.get("auto_scale_lr", dict(base_batch_size=16)), enable=True)
    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    return cfg


def main(argv=None):
    args = parse_args(argv)
    runner = Runner.from_cfg(build_config(args))
    with mmengine_safe_loading():  # resume / load_from under torch >= 2.6's weights_only default
        runner.train()
    shutdown_distributed()


if __name__ == "__main__":
    main()
