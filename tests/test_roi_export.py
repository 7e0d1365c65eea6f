"""ONNX export of the deformable RoI pooling ops, run in onnxruntime and OpenVINO.

Every case of ``roi_reference.ROI_CASES`` (RoIs inside the map, partly and wholly outside, of zero
width or height, inverted, larger than the map) is exported with a dynamic number of RoIs and run
with 0, 1 and 9 RoIs; the outputs must match, within 1e-5, the op in PyTorch and the float64
reference written from the definition. ``deform_roi_pool`` without offsets must be ONNX's
``RoiAlign``; with offsets, and ``deform_psroi_pool``, standard ops (``Gather``).
"""

from __future__ import annotations

import pytest
import torch
from extras import require_deploy

require_deploy()

from roi_reference import ROI_CASES, make_roi_tensors, run_roi_op, run_roi_reference  # noqa: E402
from test_onnx_export import RUNTIMES, op_types, runner  # noqa: E402

from dcn_plugin.export import DeformConvExportError, export_onnx  # noqa: E402

TOLERANCE = 1e-5
EXPORTABLE = [name for name, case in ROI_CASES.items() if not (case.offset and case.kind == "roi"
                                                               and case.sampling_ratio == 0)]


class RoiOp(torch.nn.Module):
    """One case's op with input, rois and offset as graph inputs."""

    def __init__(self, case) -> None:
        super().__init__()
        self.case = case

    def forward(self, input, rois, offset=None):
        return run_roi_op(self.case, dict(input=input, rois=rois, offset=offset))


def export_case(case):
    """The case exported in float32 with a dynamic number of RoIs."""
    tensors = {k: v.float() for k, v in make_roi_tensors(case, rois=9).items() if v is not None}
    rois = {0: torch.export.Dim.DYNAMIC}
    dynamic = dict(input=None, rois=rois, **({"offset": rois} if "offset" in tensors else {}))
    return export_onnx(RoiOp(case).eval(), (), kwargs=tensors, dynamic_shapes=dynamic)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("name", EXPORTABLE)
def test_roi_op_matches_pytorch_and_reference(name, runtime):
    case = ROI_CASES[name]
    program = export_case(case)
    wanted = "RoiAlign" if case.kind == "roi" and not case.offset else "Gather"
    assert wanted in op_types(program)
    run = runner(program, runtime)
    for count in (9, 1, 0):
        tensors64 = make_roi_tensors(case, rois=count, seed=count)
        tensors = {k: None if v is None else v.float() for k, v in tensors64.items()}
        actual = run({k: v for k, v in tensors.items() if v is not None})
        pytorch, reference = run_roi_op(case, tensors), run_roi_reference(case, tensors64)
        assert actual.shape == pytorch.shape == reference.shape == (count, case.channels, *case.pooled)
        if count:
            assert (actual - pytorch).abs().max().item() <= TOLERANCE
            assert (actual.double() - reference).abs().max().item() <= TOLERANCE


def test_adaptive_sampling_with_offsets_is_refused():
    case = ROI_CASES["roi-adaptive"]
    assert case.offset and case.sampling_ratio == 0
    with pytest.raises(DeformConvExportError, match="sampling_ratio=0.*set sampling_ratio > 0"):
        export_case(case)
