"""Translation of ``dcn_plugin::deform_conv`` to standard ONNX ops, for ``torch.onnx.export(dynamo=True)``
(the RoI pooling ops: :mod:`._roi_pool`).

What one call of the op becomes:

=====================================================  ==============================================
case                                                    ONNX
=====================================================  ==============================================
no offset and no mask (any N, plain or transposed)      ``Conv`` / ``ConvTranspose``
2d, offset and/or mask                                  ``DeformConv`` (opset >= 19; bfloat16: >= 22)
1d                                                      ``DeformConv`` on ``(B, C, L, 1)``: exact, the
                                                        second displacement is zero
3d, and transposed (1d/2d/3d)                           no standard op: the decomposition of
                                                        :mod:`._decomposition` (N-linear sampling
                                                        with ``GatherND`` / ``ScatterND``, then
                                                        ``MatMul``), any opset >= 18
=====================================================  ==============================================

``DeformConv`` takes one mask group per offset group (mask ``(B, offset_group * K, H, W)``);
offsets and masks in different numbers of groups are both repeated to
``lcm(offset_groups, mask_groups)`` groups (``DeformConvShape.sample_groups``), which is exact
because each of those groups of channels lies inside one offset group and one mask group. A mask
without offsets gets zero offsets. With ``decompose=True`` 1d and 2d use the decomposition too (for
runtimes without ``DeformConv``).

The translation is a plain Python function traced by the exporter: it sees the op's tensor
arguments as symbolic values with shapes and dtypes, and its int arguments as Python values.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Sequence

import onnxscript
import torch
from onnxscript import ir

from ..ops._library import require_ops
from ..ops.shapes import DeformConvShape
from . import _decomposition, _roi_pool
from ._graph import ints, repeat_groups, zeros

__all__ = [
    "DEFAULT_OPSET",
    "SUPPORTED",
    "DeformConvExportError",
    "onnx_translation_table",
    "onnxscript_opset",
    "export_onnx",
    "inference_session",
]

DEFAULT_OPSET = 20  # torch.onnx.export's default
_OPSETS = range(18, 24)  # torch's exporter starts at 18; onnxscript 0.7 knows up to 23
_DEFORM_CONV_OPSET = 19
_BFLOAT16_DEFORM_CONV_OPSET = 22

SUPPORTED = (
    "supported: 2d and 1d with offsets and/or masks in any groups -> DeformConv (opset >= 19, bfloat16 "
    ">= 22); no offset and no mask -> Conv/ConvTranspose; 3d and transposed -> standard-op "
    "decomposition (GatherND/ScatterND + MatMul, opset >= 18); onnx_translation_table(decompose=True) "
    "uses the decomposition for 1d/2d too"
)


class DeformConvExportError(ValueError):
    """A call of ``dcn_plugin::deform_conv`` that cannot be exported as asked.

    The message names the op, the case, and what is supported.
    """


def _describe(g: DeformConvShape) -> str:
    """The case, for error messages: e.g. ``2d deformable convolution (offset_groups=1, no mask, ...)``."""
    kind = f"{g.n}d {'transposed ' if g.transposed else ''}deformable convolution"
    parts = [f"offset_groups={g.offset_groups}" if g.offset_groups else "no offset",
             f"mask_groups={g.mask_groups}" if g.mask_groups else "no mask"]
    return f"{kind} ({', '.join(parts)}, kernel={g.kernel}, groups={g.groups})"


def _error(g: Optional[DeformConvShape], problem: str) -> DeformConvExportError:
    case = f" a {_describe(g)}" if g is not None else ""
    return DeformConvExportError(f"dcn_plugin::deform_conv: cannot export{case}: {problem}. {SUPPORTED}.")


def _shape_of(input, weight, offset, mask, stride, padding, dilation, transposed, output_padding,
              groups) -> DeformConvShape:
    """The sizes of a call, from the op's arguments as the exporter passes them (batch and spatial
    sizes may be symbolic; channel counts and kernel sizes must be static)."""
    try:
        return DeformConvShape.of(input, weight, offset, mask, stride, padding, dilation, transposed,
                                  output_padding, int(groups))
    except ValueError as exc:  # a dynamic channel count or kernel size
        raise _error(None, str(exc)) from None


# ------------------------------------------------------------------------------------------------
# The cases.


def _plain_conv(op, g: DeformConvShape, input, weight, bias):
    """No offset and no mask: exactly ``Conv`` / ``ConvTranspose``."""
    attributes = dict(strides=list(g.stride), pads=list(g.padding) * 2, dilations=list(g.dilation),
                      group=g.groups, kernel_shape=list(g.kernel))
    if g.transposed:
        return op.ConvTranspose(input, weight, bias, output_padding=list(g.output_padding), **attributes)
    return op.Conv(input, weight, bias, **attributes)


def _deform_conv_2d(op, g: DeformConvShape, input, weight, offset, mask, bias):
    """ONNX ``DeformConv``: input (B, C_in, H, W), offset (B, G * 2 * K, H_out, W_out), mask
    (B, G * K, H_out, W_out) with G = ``g.sample_groups``."""
    groups = g.sample_groups
    if offset is None:
        shape = op.Concat(op.Shape(mask, end=1), ints(op, groups * 2 * g.kernel_points),
                          op.Shape(mask, start=2), axis=0)
        offset = zeros(op, mask, shape)
    else:
        offset = repeat_groups(op, offset, g.offset_groups, groups)
    if mask is not None:
        mask = repeat_groups(op, mask, g.mask_groups, groups)
    return op.DeformConv(input, weight, offset, bias, mask, dilations=list(g.dilation), group=g.groups,
                         kernel_shape=list(g.kernel), offset_group=groups, pads=list(g.padding) * 2,
                         strides=list(g.stride))


def _deform_conv_1d(op, g: DeformConvShape, input, weight, offset, mask, bias):
    """1d as 2d on ``(B, C, L, 1)``: kernel (k, 1), and per kernel point the displacement pair
    ``(offset, 0)``, so the unit dim is always sampled at its one integer position (exact)."""
    last = ints(op, 3)
    if offset is not None:
        column = op.Reshape(offset, ints(op, 0, 0, 1, -1))  # (B, og * K, 1, L_out)
        pairs = op.Concat(column, zeros(op, column, op.Shape(column)), axis=2)  # (B, og * K, 2, L_out)
        offset = op.Reshape(pairs, op.Concat(op.Shape(offset, end=1), ints(op, -1), op.Shape(offset, start=2),
                                             ints(op, 1), axis=0))
    if mask is not None:
        mask = op.Unsqueeze(mask, last)
    g2 = dataclasses.replace(g, in_size=(*g.in_size, 1), kernel=(*g.kernel, 1), stride=(*g.stride, 1),
                             padding=(*g.padding, 0), dilation=(*g.dilation, 1),
                             output_padding=(*g.output_padding, 0))
    out = _deform_conv_2d(op, g2, op.Unsqueeze(input, last), op.Unsqueeze(weight, last), offset, mask, bias)
    return op.Squeeze(out, last)


def _check_deform_conv(g: DeformConvShape, dtype, opset_version: int) -> None:
    if opset_version < _DEFORM_CONV_OPSET:
        raise _error(g, f"ONNX DeformConv needs opset_version >= {_DEFORM_CONV_OPSET}, got {opset_version} "
                     "(export with opset_version >= 19, or with onnx_translation_table(decompose=True))")
    if dtype == ir.DataType.BFLOAT16 and opset_version < _BFLOAT16_DEFORM_CONV_OPSET:
        raise _error(g, f"ONNX DeformConv takes bfloat16 from opset {_BFLOAT16_DEFORM_CONV_OPSET}, got "
                     f"opset_version={opset_version} (export with opset_version=22, or in float32)")


def onnxscript_opset(opset_version: int):
    """The onnxscript opset (``onnxscript.opset18`` .. ``opset23``) to build translations with.

    Raises ``ValueError`` naming ``opset_version`` outside 18..23 (the exporter starts at 18,
    onnxscript 0.7 ends at 23).
    """
    if not isinstance(opset_version, int) or isinstance(opset_version, bool) or opset_version not in _OPSETS:
        raise ValueError(f"opset_version must be an int in [{_OPSETS.start}, {_OPSETS.stop - 1}], "
                         f"got opset_version={opset_version!r}")
    return getattr(onnxscript, f"opset{opset_version}")


def _translation(opset_version: int, decompose: bool) -> Callable:
    op = onnxscript_opset(opset_version)

    def dcn_plugin_deform_conv(input, weight, offset, mask, bias, stride, padding, dilation, transposed,
                               output_padding, groups):
        """Traced by the exporter with the op's arguments; returns the output value (B, C_out, *out)."""
        g = _shape_of(input, weight, offset, mask, stride, padding, dilation, transposed, output_padding,
                      groups)
        if offset is None and mask is None:
            return _plain_conv(op, g, input, weight, bias)
        if decompose or g.transposed or g.n == 3:
            return _decomposition.deform_conv(op, g, input, weight, offset, mask, bias)
        _check_deform_conv(g, input.dtype, opset_version)
        convert = _deform_conv_1d if g.n == 1 else _deform_conv_2d
        return convert(op, g, input, weight, offset, mask, bias)

    return dcn_plugin_deform_conv


def onnx_translation_table(opset_version: int = DEFAULT_OPSET, *, decompose: bool = False) -> Dict:
    """``{op: translation}`` for ``dcn_plugin::deform_conv`` and the RoI pooling ops
    (``deform_roi_pool``, ``deform_psroi_pool``: :mod:`._roi_pool`), for ``torch.onnx.export``'s
    ``custom_translation_table`` (``dynamo=True``).

    Args:
        opset_version: the ``opset_version`` you pass to ``torch.onnx.export`` (18..23; its default is
            20). ``DeformConv`` needs 19 (22 for bfloat16); 1d and 2d below that raise
            :class:`DeformConvExportError` unless ``decompose``.
        decompose: export 1d and 2d through the standard-op decomposition instead of ``DeformConv``
            (for runtimes without ``DeformConv``; slower).
    """
    require_ops()
    op = onnxscript_opset(opset_version)

    def dcn_plugin_deform_roi_pool(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma):
        return _roi_pool.deform_roi_pool(op, input, rois, offset, output_size, spatial_scale, sampling_ratio,
                                         gamma, _roi_error)

    def dcn_plugin_deform_psroi_pool(input, rois, offset, *params):
        return _roi_pool.deform_psroi_pool(op, input, rois, offset, *params)

    return {torch.ops.dcn_plugin.deform_conv.default: _translation(opset_version, bool(decompose)),
            torch.ops.dcn_plugin.deform_roi_pool.default: dcn_plugin_deform_roi_pool,
            torch.ops.dcn_plugin.deform_psroi_pool.default: dcn_plugin_deform_psroi_pool}


def _roi_error(problem: str) -> DeformConvExportError:
    return DeformConvExportError(f"dcn_plugin::deform_roi_pool: {problem}")


def _our_error(exc: BaseException) -> Optional[DeformConvExportError]:
    while exc is not None:
        if isinstance(exc, DeformConvExportError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def export_onnx(model, args: Sequence, f=None, *, opset_version: int = DEFAULT_OPSET, decompose: bool = False,
                custom_translation_table: Optional[Dict] = None, verbose: bool = False, **kwargs):
    """``torch.onnx.export(model, args, f, dynamo=True, ...)`` with dcn_plugin's translation.

    Args:
        model, args, f: as for ``torch.onnx.export``; ``f`` (a path) may be None to only get the program.
        opset_version, decompose: see :func:`onnx_translation_table`.
        custom_translation_table: more translations (e.g. for other custom ops), merged over ours.
        verbose: the exporter's progress lines.
        **kwargs: passed on (``dynamic_shapes``, ``input_names``, ``output_names``, ``optimize``, ...).

    Returns:
        The ``torch.onnx.ONNXProgram``.

    Raises:
        DeformConvExportError: a call of the op that cannot be exported as asked (unwrapped from the
            exporter's error).
    """
    table = onnx_translation_table(opset_version, decompose=decompose)
    table.update(custom_translation_table or {})
    try:
        return torch.onnx.export(model, tuple(args), f, dynamo=True, opset_version=opset_version,
                                 custom_translation_table=table, verbose=verbose, **kwargs)
    except Exception as exc:
        ours = _our_error(exc)
        if ours is None:
            raise
        raise DeformConvExportError(str(ours)) from exc


def inference_session(model, num_threads: Optional[int] = None):
    """An onnxruntime CPU ``InferenceSession`` for ``model`` (a path, bytes or an ``ONNXProgram``).

    ``num_threads`` sets the intra-op threads (and one inter-op thread); None keeps onnxruntime's
    default. Needs onnxruntime (the ``deploy`` extra).
    """
    from .._extras import require

    require("dcn_plugin.export.inference_session", ("onnxruntime",), extra="deploy")
    import onnxruntime

    if hasattr(model, "model_proto"):
        model = model.model_proto.SerializeToString()
    options = onnxruntime.SessionOptions()
    if num_threads is not None:
        options.intra_op_num_threads = int(num_threads)
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
