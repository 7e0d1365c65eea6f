"""Measures the half-type error ratios of the Triton kernels: ``python tests/half_error_ratios.py``.

For each case of ``test_half_types_at_most_three_times_conv_error`` (1d/2d/3d, forward and
transposed) and float16/bfloat16: the relative error against the float64 reference of the output and
of the input and weight gradients, divided by plain convolution's error in the same dtype against
float64 (``F.conv*``), as the test computes them. Runs the kernels under Triton's interpreter on CPU
tensors (or on CUDA where there is a GPU), and prints a Markdown table and the largest ratio.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from conftest import triton_kernels_on_cpu  # noqa: E402
from reference import _low_precision_errors, run_op  # noqa: E402
from test_ops_triton import DIMS_TRANSPOSED, IDS, half_type_case  # noqa: E402


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = ("output", "input", "weight")
    print("| case | dtype | " + " | ".join(f"{n} (op / conv error)" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    worst = {}
    with triton_kernels_on_cpu() if device == "cpu" else _nothing():
        for (n, transposed), case_id in zip(DIMS_TRANSPOSED, IDS):
            for dtype, dtype_id in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
                errors = _low_precision_errors(run_op, half_type_case(n, transposed), dtype, device)
                floor = torch.finfo(dtype).eps / 8  # as assert_low_precision_like_conv
                ratios = {name: e / max(c, floor) for name, (e, c) in errors.items()}
                worst[dtype_id] = max(worst.get(dtype_id, 0.0), *ratios.values())
                print(f"| {case_id} | {dtype_id} | " + " | ".join(f"{ratios[k]:.2f}" for k in names) + " |")
    print("largest ratio: " + ", ".join(f"{k} {v:.2f}" for k, v in worst.items()) + " (bound: 3)")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
