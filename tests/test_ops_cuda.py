"""What only a GPU can check: CPU (C++) and CUDA (Triton) agree, torchvision's ``deform_conv2d``
agrees, indices past 2^31 elements, and half types. Every other op test runs on CUDA too, through
the ``device`` fixture, and ``test_ops_triton.py`` runs the Triton kernels' own tests on CUDA; these
are the checks that compare devices or need GPU memory.

Skipped without a GPU and triton (``torchvision`` tests also run on the CPU where it is installed).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import Case, forward_backward, make_tensors, relative_error, run_op

from dcn_plugin import ops

CASES = {
    "2d": Case.build(2, batch=3, in_channels=6, out_channels=4, in_size=(7, 9), groups=2, offset_groups=3,
                     mask_groups=2),
    "2d-stride-dilation": Case.build(2, in_channels=4, out_channels=6, in_size=9, stride=2, dilation=2,
                                     padding=2, offset_groups=2, mask_groups=0),
    "2d-depthwise": Case.build(2, in_channels=6, out_channels=6, in_size=6, groups=6, offset_groups=6,
                               mask_groups=3),
    "1d": Case.build(1, in_channels=4, out_channels=4, in_size=11, kernel=5, padding=2, offset_groups=2),
    "3d": Case.build(3, in_channels=4, out_channels=4, in_size=(4, 5, 3), kernel=(3, 2, 3), offset_groups=2,
                     mask_groups=4),
    "2d-transposed": Case.build(2, transposed=True, in_channels=4, out_channels=6, in_size=5, stride=2,
                                output_padding=1, groups=2, offset_groups=2),
    "3d-transposed": Case.build(3, transposed=True, in_channels=4, out_channels=4, in_size=(3, 4, 3),
                                stride=2, offset_groups=1),
    "no-offset": Case.build(2, in_channels=4, out_channels=4, in_size=6, offset_groups=0, mask_groups=1),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(CASES))
def test_cpu_and_cuda_agree(cuda_device, name, dtype):
    case = CASES[name]
    assert case.is_valid(), name
    cpu = make_tensors(case, dtype=dtype)
    gpu = {k: None if t is None else t.to(cuda_device) for k, t in cpu.items()}
    out_cpu, grads_cpu = forward_backward(run_op, case, cpu)
    out_gpu, grads_gpu = forward_backward(run_op, case, gpu)
    tol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, **tol)
    assert grads_gpu.keys() == grads_cpu.keys()
    for key in grads_cpu:
        torch.testing.assert_close(grads_gpu[key].cpu(), grads_cpu[key], **tol,
                                   msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_types(cuda_device, dtype):
    """Outputs and gradients come back in the half dtype, close to the float32 result."""
    case = CASES["2d"]
    full = make_tensors(case, dtype=torch.float32, device=cuda_device)
    half = {k: None if t is None else t.to(dtype) for k, t in full.items()}
    out, grads = forward_backward(run_op, case, half)
    expected, expected_grads = forward_backward(run_op, case, {k: None if t is None else t.float()
                                                              for k, t in half.items()})
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads.values())
    eps = torch.finfo(dtype).eps
    assert relative_error(out, expected) < 8 * eps
    for key, grad in grads.items():
        assert relative_error(grad, expected_grads[key]) < 16 * eps, key


def _torchvision_deform_conv2d():
    reason = "needs torchvision, the peer compared with: pip install torchvision (with a torch it matches)"
    torchvision_ops = pytest.importorskip("torchvision.ops", reason=reason)
    return torchvision_ops.deform_conv2d


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_matches_torchvision(device, dtype, with_mask):
    """``deform_conv2d`` equals ``torchvision.ops.deform_conv2d`` in forward and every gradient
    (same offset layout: channel ``2 * (g * K + k) + {0: y, 1: x}``)."""
    deform_conv2d = _torchvision_deform_conv2d()
    case = Case.build(2, batch=2, in_channels=6, out_channels=4, in_size=(8, 7), stride=(1, 2),
                      padding=(1, 2), dilation=(2, 1), groups=2, offset_groups=3,
                      mask_groups=3 if with_mask else 0)
    tensors = make_tensors(case, dtype=dtype, device=device)

    def torchvision_run(case, t):
        return deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], stride=case.stride,
                             padding=case.padding, dilation=case.dilation, mask=t["mask"])

    out, grads = forward_backward(run_op, case, tensors)
    expected, expected_grads = forward_backward(torchvision_run, case, tensors)
    tol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, expected, **tol)
    for key in expected_grads:
        torch.testing.assert_close(grads[key], expected_grads[key], **tol, msg=lambda m, k=key: f"{k}: {m}")


def test_column_buffer_past_2_31_elements(cuda_device):
    """64 channels x 9 kernel points x 2048^2 grid points = 2.4e9 column elements, in one chunk (64-bit
    indices) and in the default chunks: with zero offsets and a mask of ones this is plain convolution."""
    size, channels = 2048, 64
    generator = torch.Generator(device=cuda_device).manual_seed(0)
    x = torch.randn(1, channels, size, size, device=cuda_device, generator=generator, dtype=torch.float16)
    weight = torch.randn(8, channels, 3, 3, device=cuda_device, generator=generator, dtype=torch.float16) / 24
    offset = torch.zeros(1, 18, size, size, device=cuda_device, dtype=torch.float16)
    mask = torch.ones(1, 9, size, size, device=cuda_device, dtype=torch.float16)
    assert channels * 9 * size * size > 2**31
    expected = F.conv2d(x.float(), weight.float(), padding=1)
    for limit in (None, 3 * channels * 9 * size * size * 2):
        previous = ops.set_workspace_limit(limit) if limit else None
        try:
            out = ops.deform_conv2d(x, weight, offset, mask, padding=1)
        finally:
            if previous is not None:
                ops.set_workspace_limit(previous)
        assert relative_error(out, expected) < 4 * torch.finfo(torch.float16).eps, limit
        del out
    torch.cuda.empty_cache()
