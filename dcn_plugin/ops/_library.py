"""Loads the compiled op library and registers its Python-side pieces once.

The schemas of ``dcn_plugin::deform_conv`` and ``dcn_plugin::deform_conv_backward`` live in
C++ (``csrc/deform_conv.cpp``), modelled on ``aten::convolution``: one op for 1d/2d/3d and for
transposed convolution; those of the deformable RoI pooling ops ``dcn_plugin::deform_roi_pool``,
``dcn_plugin::deform_psroi_pool`` and their backward ops in ``csrc/roi_pool.cpp``. Here, with
``torch.library``, we register for them:

- fake (meta) kernels, so ``torch.compile`` and ``torch.export`` can trace the op;
- autograd, through the backward op (which computes only the gradients that are needed);
- the CUDA kernels: Triton kernels (``ops/triton/``), imported on the first call on a CUDA tensor.

Autocast (the op runs in the autocast dtype, as ``conv2d`` does) is a C++ kernel
(``csrc/autocast.cpp``).
"""

from __future__ import annotations

import functools
import importlib
from typing import List, Optional

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from .shapes import DeformConvShape

_LOAD_ERROR: Optional[BaseException] = None
try:
    _C = importlib.import_module("dcn_plugin._C")
except ImportError as exc:  # pragma: no cover - depends on the build
    _C = None
    _LOAD_ERROR = exc


def has_ops() -> bool:
    """Whether the compiled op library was loaded."""
    return _C is not None


def with_cuda() -> bool:
    """Whether the ops run on CUDA tensors here: torch sees a CUDA device (or a ROCm one), triton
    imports (torch's CUDA wheels ship it) and the compiled op library (schemas) is loaded.

    The CUDA kernels are Triton kernels, compiled at run time for the GPU they run on; nothing of
    dcn_plugin is compiled for GPUs at install time.
    """
    return _C is not None and torch.cuda.is_available() and _triton_error() is None


@functools.cache
def _triton_error() -> Optional[ImportError]:
    """Why triton does not import (None when it does); imported only when asked, and once."""
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return exc
    return None


def require_ops() -> None:
    if _C is None:
        raise RuntimeError(
            "dcn_plugin's compiled ops are not available; rebuild them with "
            f"`pip install --no-build-isolation -e .` (import error: {_LOAD_ERROR!r})"
        )


def set_workspace_limit(num_bytes: int) -> int:
    """Set the memory budget (bytes) of the op's scratch buffers; returns the previous budget.

    The buffers are the im2col columns and the per-thread sums of the backward pass (the CPU kernels
    keep about 1 MiB of columns per thread unless the budget is smaller); the columns are cut into
    chunks that fit it, so any batch and image size runs in bounded extra memory. The default is
    256 MiB.
    """
    require_ops()
    if num_bytes <= 0:
        raise ValueError(f"num_bytes must be positive, got {num_bytes}")
    return int(torch.ops.dcn_plugin._set_workspace_limit(int(num_bytes)))


def _owning(t: Tensor) -> Tensor:
    """``t`` as a tensor of its own (the same memory, no copy) when it is a view of a buffer: autograd
    forbids in-place changes of a custom op's outputs that are views, such as a ``ReLU(inplace=True)``
    after the layer."""
    if t._base is None:
        return t
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


#: Op name -> the Python kernel registered for CUDA (the Triton drivers, with the output layouts
#: and ownership the fake kernels promise). The tests register the same functions as CPU kernels to
#: run them under Triton's interpreter.
TRITON_KERNELS = {}


def _triton_kernel(name: str):
    """Registers the decorated function as the CUDA kernel of ``dcn_plugin::{name}``."""

    def register(fn):
        TRITON_KERNELS[name] = fn
        return torch.library.register_kernel(f"dcn_plugin::{name}", "cuda")(fn)

    return register


def _output_format(input: Tensor, weight: Tensor) -> torch.memory_format:
    """The layout of the op's output, as torch's convolution chooses it: channels-last when the input
    or the weight is. (Each gradient takes the layout its tensor suggests.)"""
    layout = suggest_memory_format(input)
    return layout if layout != torch.contiguous_format else suggest_memory_format(weight)


if _C is not None:
    _op = torch.ops.dcn_plugin.deform_conv.default
    _backward_op = torch.ops.dcn_plugin.deform_conv_backward.default

    @torch.library.register_fake("dcn_plugin::deform_conv")
    def _deform_conv_fake(input, weight, offset, mask, bias, stride, padding, dilation, transposed,
                          output_padding, groups):
        torch._check(input.dim() == weight.dim(), lambda: "input and weight must have the same rank")
        shape = DeformConvShape.of(input, weight, offset, mask, stride, padding, dilation, transposed,
                                   output_padding, groups).output_shape
        return torch.empty(shape, dtype=input.dtype, device=input.device,
                           memory_format=_output_format(input, weight))

    @torch.library.register_fake("dcn_plugin::deform_conv_backward")
    def _deform_conv_backward_fake(grad_output, input, weight, offset, mask, stride, padding, dilation,
                                   transposed, output_padding, groups, output_mask):
        def grad_like(t, needed):
            return torch.empty_like(t, memory_format=suggest_memory_format(t)) if needed and t is not None \
                else input.new_empty((0,))

        return (grad_like(input, output_mask[0]), grad_like(weight, output_mask[1]),
                grad_like(offset, output_mask[2]), grad_like(mask, output_mask[3]))

    def _setup_context(ctx, inputs, output):
        input, weight, offset, mask, bias = inputs[:5]
        ctx.save_for_backward(input, weight, offset, mask)
        ctx.params = inputs[5:]  # stride, padding, dilation, transposed, output_padding, groups
        ctx.has_bias = bias is not None

    def _backward(ctx, grad_output):
        input, weight, offset, mask = ctx.saved_tensors
        needs = ctx.needs_input_grad
        output_mask = [needs[0], needs[1], offset is not None and needs[2], mask is not None and needs[3]]
        grads = [None] * 4
        if any(output_mask):
            result = _backward_op(grad_output, input, weight, offset, mask, *ctx.params, output_mask)
            grads = [g if m else None for g, m in zip(result, output_mask)]
        grad_bias = None
        if ctx.has_bias and needs[4]:
            grad_bias = grad_output.sum(dim=[d for d in range(grad_output.dim()) if d != 1])
        return (*grads, grad_bias, None, None, None, None, None, None)

    torch.library.register_autograd("dcn_plugin::deform_conv", _backward, setup_context=_setup_context)

    def _no_double_backward(ctx, *grads):
        raise RuntimeError(
            "dcn_plugin.deform_conv: double backward (gradients of gradients) is not supported"
        )

    def _backward_setup_context(ctx, inputs, output):
        pass

    torch.library.register_autograd(
        "dcn_plugin::deform_conv_backward", _no_double_backward, setup_context=_backward_setup_context
    )

    def _triton_driver():
        """``dcn_plugin.ops.triton.driver``, imported on first use (it imports triton)."""
        if _triton_error() is not None:
            raise RuntimeError(
                "dcn_plugin's CUDA kernels are Triton kernels, and triton does not import "
                f"({_triton_error()!r}); install the triton that matches your torch (torch's CUDA "
                "wheels depend on it, e.g. `pip install triton`)"
            )
        return importlib.import_module("dcn_plugin.ops.triton.driver")

    # The Triton kernels are registered as the ops' CUDA kernels with `register_kernel`, not with
    # `torch.library.triton_op`: triton_op defines a new op from a Python function (its schema
    # inferred from type hints), and these ops' schemas live in C++ with the CPU kernels. So
    # `torch.compile` treats the op as opaque on CUDA as on the CPU: it traces the fake kernel
    # above and calls the op at run time, where the kernels launch directly (no `wrap_triton`,
    # whose eager path goes through a higher-order op for nothing). Compiling into the kernels
    # would take a FunctionalTensorMode rule that runs the driver under tracing, as triton_op
    # does, which is not worth its risk before the kernels have run on a GPU.
    @_triton_kernel("deform_conv")
    def _deform_conv_cuda(input, weight, offset, mask, bias, stride, padding, dilation, transposed,
                          output_padding, groups):
        out = _triton_driver().deform_conv(input, weight, offset, mask, bias, stride, padding, dilation,
                                           transposed, output_padding, groups)
        return _owning(out.contiguous(memory_format=_output_format(input, weight)))  # the fakes' layouts

    @_triton_kernel("deform_conv_backward")
    def _deform_conv_backward_cuda(grad_output, input, weight, offset, mask, stride, padding, dilation,
                                   transposed, output_padding, groups, output_mask):
        grads = _triton_driver().deform_conv_backward(grad_output, input, weight, offset, mask, stride,
                                                      padding, dilation, transposed, output_padding, groups,
                                                      output_mask)
        return tuple(_owning(g if g.dim() == 1 else g.contiguous(memory_format=suggest_memory_format(t)))
                     for g, t in zip(grads, (input, weight, offset, mask)))


# --------------------------------------------------------------------------------------------
# Deformable RoI pooling: two ops of one form, (input, rois, offset, *params) -> output, with a
# backward op (grad_output, input, rois, offset, *params, output_mask) -> (grad_input, grad_offset).


def _deform_roi_pool_shape(input, rois, offset, output_size, *params) -> List[int]:
    return [rois.shape[0], input.shape[1], *output_size]


def _deform_psroi_pool_shape(input, rois, offset, spatial_scale, output_dim, group_size, pooled_size,
                             *params) -> List[int]:
    return [rois.shape[0], output_dim, pooled_size, pooled_size]


def _register_roi_op(name: str, output_shape) -> None:
    """Fake kernels, autograd (input and offset gradients; rois get none) and the Triton CUDA
    kernels of ``dcn_plugin::{name}`` and ``dcn_plugin::{name}_backward``."""
    qualname, backward_qualname = f"dcn_plugin::{name}", f"dcn_plugin::{name}_backward"
    backward_op = getattr(torch.ops.dcn_plugin, f"{name}_backward").default

    def fake(input, rois, offset, *params):
        torch._check(rois.dim() == 2, lambda: f"{name}: rois must have shape (R, 5)")
        return input.new_empty(output_shape(input, rois, offset, *params))

    def backward_fake(grad_output, input, rois, offset, *params_and_mask):
        output_mask = params_and_mask[-1]
        return (torch.empty_like(input, memory_format=torch.contiguous_format) if output_mask[0]
                else input.new_empty((0,)),
                torch.empty_like(offset, memory_format=torch.contiguous_format)
                if output_mask[1] and offset is not None else input.new_empty((0,)))

    def setup_context(ctx, inputs, output):
        input, rois, offset = inputs[:3]
        ctx.save_for_backward(input, rois, offset)
        ctx.params = inputs[3:]

    def backward(ctx, grad_output):
        input, rois, offset = ctx.saved_tensors
        needs = ctx.needs_input_grad
        output_mask = [needs[0], offset is not None and needs[2]]
        grad_input = grad_offset = None
        if any(output_mask):
            result = backward_op(grad_output, input, rois, offset, *ctx.params, output_mask)
            grad_input, grad_offset = (g if m else None for g, m in zip(result, output_mask))
        return (grad_input, None, grad_offset, *[None] * len(ctx.params))

    def no_double_backward(ctx, *grads):
        raise RuntimeError(f"dcn_plugin.{name}: double backward (gradients of gradients) is not supported")

    torch.library.register_fake(qualname)(fake)
    torch.library.register_fake(backward_qualname)(backward_fake)
    torch.library.register_autograd(qualname, backward, setup_context=setup_context)
    torch.library.register_autograd(backward_qualname, no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)

    @_triton_kernel(name)
    def cuda(*args):
        return _owning(getattr(_roi_driver(), name)(*args))

    @_triton_kernel(f"{name}_backward")
    def backward_cuda(*args):
        return tuple(_owning(g) for g in getattr(_roi_driver(), f"{name}_backward")(*args))


def _roi_driver():
    """``dcn_plugin.ops.triton.roi_pool``, imported on first use (it imports triton)."""
    _triton_driver()  # the same error when triton is missing
    return importlib.import_module("dcn_plugin.ops.triton.roi_pool")


if _C is not None:
    _register_roi_op("deform_roi_pool", _deform_roi_pool_shape)
    _register_roi_op("deform_psroi_pool", _deform_psroi_pool_shape)
