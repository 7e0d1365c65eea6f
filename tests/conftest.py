"""Shared fixtures of the op tests: the ``device`` parametrizations and a tiny workspace limit.

Where torch has no CUDA device, ``TRITON_INTERPRET=1`` is set here, before anything imports
triton, so that the Triton kernels run on CPU tensors under Triton's interpreter
(``test_ops_triton.py``); triton reads it when the kernels are defined. On a GPU it is left alone,
and the same tests run the kernels on CUDA tensors.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

# The tests import their helpers as ``from reference import ...``.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Deterministic mode makes cuBLAS refuse to run without a fixed workspace configuration.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _cuda_ops_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import dcn_plugin
    except ImportError:
        return False
    return dcn_plugin.has_ops() and dcn_plugin.with_cuda()


CUDA_AVAILABLE = _cuda_ops_available()
CUDA_SKIP_REASON = ("needs a CUDA device, torch with CUDA and triton (dcn_plugin's CUDA kernels are Triton "
                    "kernels); runs on a GPU machine, e.g. with `bash tools/gpu_check.sh`")

TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None
INTERPRETER = TRITON_IMPORTABLE and os.environ.get("TRITON_INTERPRET") == "1"
INTERPRETER_SKIP_REASON = (
    "needs triton (`pip install triton==3.9.0`, as tools/setup.sh does)" if not TRITON_IMPORTABLE
    else "runs under Triton's interpreter, which tests/conftest.py turns on (TRITON_INTERPRET=1) only where "
         "torch has no CUDA device; here the CUDA parameters run the same tests on the GPU")

CUDA_PARAM = pytest.param(
    "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA_AVAILABLE, reason=CUDA_SKIP_REASON)])
DEVICES = ["cpu", CUDA_PARAM]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every op test runs on the CPU, and on CUDA where there is a GPU and triton."""
    return request.param


@pytest.fixture(params=DEVICES[1:])
def cuda_device(request) -> str:
    """For tests that only mean something with a GPU (mixed devices); skipped without one."""
    return request.param


INTERPRETER_PARAM = pytest.param(
    "cpu", id="interpreter", marks=pytest.mark.skipif(not INTERPRETER, reason=INTERPRETER_SKIP_REASON))


@pytest.fixture(params=[INTERPRETER_PARAM, CUDA_PARAM])
def triton_device(request) -> str:
    """The device the Triton kernels run on: CPU tensors under Triton's interpreter, with the ops'
    CPU kernels replaced by the Triton driver for the test (the ops, their autograd and autocast
    then run the Triton kernels as they do on CUDA); or CUDA tensors through the registered op."""
    if request.param == "cpu":
        with triton_kernels_on_cpu():
            yield "cpu"
    else:
        yield request.param


class triton_kernels_on_cpu:
    """Registers the ops' CUDA kernels (the Triton drivers, as registered in ``_library``) as their
    CPU kernels (the convolution's and the RoI pooling ones), over the C++ ones, until exit."""

    def __enter__(self):
        import warnings

        from dcn_plugin.ops._library import TRITON_KERNELS

        self.library = torch.library.Library("dcn_plugin", "IMPL")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Oo]verrid")
            for name, kernel in TRITON_KERNELS.items():
                self.library.impl(name, kernel, "CPU")
        return self

    def __exit__(self, *exc):
        self.library._destroy()  # the C++ kernels are the CPU kernels again


@pytest.fixture
def tiny_workspace():
    """Sets a 4 KiB column-buffer budget (forcing many chunks) and restores the old one."""
    from dcn_plugin.ops import set_workspace_limit

    previous = set_workspace_limit(4096)
    try:
        yield 4096
    finally:
        set_workspace_limit(previous)
