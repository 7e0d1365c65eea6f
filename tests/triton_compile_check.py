"""Compiles dcn_plugin's Triton kernels for a GPU without one: ``python tests/triton_compile_check.py
N,DTYPE,KIND,WIDE ...`` (e.g. ``2,bf16,backward,False``) for the convolution's kernel, ``roi,DTYPE,KIND``
(e.g. ``roi,fp16,mmcv-backward``) for the RoI pooling kernel, in a process without TRITON_INTERPRET.

Triton's frontend, its NVIDIA backend and ptxas (shipped in the triton wheel) run on any machine,
so this checks on CI what the interpreter cannot: that the kernel is valid Triton, for every kind
of launch the driver makes. Prints one line per variant; exits 3 (with the reason on the last
line) where the NVIDIA backend is not available.
"""

from __future__ import annotations

import os
import sys

KINDS = {
    # flags of the forward op, the transposed op and the backward's combinations
    "forward": dict(HAS_OFFSET=True, HAS_MASK=True, COLUMNS=True),
    "forward-no-offset": dict(HAS_MASK=True, COLUMNS=True),
    "transposed": dict(HAS_OFFSET=True, HAS_MASK=True, SCATTER=True),
    "transposed-no-mask": dict(HAS_OFFSET=True, SCATTER=True),
    "backward": dict(HAS_OFFSET=True, HAS_MASK=True, COLUMNS=True, SCATTER=True, OFFSET_GRAD=True,
                     MASK_GRAD=True),
    "backward-coordinates": dict(HAS_OFFSET=True, HAS_MASK=True, OFFSET_GRAD=True, MASK_GRAD=True),
    "backward-scatter": dict(HAS_OFFSET=True, SCATTER=True),
}
FLAGS = ("HAS_OFFSET", "HAS_MASK", "COLUMNS", "SCATTER", "OFFSET_GRAD", "MASK_GRAD")


def compile_variant(n: int, dtype: str, kind: str, wide: bool, arch: int = 90) -> int:
    """Compiles one variant for ``sm_{arch}``; returns the size of its machine code."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dcn_plugin.ops.triton.kernels import BLOCK_Q, sample_kernel

    acc = "fp64" if dtype == "fp64" else "fp32"
    constants = {flag: KINDS[kind].get(flag, False) for flag in FLAGS}
    constants.update(N=n, ACC=tl.float64 if acc == "fp64" else tl.float32, WIDE=wide, BLOCK_C=16,
                     BLOCK_Q=BLOCK_Q)
    pointers = {"grad_image": acc, "partial": acc}
    names = sample_kernel.arg_names
    signature = {}
    for index, name in enumerate(names):
        if name in constants:
            signature[name] = "constexpr"
        elif index < 7:
            signature[name] = "*" + pointers.get(name, dtype)
        else:
            signature[name] = "i64" if wide else "i32"
    source = ASTSource(fn=sample_kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constants.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32))
    return len(kernel.asm["cubin"])


ROI_KINDS = {
    # (rule, flags) of the RoI pooling kernel's launches: forward, backward, each with and without offsets
    "mmcv-forward": ("mmcv", dict(FORWARD=True)),
    "mmcv-forward-offset": ("mmcv", dict(FORWARD=True, HAS_OFFSET=True)),
    "mmcv-backward": ("mmcv", dict(HAS_OFFSET=True, INPUT_GRAD=True, OFFSET_GRAD=True)),
    "rfcn-forward-offset": ("rfcn", dict(FORWARD=True, HAS_OFFSET=True)),
    "rfcn-backward": ("rfcn", dict(HAS_OFFSET=True, INPUT_GRAD=True, OFFSET_GRAD=True)),
    "rfcn-backward-input": ("rfcn", dict(INPUT_GRAD=True)),
}
ROI_RULES = {"mmcv": dict(ALIGN=0.5, MARGIN=1.0, COUNT_VALID=False),
             "rfcn": dict(ALIGN=0.0, MARGIN=0.5, COUNT_VALID=True)}
ROI_FLAGS = ("HAS_OFFSET", "FORWARD", "INPUT_GRAD", "OFFSET_GRAD")


def compile_roi_variant(dtype: str, kind: str, arch: int = 90) -> int:
    """Compiles one launch of the RoI pooling kernel for ``sm_{arch}``; returns its code size."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dcn_plugin.ops.triton.roi_pool import roi_pool_kernel

    acc = "fp64" if dtype == "fp64" else "fp32"
    rule, flags = ROI_KINDS[kind]
    constants = {**ROI_RULES[rule], **{flag: flags.get(flag, False) for flag in ROI_FLAGS}}
    constants.update(ACC=tl.float64 if acc == "fp64" else tl.float32, BLOCK_C=64)
    pointers = {"input": dtype, "table": acc, "offset": dtype, "grad_output": dtype, "output": dtype,
                "grad_input": acc, "partial": acc, "scale": acc}
    names = roi_pool_kernel.arg_names
    signature = {name: "constexpr" if name in constants else "*" + pointers[name] if name in pointers
                 else "i32" for name in names}
    source = ASTSource(fn=roi_pool_kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constants.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32))
    return len(kernel.asm["cubin"])


def main(argv) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: the interpreter does not compile")
        return 2
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # no NVIDIA backend in this triton build
        print(f"triton's NVIDIA backend is not available here ({exc!r})")
        return 3
    for spec in argv:
        if spec.startswith("roi,"):
            _, dtype, kind = spec.split(",")
            size = compile_roi_variant(dtype, kind)
        else:
            n, dtype, kind, wide = spec.split(",")
            size = compile_variant(int(n), dtype, kind, wide == "True")
        print(f"{spec}: ok ({size} bytes of sm_90 code)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
