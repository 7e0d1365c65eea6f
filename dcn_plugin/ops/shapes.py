"""The geometry of a deformable convolution: output sizes and a shape record.

``conv_output_size`` is the one Python copy of the convolution output-size formula (the C++ op
checks its arguments with its own). ``DeformConvShape`` describes one call of the op (channels,
sizes, kernel, stride, ..., offset and mask groups); the benchmark's cases and the tests' cases
are such records.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Sequence, Tuple, Union

__all__ = ["conv_output_size", "deform_conv_output_shape", "DeformConvShape"]

IntOrTuple = Union[int, Sequence[int]]


def conv_output_size(in_size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1,
                     transposed: bool = False, output_padding: int = 0) -> int:
    """Output size along one spatial dim, as ``nn.Conv{N}d`` / ``nn.ConvTranspose{N}d`` compute it."""
    span = dilation * (kernel - 1)
    if transposed:
        return (in_size - 1) * stride - 2 * padding + span + output_padding + 1
    return (in_size + 2 * padding - span - 1) // stride + 1


def deform_conv_output_shape(input_shape: Sequence[int], weight_shape: Sequence[int], stride: Sequence[int],
                             padding: Sequence[int], dilation: Sequence[int], transposed: bool,
                             output_padding: Sequence[int], groups: int) -> List[int]:
    """``[B, C_out, *out]`` of ``deform_conv`` for a batched input ``(B, C_in, *in)`` and a weight
    ``(C_out, C_in / groups, *k)`` (transposed: ``(C_in, C_out / groups, *k)``)."""
    n = len(weight_shape) - 2
    kernel = weight_shape[2:]
    out_channels = weight_shape[1] * groups if transposed else weight_shape[0]
    spatial = [conv_output_size(input_shape[2 + d], kernel[d], stride[d], padding[d], dilation[d], transposed,
                                output_padding[d]) for d in range(n)]
    return [input_shape[0], out_channels, *spatial]


def _ntuple(value: IntOrTuple, n: int) -> Tuple[int, ...]:
    return (value,) * n if isinstance(value, int) else tuple(value)


@dataclasses.dataclass(frozen=True)
class DeformConvShape:
    """One configuration of ``deform_conv``; ``offset_groups`` / ``mask_groups`` of 0 mean absent.

    Spatial fields are tuples of N ints; :meth:`build` broadcasts ints.
    """

    batch: int = 2
    in_channels: int = 4
    out_channels: int = 4
    in_size: Tuple[int, ...] = (5, 5)
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
    def build(cls, n: int, **kwargs):
        """Like the constructor, with the spatial fields given as ints or tuples (default sizes 5,
        kernel 3, stride 1, padding 1, dilation 1, output padding 0)."""
        spatial = {"in_size": 5, "kernel": 3, "stride": 1, "padding": 1, "dilation": 1, "output_padding": 0}
        fields = {name: _ntuple(kwargs.pop(name, default), n) for name, default in spatial.items()}
        return cls(**fields, **kwargs)

    @property
    def n(self) -> int:
        """Number of spatial dims."""
        return len(self.in_size)

    @property
    def num_kernel(self) -> int:
        return math.prod(self.kernel)

    @property
    def out_size(self) -> Tuple[int, ...]:
        return tuple(conv_output_size(*args, self.transposed, op) for *args, op in zip(
            self.in_size, self.kernel, self.stride, self.padding, self.dilation, self.output_padding))

    @property
    def grid(self) -> Tuple[int, ...]:
        """Where offset and mask live: the output grid, or the input grid when transposed."""
        return self.in_size if self.transposed else self.out_size

    @property
    def sampled_channels(self) -> int:
        """The channels the op samples (input for convolution, output when transposed)."""
        return self.out_channels if self.transposed else self.in_channels

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        if self.transposed:
            return (self.in_channels, self.out_channels // self.groups, *self.kernel)
        return (self.out_channels, self.in_channels // self.groups, *self.kernel)

    @property
    def offset_shape(self) -> Tuple[int, ...]:
        return (self.batch, self.offset_groups * self.n * self.num_kernel, *self.grid)

    @property
    def mask_shape(self) -> Tuple[int, ...]:
        return (self.batch, self.mask_groups * self.num_kernel, *self.grid)

    def is_valid(self) -> bool:
        """Whether the op accepts this configuration."""
        return (
            self.in_channels % self.groups == 0
            and self.out_channels % self.groups == 0
            and (self.offset_groups == 0 or self.sampled_channels % self.offset_groups == 0)
            and (self.mask_groups == 0 or self.sampled_channels % self.mask_groups == 0)
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
