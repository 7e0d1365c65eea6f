"""Runtime pieces for mmengine 0.10 on current torch, used by ``tools/train.py`` and ``tools/test.py``.

``load_config``: the config of a run, from the arguments the tools share (work dir, cfg-options,
launcher).

``NumClassCheckHook``: before training, validation and testing, checks that the detector's head
predicts as many classes as the dataset has (a head with fewer classes silently trains the rest
as background).

``CheckpointHook``: mmengine's, without the two deprecation warnings (``FileClient``,
``HardDiskBackend``) of the file client that mmengine 0.10's hook builds at the start of every
run and never uses when ``file_client_args`` is not set.

``setup_cpu_distributed``: distributed runs on machines without GPUs (torchrun + gloo).

``CPUAutocastOptimWrapper``: ``--amp`` on a machine without a GPU (mmengine's ``AmpOptimWrapper``
refuses to run there): the forward runs under ``torch.autocast('cpu', bfloat16)``, which, unlike
float16, needs no loss scaling.

``mmengine_safe_loading``: lets torch >= 2.6 load mmengine checkpoints (``--resume``,
``load_from``) with safe loading on. Since torch 2.6, ``torch.load`` defaults to
``weights_only=True``, which refuses the non-tensor objects mmengine 0.10 stores in every
checkpoint (the message hub's ``HistoryBuffer``, the numpy arrays it holds, and its
``statistics_methods``, pickled as ``getattr(HistoryBuffer, 'min')``), so resuming fails with
``UnpicklingError``. Allowlisting exactly these keeps loading restricted: the weights-only
unpickler still only *calls* allowlisted functions, so ``getattr`` can fetch an attribute but
never invoke it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import os.path as osp
from collections.abc import Iterator

import numpy as np
import torch
from mmengine.config import Config, DictAction
from mmengine.hooks import CheckpointHook as MMEngineCheckpointHook
from mmengine.hooks import Hook
from mmengine.optim import OptimWrapper
from mmengine.registry import HOOKS, OPTIM_WRAPPERS

from .registry import HOOKS as SCOPE_HOOKS

__all__ = ["CheckpointHook", "CPUAutocastOptimWrapper", "NumClassCheckHook", "add_run_arguments",
           "load_config", "mmengine_checkpoint_globals", "mmengine_safe_loading", "setup_cpu_distributed",
           "shutdown_distributed"]


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments ``tools/train.py`` and ``tools/test.py`` share (mmdetection's names)."""
    parser.add_argument("--work-dir", help="the dir to save logs, checkpoints and metrics")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override config settings, e.g. train_cfg.max_iters=100")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)


def load_config(args: argparse.Namespace) -> Config:
    """``args.config`` with the shared arguments applied; the work dir defaults to
    ``./work_dirs/<config name>``."""
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])
    setup_cpu_distributed(cfg, args.launcher)
    return cfg


@HOOKS.register_module()
class NumClassCheckHook(Hook):
    """Fails a run whose detector head predicts a different number of classes than its dataset has.

    Checks ``model.bbox_head.num_classes`` (two-stage detectors: ``model.roi_head.bbox_head``)
    against ``len(dataset.metainfo['classes'])`` of the train, val and test datasets before each
    loop starts. Models without a box head pass.
    """

    def _check(self, runner, split: str) -> None:
        model = runner.model.module if hasattr(runner.model, "module") else runner.model
        key, head = "model.bbox_head", getattr(model, "bbox_head", None)
        if head is None and hasattr(model, "roi_head"):
            key, head = "model.roi_head.bbox_head", getattr(model.roi_head, "bbox_head", None)
        num_classes = getattr(head, "num_classes", None)
        loader = getattr(runner, f"{split}_dataloader")
        classes = getattr(loader.dataset, "metainfo", {}).get("classes")
        if num_classes is None or classes is None or num_classes == len(classes):
            return
        raise ValueError(
            f"{key}.num_classes is {num_classes}, but the {split} dataset "
            f"({type(loader.dataset).__name__}) has {len(classes)} classes {tuple(classes)}: set "
            f"{key}.num_classes={len(classes)}, or {split}_dataloader.dataset.metainfo="
            f"dict(classes=...) to the {num_classes} classes the head should predict"
        )

    def before_train(self, runner) -> None:
        self._check(runner, "train")

    def before_val(self, runner) -> None:
        self._check(runner, "val")

    def before_test(self, runner) -> None:
        self._check(runner, "test")


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@SCOPE_HOOKS.register_module(name="CheckpointHook")
class CheckpointHook(MMEngineCheckpointHook):
    """mmengine's ``CheckpointHook``, less the warnings of the file clients that mmengine 0.10 builds
    and does not use (at the start of training and at every save) when ``file_client_args`` is unset."""

    UNUSED_CLIENT_WARNINGS = ('"FileClient" will be deprecated', '"HardDiskBackend" is the alias')

    @contextlib.contextmanager
    def _quiet(self, runner):
        if self.file_client_args is not None:  # the client is used: let mmengine warn
            yield
            return
        quiet = _DropMessages(self.UNUSED_CLIENT_WARNINGS)
        runner.logger.addFilter(quiet)
        try:
            yield
        finally:
            runner.logger.removeFilter(quiet)

    def before_train(self, runner) -> None:
        with self._quiet(runner):
            super().before_train(runner)

    def _save_checkpoint(self, runner) -> None:
        with self._quiet(runner):
            super()._save_checkpoint(runner)

    def _save_best_checkpoint(self, runner, metrics) -> None:
        with self._quiet(runner):
            super()._save_best_checkpoint(runner, metrics)


@OPTIM_WRAPPERS.register_module()
class CPUAutocastOptimWrapper(OptimWrapper):
    """An ``OptimWrapper`` whose forward runs under CPU autocast in ``dtype`` (default bfloat16)."""

    def __init__(self, *args, dtype: str = "bfloat16", **kwargs):
        super().__init__(*args, **kwargs)
        self.cast_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if self.cast_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"CPUAutocastOptimWrapper: dtype must be 'bfloat16' or 'float16', got {dtype!r}")

    @contextlib.contextmanager
    def optim_context(self, model):
        with super().optim_context(model), torch.autocast("cpu", dtype=self.cast_dtype):
            yield


def mmengine_checkpoint_globals() -> list:
    """The non-tensor globals found in mmengine 0.10 checkpoints."""
    from mmengine.logging import HistoryBuffer

    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray
    dtypes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"}
    return [HistoryBuffer, getattr, multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype,
            *dtypes]


@contextlib.contextmanager
def mmengine_safe_loading() -> Iterator[None]:
    """Within the block, ``torch.load(weights_only=True)`` accepts mmengine checkpoints."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch < 2.5: no allowlist (and weights_only defaults to False)
        yield
        return
    with safe_globals(mmengine_checkpoint_globals()):
        yield


def shutdown_distributed() -> None:
    """Destroys the default process group, if any, before the process exits.

    Left to the interpreter's exit, gloo's threads are destroyed while still joinable, which
    aborts the process ("terminate called without an active exception") now and then.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def setup_cpu_distributed(cfg, launcher: str) -> None:
    """Prepares ``cfg`` for a distributed run without CUDA: gloo, and DDP without device ids.

    mmengine's ``init_dist`` calls ``torch.cuda.set_device`` unconditionally, which fails on a
    CPU-only torch, so for torchrun (``launcher='pytorch'``) the process group is created here;
    the Runner then finds it initialised and skips its own.
    """
    if launcher == "none" or torch.cuda.is_available():
        return
    cfg.env_cfg = dict(cfg.get("env_cfg", {}))
    cfg.env_cfg["dist_cfg"] = dict(backend="gloo")
    cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None,
                                 broadcast_buffers=False, find_unused_parameters=False)
    if launcher == "pytorch" and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="gloo", rank=int(os.environ["RANK"]),
                                             world_size=int(os.environ["WORLD_SIZE"]))
