"""The Triton kernel of the RoI pooling ops (``dcn_plugin/ops/triton/roi_pool.py``) against
``tests/roi_reference.py``.

Each test runs through the ``triton_device`` fixture (conftest.py): on CPU tensors under Triton's
interpreter, with the ops' CPU kernels replaced by the Triton driver, so that the public API,
autograd and the ops' C++ argument checks run the kernel as on a GPU; and on CUDA tensors through
the registered CUDA kernels where there is a GPU. The interpreter is slow, so the cases are tiny.
"""

from __future__ import annotations

import pytest
import torch
from roi_reference import RoiCase, make_roi_tensors, roi_forward_backward, run_roi_op
from test_ops_triton import (
    NO_TRITON,
    TRITON_IMPORTABLE,
    compile_for_gpus,
    run_without_host_reads,
)
from test_roi_pool import CASES, assert_half_type_like_plain_torch, assert_matches_reference

from dcn_plugin import ops


def _tiny(name: str, **changes) -> RoiCase:
    return CASES[name].replace(**{"size": (6, 7), **changes})


@pytest.mark.parametrize("name", ["roi", "roi-adaptive", "roi-no-offset", "psroi", "psroi-classes",
                                  "psroi-parts-finer"])
def test_float64_against_reference(triton_device, name):
    case = _tiny(name)
    assert_matches_reference(case, make_roi_tensors(case, rois=7, device=triton_device))


@pytest.mark.parametrize("kind", ["roi", "psroi"])
def test_float32_channels_past_one_tile(triton_device, kind):
    """More channels than one program's tile (64), in float32."""
    case = _tiny(kind, channels=70, size=(5, 6))
    tensors = make_roi_tensors(case, rois=3, dtype=torch.float32, device=triton_device, seed=2)
    assert_matches_reference(case, tensors, float64=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["roi", "psroi"])
def test_half_types(triton_device, kind, dtype):
    assert_half_type_like_plain_torch(_tiny(kind, channels=8), dtype, triton_device, rois=4)


@pytest.mark.parametrize("kind", ["roi", "psroi"])
def test_no_rois(triton_device, kind):
    case = _tiny(kind)
    tensors = make_roi_tensors(case, rois=0, device=triton_device)
    out, grads = roi_forward_backward(run_roi_op, case, tensors)
    assert out.shape == (0, case.channels, *case.pooled)
    assert not grads["input"].any() and grads["offset"].shape == case.offset_shape(0)


@pytest.mark.parametrize("output_mask", [[True, False], [False, True]], ids=["input", "offset"])
@pytest.mark.parametrize("kind", ["roi", "psroi"])
def test_only_requested_gradients(triton_device, kind, output_mask):
    case = _tiny(kind)
    t = make_roi_tensors(case, rois=4, device=triton_device)
    grad_output = torch.randn(4, case.channels, *case.pooled, dtype=torch.float64, device=triton_device)
    result = case.backward_op(grad_output, t["input"], t["rois"], t["offset"], *case.params(), output_mask)
    both = case.backward_op(grad_output, t["input"], t["rois"], t["offset"], *case.params(), [True, True])
    for grad, full, wanted in zip(result, both, output_mask):
        if wanted:
            torch.testing.assert_close(grad, full)
        else:
            assert grad.shape == (0,)


@pytest.mark.parametrize("kind", ["roi", "psroi"])
def test_deterministic_mode(triton_device, kind):
    """The input gradient is scattered with atomic adds: under deterministic mode it raises an error
    naming the op (a warning in warn-only mode); the offset gradient is bitwise repeatable."""
    case = _tiny(kind)
    t = make_roi_tensors(case, rois=5, dtype=torch.float32, device=triton_device)
    grad_output = torch.randn(5, case.channels, *case.pooled, device=triton_device)
    args = (grad_output, t["input"], t["rois"], t["offset"], *case.params())
    op_name = f"dcn_plugin::{'deform_roi_pool' if kind == 'roi' else 'deform_psroi_pool'}_backward"
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match=f"{op_name}.*determinis"):
            case.backward_op(*args, [True, False])
        first = case.backward_op(*args, [False, True])[1]
        second = case.backward_op(*args, [False, True])[1]
        assert first.numel() > 0 and torch.equal(first, second)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match=op_name):
            case.backward_op(*args, [True, False])
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@pytest.mark.parametrize("kind", ["roi", "psroi"])
def test_no_host_synchronisation(triton_device, kind):
    """Forward and backward on the Triton kernel read nothing on the host: the batch indices of the
    RoIs are checked with a device-side assert, every decision comes from shapes."""
    case = _tiny(kind)
    tensors = make_roi_tensors(case, rois=3, device=triton_device)
    grad = torch.randn(3, case.channels, *case.pooled, dtype=torch.float64, device=triton_device)
    run_without_host_reads(run_roi_op, case, tensors, grad)


def test_bad_arguments_are_checked_first(triton_device):
    """The driver runs the ops' C++ argument checks (and the batch index check) first."""
    from dcn_plugin.ops.triton import roi_pool

    case = _tiny("roi")
    t = make_roi_tensors(case, rois=3, device=triton_device)
    rois = t["rois"].clone()
    rois[2, 0] = 7
    if triton_device == "cpu":  # on a GPU, a device-side assert, which would end the CUDA context
        with pytest.raises(RuntimeError, match=r"deform_roi_pool: column 0 of rois must hold batch "
                                               r"indices of the input, integers in \[0, 2\)"):
            roi_pool.deform_roi_pool(t["input"], rois, t["offset"], *case.params())
    with pytest.raises(RuntimeError, match=r"deform_psroi_pool: input must have output_dim \* group_size\^2"):
        roi_pool.deform_psroi_pool(t["input"], t["rois"], None, 0.5, 3, 2, 3, 3, 1, 0.0)


@pytest.mark.skipif(not TRITON_IMPORTABLE, reason=NO_TRITON)
def test_table_columns_are_the_cpp_layout():
    """The Triton kernel reads the RoI table by the column names C++ defines (RoiColumn in
    csrc/roi_pool.h): a table the C++ op builds for a known RoI has each value in its named column."""
    from dcn_plugin.ops.triton import roi_pool

    # mmcv's rule at spatial_scale 0.5: corner (x1, y1) * 0.5 - 0.5, size (x2 - x1, y2 - y1) * 0.5,
    # and adaptive sampling: ceil(size / pooled) samples per bin along each axis.
    input = torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    rois = torch.tensor([[1.0, 2, 4, 14, 12]], dtype=torch.float64)  # batch index, x1, y1, x2, y2
    table = torch.ops.dcn_plugin._deform_roi_pool_table(input, rois, None, [2, 2], 0.5, 0, 0.1, None)
    expected = {"batch": 1, "y0": 1.5, "x0": 0.5, "height": 4, "width": 6, "grid_h": 2, "grid_w": 3}
    assert sorted(roi_pool.TABLE_COLUMNS.values()) == list(range(table.shape[1]))
    assert {name: table[0, roi_pool.TABLE_COLUMNS[name]].item() for name in expected} == expected



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_table_dtype_is_the_accumulate_dtype(dtype):
    """The Triton kernel computes in ``shapes.accumulate_dtype`` of the input and reads the RoI table,
    which C++ builds in its compute dtype (csrc/compute_dtype.h), in that dtype: the two rules agree."""
    from dcn_plugin.ops.shapes import accumulate_dtype

    input = torch.zeros(1, 1, 4, 4, dtype=dtype)
    rois = torch.tensor([[0.0, 0, 0, 2, 2]], dtype=dtype)
    table = torch.ops.dcn_plugin._deform_roi_pool_table(input, rois, None, [1, 1], 1.0, 0, 0.1, None)
    assert table.dtype == accumulate_dtype(dtype)

@pytest.mark.parametrize("kind", ["roi", "psroi"])
def test_opcheck(triton_device, kind):
    case = _tiny(kind, batch=1, size=(4, 5))
    t = make_roi_tensors(case, rois=2, device=triton_device)
    t["input"].requires_grad_()
    t["offset"].requires_grad_()
    torch.library.opcheck(case.op.default, (t["input"], t["rois"], t["offset"], *case.params()))


def test_compile_fullgraph(triton_device):
    """The ops are opaque to torch.compile (their fake kernels are traced): the compiled graph calls
    the Triton kernels at run time."""
    case = _tiny("roi")
    t = make_roi_tensors(case, rois=3, dtype=torch.float32, device=triton_device)

    def fn(x, rois, offset):
        return ops.deform_roi_pool(x, rois, offset, case.output_size, case.spatial_scale, case.sampling_ratio,
                                   case.gamma).relu()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    args = (t["input"], t["rois"], t["offset"])
    torch.testing.assert_close(compiled(*args), fn(*args))


@pytest.mark.skipif(not TRITON_IMPORTABLE, reason=NO_TRITON)
def test_kernel_compiles_for_a_gpu():
    """Every launch variant of the RoI kernel (each rule, pass, dtype and block size the driver
    picks) compiles for NVIDIA sm_90 and AMD gfx942."""
    from triton_compile_check import launch_variants

    compile_for_gpus([spec for spec in launch_variants() if spec.startswith("roi,")])
