"""Pieces shared by the compat modules: the argument checks of the layers (mmcv's and detectron2's
take the offset and mask group count as an argument, where ``dcn_plugin.ops`` reads it from the
channel counts), and the name replacement of their ``install()``."""

from __future__ import annotations

import sys
from typing import Dict, List

from torch import Tensor


def replace_names(theirs: Dict[str, object], ours: Dict[str, object], packages) -> List[str]:
    """In every loaded module of ``packages`` (top-level names), sets each name that holds
    ``theirs[name]`` to ``ours[name]``; returns the ``module.name`` strings replaced, sorted.
    Objects are matched by identity, so only the library's own objects are ever replaced."""
    replaced = []
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name.split(".")[0] not in packages:
            continue
        for name, obj in ours.items():
            if theirs[name] is not obj and module.__dict__.get(name) is theirs[name]:
                setattr(module, name, obj)
                replaced.append(f"{module_name}.{name}")
    return sorted(replaced)


def assert_groups_divide(in_channels: int, out_channels: int, groups: int) -> None:
    """mmcv's and detectron2's assertions on ``groups``, with their messages."""
    assert in_channels % groups == 0, f"in_channels {in_channels} cannot be divisible by groups {groups}"
    assert out_channels % groups == 0, f"out_channels {out_channels} cannot be divisible by groups {groups}"


def _shape(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__


def check_offset_mask(fn: str, input, offset, mask, weight, groups_name: str, deform_groups,
                      mask_given: bool = False) -> None:
    """Checks a 2d call: 4D ``input`` (``ValueError``, as mmcv and detectron2 raise), and ``offset``
    ``(B, 2 * deform_groups * kh * kw, H_out, W_out)`` and ``mask`` ``(B, deform_groups * kh * kw,
    H_out, W_out)`` (``RuntimeError``, as their kernels raise). ``mask_given``: a mask is required.

    The layers take any ``deform_groups`` when built, as mmcv's and detectron2's do; it is checked
    here, when they run."""
    if not isinstance(input, Tensor) or input.dim() != 4:
        got = f"{input.dim()}D tensor" if isinstance(input, Tensor) else type(input).__name__
        raise ValueError(f"{fn}: Expected 4D tensor as input, got {got} instead.")
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(f"{fn}: weight must be a 4D tensor (C_out, C_in / groups, kh, kw), "
                         f"got {_shape(weight)}")
    if not isinstance(deform_groups, int) or isinstance(deform_groups, bool) or deform_groups <= 0:
        raise ValueError(f"{fn}: {groups_name} must be a positive int, got {groups_name}={deform_groups!r}")
    if input.shape[1] % deform_groups != 0:
        raise RuntimeError(f"{fn}: {groups_name}={deform_groups} must divide the input's "
                           f"{input.shape[1]} channels")
    kh, kw = weight.shape[2:]
    expected = [("offset", offset, 2 * deform_groups * kh * kw, f"2 * {groups_name} * kh * kw")]
    if mask_given:
        expected.append(("mask", mask, deform_groups * kh * kw, f"{groups_name} * kh * kw"))
    for name, value, channels, formula in expected:
        if not isinstance(value, Tensor) or value.dim() != 4 or value.shape[1] != channels:
            raise RuntimeError(
                f"{fn}: {name} must have shape (B, {formula} = {channels}, H_out, W_out) for "
                f"{groups_name}={deform_groups} and a {kh}x{kw} kernel, got {_shape(value)}")

