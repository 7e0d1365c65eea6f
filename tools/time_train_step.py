#!/usr/bin/env python
"""Time the training step of several detector configs side by side, in one process.

Every config trains on the same batches (drawn once from the first config's train dataloader),
in rounds that interleave the configs, so that the machine's noise hits them alike; the step is
the runner's: forward, loss, backward and the optimizer update of ``optim_wrapper``. Prints the
median step time of each config and its ratio to the first one's.

    python tools/time_train_step.py configs/quickstart/fcos_r18_fpn_shapes.py \\
        configs/quickstart/fcos_r18-dcnv2-c3-c5_fpn_shapes.py --steps 17 --rounds 3
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
from mmengine.config import Config, DictAction
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope
from mmengine.runner import Runner

import dcn_plugin.engine  # noqa: F401  (registers CPUAutocastOptimWrapper)
import dcn_plugin.models  # noqa: F401
from dcn_plugin.registry import MODELS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help="detector configs; ratios are to the first")
    parser.add_argument("--steps", type=int, default=17, help="timed steps per config and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(N)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                        help="overrides applied to every config, e.g. train_dataloader.batch_size=8")
    return parser.parse_args(argv)


def batches(cfg: Config, count: int) -> list:
    """``count`` batches of the config's train dataloader (workers off: the same data every time)."""
    loader_cfg = cfg.train_dataloader.copy()
    loader_cfg.update(num_workers=0, persistent_workers=False)
    loader = Runner.build_dataloader(loader_cfg, seed=0)
    return list(itertools.islice(iter(loader), count))


def trainer(cfg: Config):
    """A model and its optimizer wrapper, built as the runner builds them."""
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    return model, build_optim_wrapper(model, cfg.optim_wrapper)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfgs = [Config.fromfile(path) for path in args.configs]
    for cfg in cfgs:
        cfg.merge_from_dict(args.cfg_options)
    init_default_scope(cfgs[0].get("default_scope", "dcn_plugin"))
    data = batches(cfgs[0], args.steps + 1)
    trainers = [trainer(cfg) for cfg in cfgs]
    times = {path: [] for path in args.configs}
    for _ in range(args.rounds):
        for path, (model, optim_wrapper) in zip(args.configs, trainers):
            model.train_step(data[0], optim_wrapper)  # warm-up (first-call allocations)
            start = time.perf_counter()
            for batch in data[1:]:
                model.train_step(batch, optim_wrapper)
            times[path].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times[args.configs[0]])
    print(f"threads: {torch.get_num_threads()}, batch: {cfgs[0].train_dataloader.batch_size}, "
          f"{args.steps} steps x {args.rounds} rounds, interleaved")
    result = {}
    for path in args.configs:
        median = statistics.median(times[path])
        result[path] = median
        rounds = ", ".join(f"{t * 1e3:.0f}" for t in times[path])
        print(f"{median * 1e3:8.1f} ms/step  {median / base:5.2f}x  (rounds: {rounds} ms)  {path}")
    return result


if __name__ == "__main__":
    main()
