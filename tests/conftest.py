"""Shared fixtures of the op tests: the ``device`` parametrization and a tiny workspace limit."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# The tests import their helpers as ``from reference import ...``.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _cuda_ops_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import dcn_plugin
    except ImportError:
        return False
    return dcn_plugin.has_ops() and dcn_plugin.with_cuda()


CUDA_AVAILABLE = _cuda_ops_available()

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(
                not CUDA_AVAILABLE, reason="needs a CUDA device and dcn_plugin built with CUDA"
            ),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every op test runs on the CPU, and on CUDA where there is a GPU and CUDA kernels."""
    return request.param


@pytest.fixture(params=DEVICES[1:])
def cuda_device(request) -> str:
    """For tests that only mean something with a GPU (mixed devices); skipped without one."""
    return request.param


@pytest.fixture
def tiny_workspace():
    """Sets a 4 KiB column-buffer budget (forcing many chunks) and restores the old one."""
    from dcn_plugin.ops import set_workspace_limit

    previous = set_workspace_limit(4096)
    try:
        yield 4096
    finally:
        set_workspace_limit(previous)
