"""OpenVINO: run the exported ONNX files, with ONNX's ``DeformConv`` as OpenVINO's own op.

OpenVINO's ONNX frontend has no conversion rule for ``DeformConv``; :func:`read_model` adds one
that maps the node to ``DeformableConvolution`` (opset 8) with ``bilinear_interpolation_pad=True``
(samples up to a pixel outside the image interpolate with zeros, as ONNX and PyTorch do) plus the
bias as an ``Add``, so the one ``.onnx`` file written for onnxruntime runs in OpenVINO too.

:func:`compile_model` compiles for the CPU in float32: on CPUs with bfloat16 instructions
OpenVINO's CPU plugin otherwise infers in bfloat16, where sampling positions of 16-32 pixels are
1/8 pixel apart, so the bilinear weights, and the outputs, are wrong (0.1-0.5 on outputs of 4-7).
Needs the ``openvino`` package (in the ``deploy`` extra).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .._extras import require

_BIAS, _MASK = 3, 4  # optional inputs of ONNX DeformConv (X, W, offset, B, mask)


def _deform_conv(node):
    """ONNX ``DeformConv`` -> OpenVINO ``DeformableConvolution`` (+ ``Add`` of the bias)."""
    import openvino.opset8 as ops

    def present(index: int) -> bool:
        # An absent optional input is missing or an empty name; the frontend gives a null output for it.
        if node.get_input_size() <= index:
            return False
        return node.get_input(index).get_node().get_type_name() != "NullNode"

    data, weight, offset = (node.get_input(i) for i in range(3))
    kernel_dims = weight.get_partial_shape().rank.get_length() - 2
    pads = list(node.get_attribute("pads", [0] * 2 * kernel_dims))
    out = ops.deformable_convolution(
        data, offset, weight,
        strides=list(node.get_attribute("strides", [1] * kernel_dims)),
        pads_begin=pads[:kernel_dims], pads_end=pads[kernel_dims:],
        dilations=list(node.get_attribute("dilations", [1] * kernel_dims)),
        mask=node.get_input(_MASK) if present(_MASK) else None,
        group=node.get_attribute("group", 1), deformable_group=node.get_attribute("offset_group", 1),
        bilinear_interpolation_pad=True,
    )
    if present(_BIAS):
        shape = ops.constant(np.array([1, -1] + [1] * kernel_dims, dtype=np.int64))
        out = ops.add(out, ops.reshape(node.get_input(_BIAS), shape, special_zero=False))
    return [out.output(0)]


def read_model(model):
    """``model`` (a path, bytes or an ``ONNXProgram``) as an ``openvino.Model``, its ``DeformConv``
    nodes as ``DeformableConvolution``."""
    require("dcn_plugin.export.openvino", ("openvino",), extra="deploy")
    import openvino as ov
    from openvino.frontend import ConversionExtension

    if hasattr(model, "model_proto"):
        model = model.model_proto.SerializeToString()
    core = ov.Core()
    core.add_extension(ConversionExtension("DeformConv", _deform_conv))
    if isinstance(model, bytes):
        return core.read_model(model=model)
    return core.read_model(str(model))


def compile_model(model, num_threads: Optional[int] = None):
    """``model`` (as :func:`read_model` takes it, or an ``openvino.Model``) compiled for the CPU in
    float32 (see the module docstring); ``num_threads`` sets the inference threads (None: OpenVINO's
    default)."""
    require("dcn_plugin.export.openvino", ("openvino",), extra="deploy")
    import openvino as ov

    if not isinstance(model, ov.Model):
        model = read_model(model)
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if num_threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(num_threads)
    return ov.Core().compile_model(model, "CPU", config)
