"""ONNX export of ``dcn_plugin::deform_conv``, run in onnxruntime and OpenVINO.

Every exported case runs in onnxruntime and in OpenVINO (CPU; ``DeformConv`` as OpenVINO's
``DeformableConvolution``, float32) and must match, in float32 within 1e-5, both the compiled op /
layer in PyTorch and ``tests/reference.py`` (float64, written from the definition).
Each case also checks which ONNX ops carry it (``DeformConv``, ``Conv``, or the GatherND/ScatterND
decomposition), and the cases that cannot be exported raise an error naming the case.
"""

from __future__ import annotations

import pytest
import torch
from extras import require_deploy

require_deploy()

from reference import Case, make_tensors, run_op, run_reference  # noqa: E402

from dcn_plugin.export import (  # noqa: E402
    DeformConvExportError,
    export_onnx,
    inference_session,
    onnx_translation_table,
)
from dcn_plugin.export.openvino import compile_model, read_model  # noqa: E402

TOLERANCE = 1e-5
ARGUMENTS = ("input", "weight", "offset", "mask", "bias")


class Op(torch.nn.Module):
    """The functional op of ``case`` with its tensors as graph inputs (absent ones left out)."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        self.case = case

    def forward(self, input, weight, offset=None, mask=None, bias=None):
        return run_op(self.case, dict(input=input, weight=weight, offset=offset, mask=mask, bias=bias))


def op_types(program) -> list[str]:
    return [node.op_type for node in program.model_proto.graph.node]


RUNTIMES = ["onnxruntime", "openvino"]


def runner(program, runtime: str):
    """A function from the graph's inputs (a dict of tensors, by name) to its first output."""
    if runtime == "openvino":
        compiled = compile_model(program, num_threads=1)
        names = [port.get_any_name() for port in compiled.inputs]
        output = compiled.outputs[0]
        return lambda feed: torch.from_numpy(compiled({n: feed[n].numpy() for n in names})[output])
    session = inference_session(program, num_threads=1)
    names = [i.name for i in session.get_inputs()]
    return lambda feed: torch.from_numpy(session.run(None, {n: feed[n].numpy() for n in names})[0])


def run_onnx(program, feed: dict, runtime: str = "onnxruntime") -> torch.Tensor:
    return runner(program, runtime)(feed)


def export_case(case: Case, **kwargs):
    """Exports ``case``; returns the program, the float32 tensors and the float64 reference output."""
    tensors64 = make_tensors(case)
    tensors = {name: None if t is None else t.float() for name, t in tensors64.items()}
    present = {name: tensors[name] for name in ARGUMENTS if tensors[name] is not None}
    program = export_onnx(Op(case).eval(), (), kwargs=present, **kwargs)
    return program, tensors, run_reference(case, tensors64), present


def assert_matches(actual: torch.Tensor, pytorch: torch.Tensor, reference: torch.Tensor) -> None:
    assert actual.shape == pytorch.shape == reference.shape
    assert (actual - pytorch).abs().max().item() <= TOLERANCE
    assert (actual.double() - reference).abs().max().item() <= TOLERANCE


# (case, the ONNX op that must carry it)
OP_CASES = [
    (Case.build(2, in_channels=4, out_channels=6, groups=2, offset_groups=2, mask_groups=4, stride=2,
                dilation=2), "DeformConv"),
    (Case.build(2, in_channels=4, offset_groups=4, mask_groups=2, in_size=(6, 5), kernel=(3, 2),
                padding=(1, 0)), "DeformConv"),
    (Case.build(2, offset_groups=0, mask_groups=2), "DeformConv"),  # mask only: zero offsets
    (Case.build(2, offset_groups=2, mask_groups=0, bias=False), "DeformConv"),
    (Case.build(2, offset_groups=0, mask_groups=0, stride=2), "Conv"),
    (Case.build(1, in_channels=4, out_channels=6, groups=2, offset_groups=2, mask_groups=1, stride=2,
                dilation=2, in_size=9), "DeformConv"),
    (Case.build(1, offset_groups=0, mask_groups=4), "DeformConv"),
    (Case.build(3, in_channels=4, out_channels=6, groups=2, offset_groups=2, mask_groups=1, in_size=4,
                stride=(1, 2, 1)), "GatherND"),
    (Case.build(1, in_channels=4, out_channels=8, groups=2, offset_groups=2, mask_groups=4, stride=2,
                output_padding=1, dilation=2, transposed=True), "ScatterND"),
    (Case.build(2, in_channels=6, out_channels=4, groups=2, offset_groups=4, mask_groups=2, stride=2,
                padding=(1, 0), output_padding=(1, 0), transposed=True, in_size=(4, 3)), "ScatterND"),
    (Case.build(3, in_channels=4, out_channels=4, offset_groups=1, mask_groups=2, stride=2, in_size=3,
                transposed=True, bias=False), "ScatterND"),
    (Case.build(2, offset_groups=0, mask_groups=0, stride=2, output_padding=1, transposed=True),
     "ConvTranspose"),
]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("case, onnx_op", OP_CASES, ids=[case.describe() for case, _ in OP_CASES])
def test_op_matches_pytorch_and_reference(case, onnx_op, runtime):
    assert case.is_valid()
    program, tensors, reference, present = export_case(case)
    assert onnx_op in op_types(program)
    assert_matches(run_onnx(program, present, runtime), run_op(case, tensors), reference)


def test_openvino_compiles_in_float32():
    """compile_model asks OpenVINO's CPU plugin for float32. Where the plugin's default is bfloat16
    (CPUs with bfloat16 instructions), the default is visibly wrong on a decomposed layer: the
    sampling positions lose their fractions."""
    import openvino as ov

    case, _ = OP_CASES[7]  # 3d: the GatherND decomposition
    program, tensors, _, present = export_case(case)
    compiled = compile_model(program, num_threads=1)
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    if ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT") == ov.Type.bf16:
        default = ov.Core().compile_model(read_model(program), "CPU")
        names = [port.get_any_name() for port in default.inputs]
        out = torch.from_numpy(default({n: present[n].numpy() for n in names})[default.outputs[0]])
        assert (out - run_op(case, tensors)).abs().max().item() > 1e-3


def test_deform_conv_has_no_mask_input_without_a_mask():
    program, *_ = export_case(Case.build(2, offset_groups=2, mask_groups=0))
    (node,) = [n for n in program.model_proto.graph.node if n.op_type == "DeformConv"]
    assert len(node.input) <= 4 and [a.i for a in node.attribute if a.name == "offset_group"] == [2]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("opset", [18, 19, 22])
def test_decomposition_and_opsets(opset, runtime):
    """2d through the decomposition (any opset >= 18) and through DeformConv at 19 and 22."""
    case = Case.build(2, in_channels=4, out_channels=6, offset_groups=4, mask_groups=2, stride=2, dilation=2)
    decompose = opset == 18
    program, tensors, reference, present = export_case(case, opset_version=opset, decompose=decompose)
    assert program.model_proto.opset_import[0].version == opset
    assert ("DeformConv" in op_types(program)) != decompose
    assert_matches(run_onnx(program, present, runtime), run_op(case, tensors), reference)


# --------------------------------------------------------------------------------------------------
# The config-facing layers, exported with a dynamic batch and spatial size.


def _layers():
    from dcn_plugin.layers import DCN, DCN1d, DCN3d, DCNTranspose2d, DCNv2, DCNv3

    return {
        "DCN": lambda: DCN(4, 6, 3, padding=1, deform_groups=2, bias=True),
        "DCNv2": lambda: DCNv2(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, deform_groups=2,
                               mask_groups=4),
        "DCNv3": lambda: DCNv3(8, 8, 3, padding=1, groups=2, deform_groups=4),
        "DCN1d": lambda: DCN1d(4, 6, 5, stride=2, padding=2, modulated=True, deform_groups=2, mask_groups=1),
        "DCN3d": lambda: DCN3d(2, 4, 3, padding=1, modulated=True),
        "DCNTranspose2d": lambda: DCNTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1,
                                                 modulated=True, deform_groups=2),
    }


LAYER_ONNX_OP = {"DCN": "DeformConv", "DCNv2": "DeformConv", "DCNv3": "DeformConv", "DCN1d": "DeformConv",
                 "DCN3d": "GatherND", "DCNTranspose2d": "ScatterND"}


def _layer_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """The reference (float64) on the offset and mask the layer generates for ``x``."""
    from reference import deform_conv_reference, deform_conv_transpose_reference

    with torch.no_grad():
        offset, mask = layer.offset_mask(x)
    args = [x.double(), layer.weight.double(), offset.double(), None if mask is None else mask.double(),
            None if layer.bias is None else layer.bias.double(), layer.stride, layer.padding]
    if layer.transposed:
        return deform_conv_transpose_reference(*args, layer.output_padding, layer.dilation, layer.groups)
    return deform_conv_reference(*args, layer.dilation, layer.groups)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("name", sorted(LAYER_ONNX_OP))
def test_layer_with_dynamic_batch_and_size(name, runtime):
    torch.manual_seed(0)
    layer = _layers()[name]().eval()
    with torch.no_grad():  # offsets of a few pixels, masks away from 0.5
        layer.conv_offset.weight.normal_(0.0, 0.5)
        layer.conv_offset.bias.normal_(0.0, 1.0)
    n = len(layer.kernel_size)
    dims = {0: torch.export.Dim.DYNAMIC, **{2 + d: torch.export.Dim.DYNAMIC for d in range(n)}}
    program = export_onnx(layer, (torch.randn(2, layer.in_channels, *[6] * n),), dynamic_shapes=(dims,))
    assert LAYER_ONNX_OP[name] in op_types(program)
    if name == "DCNv3":
        assert "Softmax" in op_types(program)
    run = runner(program, runtime)
    (input_name,) = [i.name for i in program.model_proto.graph.input]
    for shape in [(3, *[7] * n), (1, *range(5, 5 + n))]:
        x = torch.randn(shape[0], layer.in_channels, *shape[1:])
        actual = run({input_name: x})
        with torch.no_grad():
            assert_matches(actual, layer(x), _layer_reference(layer, x))


# --------------------------------------------------------------------------------------------------
# What cannot be exported says so, naming the op, the case and what is supported.


def _dcnv2(dtype=torch.float32):
    from dcn_plugin.layers import DCNv2

    return DCNv2(4, 4, 3, padding=1).to(dtype).eval(), torch.randn(1, 4, 5, 5, dtype=dtype)


def test_deform_conv_below_opset_19_is_refused():
    layer, x = _dcnv2()
    with pytest.raises(DeformConvExportError) as info:
        export_onnx(layer, (x,), opset_version=18)
    message = str(info.value)
    assert "dcn_plugin::deform_conv: cannot export a 2d deformable convolution" in message
    assert "ONNX DeformConv needs opset_version >= 19, got 18" in message
    assert "decompose=True" in message and "supported:" in message


def test_bfloat16_needs_opset_22():
    layer, x = _dcnv2(torch.bfloat16)
    with pytest.raises(DeformConvExportError, match="takes bfloat16 from opset 22, got opset_version=20"):
        export_onnx(layer, (x,), opset_version=20)
    program = export_onnx(layer, (x,), opset_version=22)
    assert "DeformConv" in op_types(program)


def test_plain_torch_onnx_export_shows_the_same_error():
    layer, x = _dcnv2()
    with pytest.raises(Exception, match="ONNX DeformConv needs opset_version >= 19, got 18"):
        torch.onnx.export(layer, (x,), dynamo=True, opset_version=18,
                          custom_translation_table=onnx_translation_table(18))


@pytest.mark.parametrize("opset", [17, 24, "20"])
def test_bad_opset_argument(opset):
    expected = f"opset_version must be an int in \\[18, 23\\], got opset_version={opset!r}"
    with pytest.raises(ValueError, match=expected):
        onnx_translation_table(opset)
