"""Train a detector from a config (mmdetection's ``tools/train.py`` arguments).

    python tools/train.py configs/quickstart/fcos_r18-dcnv2-c3-c5_fpn_shapes.py
    python tools/train.py CONFIG --resume            # continue from the work dir's last checkpoint
    bash tools/dist_train.sh CONFIG 2                # torchrun, one process per GPU (or CPU, gloo)
"""

from __future__ import annotations

import argparse
import os
import os.path as osp

import torch
from mmengine.config import Config, DictAction
from mmengine.runner import Runner

from dcn_plugin.engine import mmengine_safe_loading, setup_cpu_distributed


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a detector")
    parser.add_argument("config", help="train config file path")
    parser.add_argument("--work-dir", help="the dir to save logs and checkpoints")
    parser.add_argument("--amp", action="store_true", help="automatic mixed precision training")
    parser.add_argument("--auto-scale-lr", action="store_true",
                        help="scale the learning rate by total batch size / auto_scale_lr.base_batch_size")
    parser.add_argument("--resume", nargs="?", type=str, const="auto",
                        help="resume from this checkpoint; without a path, from the latest one in the "
                             "work dir")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override config settings, e.g. train_cfg.max_iters=100")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def build_config(args) -> Config:
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])
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
    setup_cpu_distributed(cfg, args.launcher)
    return cfg


def main(argv=None):
    args = parse_args(argv)
    runner = Runner.from_cfg(build_config(args))
    with mmengine_safe_loading():  # resume / load_from under torch >= 2.6's weights_only default
        runner.train()


if __name__ == "__main__":
    main()
