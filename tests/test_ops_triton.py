"""The Triton kernels (``dcn_plugin/ops/triton/``) against ``tests/reference.py``.

Each test runs twice through the ``triton_device`` fixture (conftest.py): on CPU tensors under
Triton's interpreter, with the ops' CPU kernels replaced by the Triton driver for the test, so
that the public API, autograd and the op's argument checks run the Triton kernels exactly as on a
GPU; and on CUDA tensors through the registered CUDA kernels, where there is a GPU. The
interpreter is slow (numpy per program instance), so the cases are tiny and cover the grid of
dims x transposed x offset/mask presence x groups, offset groups and mask groups x stride,
padding, dilation and non-square kernels x dtypes along a few lines rather than its product.

The last tests compile the kernels for GPUs (sm_90, gfx942) without one: the interpreter accepts some
Python that Triton's compiler does not.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from reference import (
    Case,
    assert_low_precision_like_conv,
    forward_backward,
    make_tensors,
    relative_error,
    run_op,
    run_reference,
)

from dcn_plugin import ops

NAMES = ("input", "weight", "offset", "mask")
DIMS_TRANSPOSED = [(n, t) for n in (1, 2, 3) for t in (False, True)]
IDS = [f"{n}d{'-transposed' if t else ''}" for n, t in DIMS_TRANSPOSED]


def _cpu64(tensors):
    return {k: None if t is None else t.detach().cpu().double() for k, t in tensors.items()}


def assert_matches_reference(case: Case, device: str, dtype=torch.float64, seed: int = 0, **tensors_override):
    """Output and the gradient of every present argument equal the float64 reference: to rounding
    in float64, to a relative 1e-5 in float32."""
    tensors = {**make_tensors(case, dtype=dtype, device=device, seed=seed), **tensors_override}
    out, grads = forward_backward(run_op, case, tensors)
    expected, expected_grads = forward_backward(run_reference, case, _cpu64(tensors))
    assert out.shape == expected.shape and out.dtype == dtype and out.device.type == device
    assert grads.keys() == expected_grads.keys()
    if dtype == torch.float64:
        torch.testing.assert_close(out.cpu(), expected, atol=1e-10, rtol=1e-8)
    else:
        assert relative_error(out, expected) < 1e-5
    for name, grad in grads.items():
        assert grad.shape == tensors[name].shape and grad.dtype == dtype, name
        if dtype == torch.float64:
            torch.testing.assert_close(grad.cpu(), expected_grads[name], atol=1e-10, rtol=1e-8,
                                       msg=lambda m, name=name: f"grad of {name}: {m}")
        else:
            assert relative_error(grad, expected_grads[name]) < 1e-5, name


def _op_args(case: Case, tensors, bias: bool = True) -> list:
    """The raw op's arguments (with ``bias=False``: the backward op's, before its output mask)."""
    params = [list(case.stride), list(case.padding), list(case.dilation), case.transposed,
              list(case.output_padding), case.groups]
    head = [tensors["input"], tensors["weight"], tensors["offset"], tensors["mask"]]
    return head + ([tensors["bias"]] if bias else []) + params


def _grad_output(case: Case, device: str, dtype=torch.float64):
    return torch.randn(case.batch, case.out_channels, *case.out_size, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(1)).to(device, dtype)


def _case(n: int, transposed: bool, **kwargs) -> Case:
    """A tiny case: 4 channels, 2 groups, offset groups 2 and mask groups 1 unless overridden;
    sizes and kernels shrink with the dims so that 3d stays cheap under the interpreter."""
    defaults = dict(batch=2, in_channels=4, out_channels=4, in_size=(9, 5, 3)[n - 1],
                    kernel=((3,), (3, 2), (2, 2, 2))[n - 1], stride=2 if transposed else 1, padding=1,
                    output_padding=1 if transposed else 0, groups=2, offset_groups=2, mask_groups=1)
    case = Case.build(n, transposed=transposed, **{**defaults, **kwargs})
    assert case.is_valid(), case
    return case


# Along each line of the grid, one change from the default case (see _case).
VARIANTS = {
    "default": {},
    # no offset; mask groups of their own; dilation; no convolution groups
    "mask-only": dict(groups=1, offset_groups=0, mask_groups=2, dilation=2, padding=2),
    # no mask; strides and paddings that differ per dim; 3 offset groups over 6 channels
    "offset-only": dict(in_channels=6, out_channels=6, offset_groups=3, mask_groups=0, stride=(2, 1, 2),
                        padding=(0, 1, 1), output_padding=(1, 0, 1)),
    # neither: exactly (transposed) convolution, through the same kernels
    "neither": dict(offset_groups=0, mask_groups=0, bias=False),
    # offset and mask groups that nest in neither direction (tiles of lcm(2, 3) = 6 groups)
    "og2-mg3": dict(in_channels=6, out_channels=6, groups=3, offset_groups=2, mask_groups=3),
    # depthwise: one channel per group on both sides
    "depthwise": dict(groups=4, offset_groups=4, mask_groups=2),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("n, transposed", DIMS_TRANSPOSED, ids=IDS)
def test_float64_against_reference(triton_device, n, transposed, variant):
    kwargs = {k: v[:n] if isinstance(v, tuple) else v for k, v in VARIANTS[variant].items()}
    if not transposed:
        kwargs.pop("output_padding", None)
    assert_matches_reference(_case(n, transposed, **kwargs), triton_device)


@pytest.mark.parametrize("n, transposed", DIMS_TRANSPOSED, ids=IDS)
def test_float32_against_reference(triton_device, n, transposed):
    case = _case(n, transposed, in_channels=6, out_channels=6, offset_groups=3, mask_groups=2)
    assert_matches_reference(case, triton_device, dtype=torch.float32, seed=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("n, transposed", DIMS_TRANSPOSED, ids=IDS)
def test_half_types_at_most_three_times_conv_error(triton_device, n, transposed, dtype):
    """Columns and matrix products in the half type (float32 accumulation), positions, coordinate
    gradients and sums in float32: at most 3x plain convolution's error in that dtype (DESIGN.md's
    bound where columns are stored in the half type; measured ratios: tests/half_error_ratios.py)."""
    assert_low_precision_like_conv(run_op, half_type_case(n, transposed), dtype, triton_device, factor=3)


def half_type_case(n: int, transposed: bool) -> Case:
    """The half-type tests' case (tests/half_error_ratios.py measures the same)."""
    return _case(n, transposed, in_channels=8, out_channels=8, in_size=(24, 7, 4)[n - 1],
                 kernel=((3,), (3, 3), (2, 3, 2))[n - 1], offset_groups=2, mask_groups=2)


def test_half_type_columns(triton_device, monkeypatch):
    """In float16 the kernel writes its columns in float16 (the matrix products' dtype), not float32."""
    from dcn_plugin.ops.triton import driver, kernels

    seen = []
    sample = kernels.sample

    def spy(launch):
        seen.extend(t.dtype for t in (launch.columns, launch.grad_columns) if t is not None)
        sample(launch)

    monkeypatch.setattr(driver, "sample", spy)
    case = _case(2, False, in_size=5)
    tensors = make_tensors(case, device=triton_device)
    tensors = {k: None if t is None else t.half() for k, t in tensors.items()}
    forward_backward(run_op, case, tensors)
    assert seen and set(seen) == {torch.float16}


@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("n, transposed", [(1, False), (2, True), (3, False)],
                         ids=["1d", "2d-transposed", "3d"])
def test_batch_sizes(triton_device, n, transposed, batch):
    """Empty batches (no launch at all; a zero weight gradient), one image (no reordering of the
    grid-side tensors), and several images whose columns share chunks."""
    assert_matches_reference(_case(n, transposed, batch=batch), triton_device)


@pytest.mark.parametrize("budget", [1 << 12, 1 << 14], ids=["within-images", "across-images"])
@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
def test_workspace_chunks(triton_device, transposed, budget):
    """Chunks of columns from a few columns (chunks not multiples of the kernel's blocks) to
    runs of several whole images (chunks that start and end inside an image)."""
    case = _case(2, transposed, batch=3, in_size=6, offset_groups=2, mask_groups=2)
    previous = ops.set_workspace_limit(budget)
    try:
        assert_matches_reference(case, triton_device)
    finally:
        ops.set_workspace_limit(previous)


def test_columns_past_one_block(triton_device):
    """More columns than one program covers, and more channels than one tile, in one chunk."""
    case = Case.build(2, batch=2, in_channels=36, out_channels=3, in_size=(7, 11), kernel=(1, 2),
                      padding=0, offset_groups=1, mask_groups=2)
    assert_matches_reference(case, triton_device, dtype=torch.float32)


@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
def test_colliding_samples(triton_device, transposed):
    """Every sample of the batch lands in the same cell (at (1.25, 2.75)), so the scatter's atomic
    adds collide within a program and across programs."""
    case = _case(2, transposed, in_size=5, offset_groups=1, mask_groups=1)
    kernel = torch.meshgrid(*[torch.arange(k) for k in case.kernel], indexing="ij")
    grid = torch.meshgrid(*[torch.arange(size) for size in case.grid_size], indexing="ij")
    offset = torch.empty(case.batch, case.kernel_points, 2, *case.grid_size, dtype=torch.float64)
    for d, target in enumerate((1.25, 2.75)):
        base = grid[d] * case.stride[d] - case.padding[d] + (kernel[d] * case.dilation[d]).reshape(-1, 1, 1)
        offset[:, :, d] = target - base
    assert_matches_reference(case, triton_device, offset=offset.flatten(1, 2).to(triton_device))


def test_non_contiguous_and_channels_last(triton_device):
    case = _case(2, False, in_size=6)
    tensors = make_tensors(case, device=triton_device)
    wide_offset = torch.zeros(*tensors["offset"].shape[:-1], 2 * tensors["offset"].shape[-1],
                              dtype=torch.float64, device=triton_device)
    wide_offset[..., ::2] = tensors["offset"]
    channels_last = tensors["input"].to(memory_format=torch.channels_last)
    assert_matches_reference(case, triton_device, input=channels_last, offset=wide_offset[..., ::2])


# ------------------------------------------------------------------------------------------------
# Gradients that are asked for, deterministic mode.


@pytest.mark.parametrize("output_mask", [[True, False, False, False], [False, True, False, False],
                                         [False, False, True, False], [False, False, False, True],
                                         [False, True, True, True]],
                         ids=["input", "weight", "offset", "mask", "all-but-input"])
@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
def test_only_requested_gradients(triton_device, transposed, output_mask):
    """The backward op returns exactly the gradients asked for (others empty), each right."""
    case = _case(2, transposed, in_size=5)
    tensors = make_tensors(case, device=triton_device)
    grad_output = _grad_output(case, triton_device)
    result = torch.ops.dcn_plugin.deform_conv_backward(grad_output, *_op_args(case, tensors, bias=False),
                                                       output_mask)
    leaves = {k: None if v is None else v.requires_grad_(True) for k, v in _cpu64(tensors).items()}
    (run_reference(case, leaves) * grad_output.cpu()).sum().backward()  # loss = <out, grad_output>
    for name, grad, wanted in zip(NAMES, result, output_mask):
        if wanted:
            assert grad.shape == tensors[name].shape, name
            torch.testing.assert_close(grad.cpu(), leaves[name].grad, atol=1e-10, rtol=1e-8, msg=name)
        else:
            assert grad.shape == (0,), name


@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
def test_deterministic_mode(triton_device, transposed):
    """The scatter onto the image (the transposed op's output, the input gradient of convolution)
    raises under deterministic mode, naming the op; warns in warn-only mode. The offset, mask and
    weight gradients are computed without it and are bitwise repeatable."""
    case = _case(2, transposed, in_size=5)
    tensors = make_tensors(case, dtype=torch.float32, device=triton_device)
    args = _op_args(case, tensors, bias=False)
    grad_output = _grad_output(case, triton_device, torch.float32)

    def scatter():
        if transposed:
            return torch.ops.dcn_plugin.deform_conv(*_op_args(case, tensors))
        return torch.ops.dcn_plugin.deform_conv_backward(grad_output, *args, [True, False, False, False])

    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="dcn_plugin::deform_conv.*determinis"):
            scatter()
        no_scatter = [False, True, True, True]
        first = torch.ops.dcn_plugin.deform_conv_backward(grad_output, *args, no_scatter)
        second = torch.ops.dcn_plugin.deform_conv_backward(grad_output, *args, no_scatter)
        for name, a, b in zip(NAMES[1:], first[1:], second[1:]):
            assert a.numel() > 0 and torch.equal(a, b), name
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="dcn_plugin::deform_conv"):
            scatter()
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


# ------------------------------------------------------------------------------------------------
# 64-bit indices.


def test_index_width_choice():
    """64-bit indices exactly where some tensor or index of a launch reaches 2^31 elements, judged
    from the extents alone (nothing that large is allocated)."""
    from dcn_plugin.ops.shapes import DeformConvShape
    from dcn_plugin.ops.triton.kernels import Launch, launch_extents, needs_wide_index

    assert not needs_wide_index(2**31 - 1) and needs_wide_index(2**31) and not needs_wide_index()
    small = DeformConvShape.build(2, batch=1, in_channels=4, out_channels=4, in_size=8)
    assert not needs_wide_index(*launch_extents(Launch(small, 0, 64)))
    side = 2**15  # one image of 4 x 2^30 elements, sampled on a 2 x 2 grid
    image = dataclasses.replace(small, in_size=(side, side), stride=(side // 2, side // 2))
    assert image.image_size == (side, side) and image.grid_size == (2, 2)
    assert needs_wide_index(*launch_extents(Launch(image, 0, 4)))
    # a grid of 2^30 points over a 2 x 2 image: its 18 offset channels reach 2^31 elements
    grid = dataclasses.replace(small, in_size=(2, 2), padding=(side // 2, side // 2))
    assert grid.grid_size == (side, side)
    assert needs_wide_index(*launch_extents(Launch(grid, 0, 4)))
    # columns: 4 channels x 9 kernel points x 2^26 columns in one chunk
    assert needs_wide_index(*launch_extents(Launch(small, 0, 2**26)))
    assert not needs_wide_index(*launch_extents(Launch(small, 0, 2**20)))
    # many images: the flattened (batch item, grid point) index alone
    batch = dataclasses.replace(small, batch=2**25, offset_groups=0, mask_groups=0, in_channels=0)
    assert needs_wide_index(*launch_extents(Launch(batch, 0, 4)))


@pytest.mark.parametrize("n, transposed", [(2, False), (3, True)], ids=["2d", "3d-transposed"])
def test_wide_index_path(triton_device, n, transposed, monkeypatch):
    """The 64-bit kernels on tiny tensors: the launcher picks them itself once the limit is low
    enough, and the driver can force either width."""
    from dcn_plugin.ops.triton import driver, kernels

    case = _case(n, transposed, in_size=(6, 5, 3)[n - 1], offset_groups=2, mask_groups=2)
    widths = []
    launch = kernels.sample_kernel.run

    def spy(*args, **kwargs):
        widths.append(kwargs["WIDE"])
        return launch(*args, **kwargs)

    monkeypatch.setattr(kernels.sample_kernel, "run", spy)
    monkeypatch.setattr(kernels, "INT32_LIMIT", 64)
    assert_matches_reference(case, triton_device)
    assert widths and all(widths)
    monkeypatch.setattr(kernels, "INT32_LIMIT", 2**31)
    widths.clear()
    tensors = make_tensors(case, device=triton_device)
    expected = run_reference(case, _cpu64(tensors))
    for wide in (True, False):
        out = driver.deform_conv(*_op_args(case, tensors), wide_index=wide)
        torch.testing.assert_close(out.cpu(), expected)
    assert widths == [True, False]


# ------------------------------------------------------------------------------------------------
# The op around the kernels: argument checks, opcheck, compile.


def test_bad_arguments_are_checked_first(triton_device):
    """The driver runs the op's C++ argument checks before it touches anything."""
    from dcn_plugin.ops.triton import driver

    case = _case(2, False)
    tensors = make_tensors(case, device=triton_device)
    bad = _op_args(case, {**tensors, "offset": tensors["offset"][:, :-1]})
    with pytest.raises(RuntimeError, match=r"offset has 23 channels, which is not a positive multiple of"):
        driver.deform_conv(*bad)
    grad_output = tensors["input"][:, :, :3]
    with pytest.raises(RuntimeError, match=r"grad_output has shape \[2, 4, 3, 5\] but the output has shape "
                                           r"\[2, 4, 5, 6\]"):
        driver.deform_conv_backward(grad_output, *_op_args(case, tensors, bias=False), [True] * 4)


class no_host_reads(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails every op that reads tensor data on the host or makes a shape from it (``item()``,
    ``bool(t)``, ``torch.equal``, ``nonzero``, ...): each waits for the GPU, and none can be captured
    in a CUDA graph. A Python dispatch mode sees the ops the C++ parts run too (argument checks, RoI
    tables). On CUDA, torch's sync debug mode also turns any synchronising call into an error."""

    FORBIDDEN = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "_unique2",
                 "unique_consecutive", "unique_dim", "repeat_interleave"}

    def __enter__(self):
        if torch.cuda.is_available():
            self.previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
        return super().__enter__()

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(self.previous)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.FORBIDDEN and not (name == "repeat_interleave" and (kwargs or {}).get("output_size")):
            raise AssertionError(f"{func} reads tensor data on the host (a synchronisation on a GPU)")
        return func(*args, **(kwargs or {}))


def run_without_host_reads(run, case, tensors, grad_output):
    """``run(case, leaves)`` and its backward under :class:`no_host_reads` (leaves and the output
    gradient are made before)."""
    leaves = {k: None if t is None else t.detach().clone().requires_grad_(k != "rois")
              for k, t in tensors.items()}
    with no_host_reads():
        out = run(case, leaves)
        out.backward(grad_output)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
def test_no_host_synchronisation(triton_device, transposed, dtype):
    """Forward and backward on the Triton kernels read nothing on the host: every decision comes
    from shapes."""
    case = _case(2, transposed, in_size=5)
    tensors = make_tensors(case, device=triton_device)
    tensors = {k: None if t is None else t.to(dtype) for k, t in tensors.items()}
    grad_output = _grad_output(case, triton_device, dtype)
    run_without_host_reads(run_op, case, tensors, grad_output)
    with pytest.raises(AssertionError, match="reads tensor data on the host"), no_host_reads():
        bool(tensors["weight"].sum() > 0)  # the check itself works


def test_opcheck(triton_device):
    case = _case(2, True, batch=1, in_size=3, offset_groups=1, mask_groups=2)
    tensors = make_tensors(case, device=triton_device, requires_grad=True)
    torch.library.opcheck(torch.ops.dcn_plugin.deform_conv.default, _op_args(case, tensors))


def test_compile_fullgraph(triton_device):
    """The op is opaque to torch.compile (its fake kernel is traced), so the compiled graph calls
    the Triton kernels at run time."""
    case = _case(2, False, in_size=5)
    tensors = make_tensors(case, dtype=torch.float32, device=triton_device)

    def fn(x, w, offset, mask, bias):
        out = ops.deform_conv2d(x, w, offset, mask, bias, case.stride, case.padding, case.dilation,
                                case.groups)
        return torch.relu(out)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    args = [tensors[k] for k in ("input", "weight", "offset", "mask", "bias")]
    torch.testing.assert_close(compiled(*args), fn(*args))


def test_autocast(triton_device):
    """Under autocast the op runs the kernels in the autocast dtype."""
    case = _case(2, False, in_size=5)
    tensors = make_tensors(case, dtype=torch.float32, device=triton_device)
    with torch.autocast(triton_device, dtype=torch.bfloat16):
        out = run_op(case, tensors)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, run_reference(case, _cpu64(tensors))) < 8 * torch.finfo(torch.bfloat16).eps


# ------------------------------------------------------------------------------------------------
# Registration, import hygiene, compilation for a GPU (no interpreter).

TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None
NO_TRITON = "needs triton (`pip install triton==3.9.0`, as tools/setup.sh does)"


def _env_without_interpreter() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return env


def test_cuda_kernels_registered_without_importing_triton():
    """The CUDA kernels are registered by ``import dcn_plugin``, which imports neither triton nor
    the kernels; the CPU op never needs them; ``with_cuda()`` is true only with a GPU and triton."""
    code = textwrap.dedent("""
        import sys, torch, dcn_plugin
        for op in ("dcn_plugin::deform_conv", "dcn_plugin::deform_conv_backward"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
        x = torch.randn(1, 2, 5, 5, requires_grad=True)
        dcn_plugin.ops.deform_conv2d(x, torch.randn(3, 2, 3, 3), torch.randn(1, 18, 3, 3)).sum().backward()
        assert "triton" not in sys.modules and "dcn_plugin.ops.triton" not in sys.modules, "imported"
        print(dcn_plugin.with_cuda())
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=_env_without_interpreter(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == str(torch.cuda.is_available() and TRITON_IMPORTABLE)


def compile_for_gpus(specs, targets=("cuda:90", "hip:gfx942")):
    """Compiles ``specs`` (tests/triton_compile_check.py) for ``targets`` with the installed Triton's
    own compiler (ptxas and the AMD backend ship in the wheel; no GPU needed), in a fresh process
    without the interpreter; every cell must compile. The other Tritons and targets:
    tools/triton_compile_matrix.py (CI runs it for the oldest)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_compile_check.py")
    command = [sys.executable, script, *specs, "--jobs", "2"]
    for target in targets:
        command += ["--target", target]
    result = subprocess.run(command, capture_output=True, text=True, env=_env_without_interpreter(),
                            timeout=900)
    if result.returncode == 3:  # this triton has no NVIDIA backend
        reason = result.stdout.strip().splitlines()[-1]
        pytest.skip(f"{reason}; needs a triton build with it (the PyPI wheels have it)")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": ok") == len(specs) * len(targets), result.stdout


def test_kernels_avoid_constructs_old_tritons_reject():
    """No @triton.jit function chains three boolean operands (``A or B or C``) or comparisons
    (``a < b < c``): Triton 3.0 to 3.3 reject them. CI compiles with Triton 3.0 itself (.ci/run); this
    catches the commonest case where that Triton cannot be installed."""
    import ast
    import glob

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dcn_plugin")
    found, jitted = [], 0
    for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
        with open(path) as f:
            tree = ast.parse(f.read())
        for fn in ast.walk(tree):
            decorators = [ast.unparse(d) for d in getattr(fn, "decorator_list", [])]
            if not (isinstance(fn, ast.FunctionDef) and any("jit" in d for d in decorators)):
                continue
            jitted += 1
            for node in ast.walk(fn):
                if (isinstance(node, ast.BoolOp) and len(node.values) > 2) or \
                        (isinstance(node, ast.Compare) and len(node.ops) > 1):
                    where = f"{os.path.relpath(path, root)}:{node.lineno} in {fn.name}"
                    found.append(f"{where}: {ast.unparse(node)}")
    assert jitted >= 5 and not found, found


@pytest.mark.skipif(not TRITON_IMPORTABLE, reason=NO_TRITON)
def test_kernels_compile_for_a_gpu():
    """Every launch variant of the convolution's kernel (each kind, dims, dtype, index width, block
    size the driver picks) compiles for NVIDIA sm_90 and AMD gfx942."""
    from triton_compile_check import launch_variants

    compile_for_gpus([spec for spec in launch_variants() if not spec.startswith("roi,")])
