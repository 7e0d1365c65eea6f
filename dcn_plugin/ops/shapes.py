"""Sizes of one call of ``deform_conv``, and the dtype it computes in.

The op's fake kernel, the Triton driver, the ONNX export, the benchmark and the tests all take
their sizes from here: :func:`conv_output_size` (the output-size formula), :class:`DeformConvShape`
(the sizes of a call, built from the op's arguments or from ints) and :func:`accumulate_dtype`.
The C++ op checks its arguments with its own copy of the formula.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence, Tuple, Union

import torch

__all__ = ["conv_output_size", "accumulate_dtype", "DeformConvShape"]

IntOrTuple = Union[int, Sequence[int]]


def conv_output_size(in_size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1,
                     transposed: bool = False, output_padding: int = 0) -> int:
    """Output size along one spatial dim, as ``nn.Conv{N}d`` / ``nn.ConvTranspose{N}d`` compute it.

    Works on ``torch.SymInt`` too (the fake kernel under ``torch.compile`` and ``torch.export``)."""
    span = dilation * (kernel - 1)
    if transposed:
        return (in_size - 1) * stride - 2 * padding + span + output_padding + 1
    return (in_size + 2 * padding - span - 1) // stride + 1


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which the op computes sampling positions, interpolation weights and sums for
    tensors of ``dtype``: float64 for float64, float32 otherwise (float16 and bfloat16 included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ntuple(value: IntOrTuple, n: int) -> Tuple[int, ...]:
    return (value,) * n if isinstance(value, int) else tuple(value)


def _static_size(t, axis: int, name: str):
    """``t.shape[axis]``, which must be an int (or a ``torch.SymInt``, which computes like one):
    the ONNX exporter passes symbolic dims of another type, which channel counts and kernel sizes
    may not be."""
    size = t.shape[axis]
    if not isinstance(size, (int, torch.SymInt)):
        raise ValueError(f"{name} has a dynamic size {size} along dim {axis}; channel counts and kernel "
                         "sizes must be static")
    return size


@dataclasses.dataclass(frozen=True)
class DeformConvShape:
    """The sizes of one call of ``deform_conv``: a call the op gets, or a case to test or benchmark.

    Spatial fields are tuples of N ints. ``offset_groups`` / ``mask_groups`` are 0 when the offset /
    mask is absent. ``batch`` and ``in_size`` may be symbolic (``torch.SymInt`` under
    ``torch.compile``, the exporter's dims at ONNX export); the sizes computed from them are then
    symbolic too.

    Two tensors matter to the kernels besides input and output (the C++ kernels name them the same):

    - the *image*: the tensor that is sampled at the deformed positions, i.e. the input of the
      convolution and the output of the transposed convolution;
    - the *grid*: the points where offset and mask are given (one sampling position per grid point
      and kernel point), i.e. the output of the convolution and the input of the transposed one.
      Kernels lay their columns out over the grid, as im2col does.

    The image's channels split into ``offset_groups`` groups that share an offset, and into
    ``mask_groups`` groups that share a mask; ``sample_groups`` is the split into the largest groups
    that share both.
    """

    batch: Any = 2
    in_channels: int = 4
    out_channels: int = 4
    in_size: Tuple[Any, ...] = (5, 5)
    kernel: Tuple[int, ...] = (3, 3)
    stride: Tuple[int, ...] = (1, 1)
    padding: Tuple[int, ...] = (1, 1)
    dilation: Tuple[int, ...] = (1, 1)
    output_padding: Tuple[int, ...] = (0, 0)
    groups: int = 1
    offset_groups: int = 1
    mask_groups: int = 1
    transposed: bool = False

    @classmethod
    def build(cls, n: int, **kwargs) -> DeformConvShape:
        """Like the constructor, with the spatial fields given as ints or tuples (default sizes 5,
        kernel 3, stride 1, padding 1, dilation 1, output padding 0)."""
        spatial = {"in_size": 5, "kernel": 3, "stride": 1, "padding": 1, "dilation": 1, "output_padding": 0}
        fields = {name: _ntuple(kwargs.pop(name, default), n) for name, default in spatial.items()}
        return cls(**fields, **kwargs)

    @classmethod
    def of(cls, input, weight, offset, mask, stride: Sequence[int], padding: Sequence[int],
           dilation: Sequence[int], transposed: bool, output_padding: Sequence[int],
           groups: int) -> DeformConvShape:
        """The shape of a call, from the op's arguments (its tensors, or anything with a ``shape``:
        fake tensors, the ONNX exporter's values). Channel counts are read from the weight.

        Raises ``ValueError`` where a channel count or a kernel size is not an int (a dynamic dim at
        ONNX export)."""
        n = len(weight.shape) - 2
        kernel = tuple(_static_size(weight, 2 + d, "weight") for d in range(n))
        k = math.prod(kernel)
        first, second = _static_size(weight, 0, "weight"), _static_size(weight, 1, "weight")
        sizes = input.shape if input.shape is not None else (None,) * (n + 2)
        return cls(
            batch=sizes[0], in_size=tuple(sizes[2 + d] for d in range(n)),
            in_channels=first if transposed else second * groups,
            out_channels=second * groups if transposed else first,
            kernel=kernel, stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation),
            output_padding=tuple(output_padding), groups=groups, transposed=bool(transposed),
            offset_groups=0 if offset is None else _static_size(offset, 1, "offset") // (n * k),
            mask_groups=0 if mask is None else _static_size(mask, 1, "mask") // k,
        )

    @property
    def n(self) -> int:
        """Number of spatial dims."""
        return len(self.kernel)

    @property
    def kernel_points(self) -> int:
        """``K``, the number of kernel points."""
        return math.prod(self.kernel)

    @property
    def out_size(self) -> Tuple[Any, ...]:
        return tuple(conv_output_size(*args, self.transposed, op) for *args, op in zip(
            self.in_size, self.kernel, self.stride, self.padding, self.dilation, self.output_padding))

    @property
    def input_shape(self) -> Tuple[Any, ...]:
        return (self.batch, self.in_channels, *self.in_size)

    @property
    def output_shape(self) -> Tuple[Any, ...]:
        return (self.batch, self.out_channels, *self.out_size)

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        if self.transposed:
            return (self.in_channels, self.out_channels // self.groups, *self.kernel)
        return (self.out_channels, self.in_channels // self.groups, *self.kernel)

    # The image (the sampled tensor) and the grid (where offset and mask live): see the class docstring.

    @property
    def image_channels(self) -> int:
        return self.out_channels if self.transposed else self.in_channels

    @property
    def image_size(self) -> Tuple[Any, ...]:
        return self.out_size if self.transposed else self.in_size

    @property
    def image_points(self) -> Any:
        return math.prod(self.image_size)

    @property
    def image_shape(self) -> Tuple[Any, ...]:
        return (self.batch, self.image_channels, *self.image_size)

    @property
    def grid_channels(self) -> int:
        """Channels of the other tensor on the grid (the output of the convolution, the input of the
        transposed one)."""
        return self.in_channels if self.transposed else self.out_channels

    @property
    def grid_size(self) -> Tuple[Any, ...]:
        return self.in_size if self.transposed else self.out_size

    @property
    def grid_points(self) -> Any:
        return math.prod(self.grid_size)

    @property
    def offset_channels(self) -> int:
        return self.offset_groups * self.n * self.kernel_points

    @property
    def mask_channels(self) -> int:
        return self.mask_groups * self.kernel_points

    @property
    def offset_shape(self) -> Tuple[Any, ...]:
        return (self.batch, self.offset_channels, *self.grid_size)

    @property
    def mask_shape(self) -> Tuple[Any, ...]:
        return (self.batch, self.mask_channels, *self.grid_size)

    @property
    def channels_per_offset_group(self) -> int:
        """Image channels per offset group (all of them without an offset)."""
        return self.image_channels // max(self.offset_groups, 1)

    @property
    def channels_per_mask_group(self) -> int:
        """Image channels per mask group (all of them without a mask)."""
        return self.image_channels // max(self.mask_groups, 1)

    @property
    def sample_groups(self) -> int:
        """The image channels split into the fewest groups that each lie within one offset group
        and one mask group: ``lcm(offset_groups, mask_groups)``, counting an absent one as 1."""
        return math.lcm(max(self.offset_groups, 1), max(self.mask_groups, 1))

    @property
    def channels_per_sample_group(self) -> int:
        return self.image_channels // self.sample_groups

    def is_valid(self) -> bool:
        """Whether the op accepts this configuration."""
        return (
            self.in_channels % self.groups == 0
            and self.out_channels % self.groups == 0
            and (self.offset_groups == 0 or self.image_channels % self.offset_groups == 0)
            and (self.mask_groups == 0 or self.image_channels % self.mask_groups == 0)
            and all(o >= 1 for o in self.out_size)
            and (not self.transposed or all(
                op < max(s, d) for op, s, d in zip(self.output_padding, self.stride, self.dilation)))
        )

    def describe(self) -> str:
        """A compact string, e.g. ``2x128x50x50->128x50x50 k3x3 s2 og4 mg4`` (``T`` for transposed)."""
        dims = lambda values: "x".join(map(str, values))  # noqa: E731
        parts = [f"{self.batch}x{self.in_channels}x{dims(self.in_size)}->{self.out_channels}x"
                 f"{dims(self.out_size)}", "k" + dims(self.kernel)]
        for label, value, default in (("s", self.stride, 1), ("p", self.padding, 1), ("d", self.dilation, 1),
                                      ("op", self.output_padding, 0)):
            if any(v != default for v in value):
                parts.append(label + dims(value))
        if self.groups != 1:
            parts.append(f"g{self.groups}")
        for label, value in (("og", self.offset_groups), ("mg", self.mask_groups)):
            if value != 1:
                parts.append(f"{label}{value}" if value else ("no-offset" if label == "og" else "no-mask"))
        return " ".join((["T"] if self.transposed else []) + parts)
