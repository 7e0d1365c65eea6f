"""float64 ``gradcheck`` of the op for input, weight, offset, mask and bias.

Offsets have fractional parts in [0.1, 0.9] (see ``reference.random_offset``), so no sampling
position is near an integer, where N-linear interpolation is not differentiable.
"""

from __future__ import annotations

import pytest
import torch
from reference import ARGUMENTS, Case, make_tensors, run_op, run_reference

DIMS_TRANSPOSED = [(n, t) for n in (1, 2, 3) for t in (False, True)]
IDS = [f"{n}d{'-transposed' if t else ''}" for n, t in DIMS_TRANSPOSED]

# tiny shapes per dimension: (in_size, kernel); non-square kernels
SHAPES = {1: ((5,), (3,)), 2: ((4, 3), (2, 3)), 3: ((3, 2, 3), (2, 1, 2))}
TRANSPOSED_SHAPES = {1: ((3,), (3,)), 2: ((3, 2), (2, 3)), 3: ((2, 2, 2), (2, 1, 2))}


def gradcheck(case: Case, device: str, run=run_op) -> None:
    tensors = make_tensors(case, device=device, requires_grad=True)
    names = [name for name in ARGUMENTS if tensors[name] is not None]

    def fn(*args):
        return run(case, {**tensors, **dict(zip(names, args))})

    assert torch.autograd.gradcheck(
        fn, tuple(tensors[name] for name in names), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=False
    )


def _case(n: int, transposed: bool, **kwargs) -> Case:
    in_size, kernel = (TRANSPOSED_SHAPES if transposed else SHAPES)[n]
    defaults = dict(batch=2 if n < 3 else 1, in_channels=4, out_channels=2, in_size=in_size, kernel=kernel,
                    padding=0)
    case = Case.build(n, transposed=transposed, **{**defaults, **kwargs})
    assert case.is_valid(), case
    return case


@pytest.mark.parametrize("n, transposed", DIMS_TRANSPOSED, ids=IDS)
@pytest.mark.parametrize("with_offset", [True, False], ids=["offset", "no-offset"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_gradcheck_optional_arguments(device, n, transposed, with_offset, with_mask):
    case = _case(n, transposed, groups=2, offset_groups=2 if with_offset else 0,
                 mask_groups=1 if with_mask else 0, stride=2 if transposed else 1, padding=1,
                 output_padding=1 if transposed else 0)
    gradcheck(case, device)


GEOMETRIES = {
    # groups=2 with two offset groups and one mask group, strided, padded
    "g2-og2-mg1-s2-p1": dict(groups=2, offset_groups=2, mask_groups=1, stride=2, padding=1, output_padding=1),
    # one group, one offset group, two mask groups, dilated
    "g1-og1-mg2-d2-p1": dict(groups=1, offset_groups=1, mask_groups=2, dilation=2, padding=1,
                             output_padding=1),
    # mixed per-dim stride/padding/dilation, offset and mask groups crossing conv groups
    "g2-og1-mg2-mixed": dict(groups=2, offset_groups=1, mask_groups=2, stride=(2, 1, 2), padding=(0, 1, 1),
                             dilation=(1, 2, 1), output_padding=(1, 1, 0)),
    # every channel its own offset and mask group, big stride and padding
    "g1-og4-mg4-s3-p2": dict(groups=1, offset_groups=4, mask_groups=4, stride=3, padding=2,
                             output_padding=2, out_channels=4, bias=False),
}


@pytest.mark.parametrize("n, transposed", DIMS_TRANSPOSED, ids=IDS)
@pytest.mark.parametrize("geometry", list(GEOMETRIES.values()), ids=list(GEOMETRIES))
def test_gradcheck_geometry(device, n, transposed, geometry):
    geometry = {k: v[:n] if isinstance(v, tuple) else v for k, v in geometry.items()}
    if not transposed:
        geometry.pop("output_padding")
    gradcheck(_case(n, transposed, **geometry), device)


@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
def test_gradcheck_chunked(device, transposed, tiny_workspace):
    """Gradients stay right when the column buffer is split into many chunks."""
    gradcheck(_case(2, transposed, batch=3, groups=2, offset_groups=2, mask_groups=2, padding=1), device)


@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
def test_gradcheck_reference(transposed):
    """The reference's own gradients (the oracle of the other tests) agree with finite differences."""
    gradcheck(_case(2, transposed, groups=2, offset_groups=2, mask_groups=1, padding=1), "cpu",
              run=run_reference)
