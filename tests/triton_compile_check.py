"""Compiles dcn_plugin's Triton kernels for GPUs without one, with whichever Triton runs this script.

    python tests/triton_compile_check.py [--target cuda:90 ...] [--json FILE] [--jobs N] (--all | SPEC ...)

Triton's frontend, its NVIDIA backend with ptxas, and its AMD backend (shipped in the triton wheel)
run on any machine, so this checks what the interpreter cannot: that a real compiler accepts the
kernels, for every launch the drivers make. ``--all`` compiles every variant of
:func:`launch_variants`; a SPEC names one:

- ``N,DTYPE,KIND,WIDE[,BLOCK_CHANNELS]`` for the convolution's ``sample_kernel``
  (e.g. ``2,bf16,CSom+off+mask,False``);
- ``roi,DTYPE,KIND[,BLOCK_CHANNELS]`` for ``roi_pool_kernel`` (e.g. ``roi,fp16,mmcv-backward``).

Targets: ``cuda:80``, ``cuda:90``, ``cuda:100`` (NVIDIA sm_XX), ``hip:gfx90a``, ``hip:gfx942`` (AMD);
the default is ``cuda:90``. Each target is first tried with a one-line probe kernel: where even
that does not compile (a Triton too old for sm_100, a wheel without an AMD linker), the target's
cells are reported as ``unknown`` with the reason, never as passed. Launch options are the
drivers' own: ``num_warps`` from the block size, ``enable_fp_fusion`` as the launchers pass it.

Prints one line per (target, variant); ``--json`` writes them with the Triton version. Exit status:
0 every cell compiled or its target is unknown to this Triton, 1 some kernel failed to compile,
2 under TRITON_INTERPRET=1 (the interpreter does not compile), 3 no GPU backend in this Triton.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from typing import Dict, List

# The repository root first, so that a throwaway venv's python compiles this checkout's kernels.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_TARGETS = ["cuda:80", "cuda:90", "cuda:100", "hip:gfx90a", "hip:gfx942"]
DTYPES = ["fp32", "bf16", "fp16", "fp64"]

# sample_kernel's work flags, one letter each: C im2col columns, S scatter onto the image (col2im),
# o offset gradient, m mask gradient; then which of offset and mask the op was given.
WORK = {"C": "COLUMNS", "S": "SCATTER", "o": "OFFSET_GRAD", "m": "MASK_GRAD"}
FLAGS = ("HAS_OFFSET", "HAS_MASK", "COLUMNS", "SCATTER", "OFFSET_GRAD", "MASK_GRAD")


def _sample_kinds() -> Dict[str, dict]:
    """Every flag combination the convolution's driver launches: the forward op (C), the transposed
    op (S), and the backward's (C for the weight or the transposed op's input gradient, S for the
    input gradient, o and m for the offset and mask gradients, in any combination), each with or
    without offset and mask; a gradient of an absent offset or mask is never asked for."""
    kinds = {}
    for has_offset, has_mask in itertools.product((True, False), repeat=2):
        for work in itertools.product((True, False), repeat=4):
            flags = dict(zip(WORK.values(), work))
            absent = (flags["OFFSET_GRAD"] and not has_offset) or (flags["MASK_GRAD"] and not has_mask)
            if not any(work) or absent:
                continue
            name = "".join(letter for letter, on in zip(WORK, work) if on)
            name += "+off" * has_offset + "+mask" * has_mask
            kinds[name] = dict(flags, HAS_OFFSET=has_offset, HAS_MASK=has_mask)
    return kinds


KINDS = _sample_kinds()

ROI_KINDS = {
    # (rule, flags) of the RoI pooling kernel's launches: forward with and without offsets; backward for
    # the input gradient, the offset gradient or both (the input gradient with or without offsets)
    **{f"{rule}-{kind}": (rule, flags) for rule in ("mmcv", "rfcn") for kind, flags in {
        "forward": dict(FORWARD=True),
        "forward-offset": dict(FORWARD=True, HAS_OFFSET=True),
        "backward-input": dict(INPUT_GRAD=True),
        "backward-input-offset": dict(INPUT_GRAD=True, HAS_OFFSET=True),
        "backward-offset": dict(OFFSET_GRAD=True, HAS_OFFSET=True),
        "backward": dict(INPUT_GRAD=True, OFFSET_GRAD=True, HAS_OFFSET=True),
    }.items()},
}
ROI_RULES = {"mmcv": dict(ALIGN=0.5, MARGIN=1.0, COUNT_VALID=False),
             "rfcn": dict(ALIGN=0.0, MARGIN=0.5, COUNT_VALID=True)}
ROI_FLAGS = ("HAS_OFFSET", "FORWARD", "INPUT_GRAD", "OFFSET_GRAD")
SAMPLE_BLOCKS = [1, 2, 4, 8, 16]  # block_channels(): powers of two up to 16
ROI_BLOCKS = [1, 2, 4, 8, 16, 32, 64]  # _block_channels(): powers of two up to 64


def launch_variants() -> List[str]:
    """The launches the drivers make, as SPECs: every kind of each kernel, with the dims, dtypes,
    index widths and block sizes taken in turn, so that every dims x dtype and dtype x index width
    pair, and every block size the launchers pick, is compiled (the full product would be 3840
    compilations per target for the convolution's kernel alone); and the full backward (every
    flag on) in every dims x dtype pair with the largest tile, the kind where a compiler bug was
    found (Triton 3.7.1, AMD, 1d float64)."""
    specs = []
    for i, kind in enumerate(KINDS):
        specs.append(f"{1 + i % 3},{DTYPES[i % 4]},{kind},{(i // 4) % 2 == 1},{SAMPLE_BLOCKS[i % 5]}")
    for n, dtype in itertools.product((1, 2, 3), DTYPES):
        spec = f"{n},{dtype},CSom+off+mask,False,16"
        if spec not in specs:
            specs.append(spec)
    for i, kind in enumerate(ROI_KINDS):
        specs.append(f"roi,{DTYPES[i % 4]},{kind},{ROI_BLOCKS[i % 7]}")
    return specs


def _version() -> tuple:
    import triton

    return tuple(int(part) for part in triton.__version__.split("+")[0].split(".")[:2])


def _source(fn, constants: dict, types: dict, divisible: set):
    """The ASTSource of ``fn`` with constexprs ``constants``, argument ``types`` (name: Triton type)
    and the arguments known to be multiples of 16 (as Triton's launcher specializes pointers and
    integers), in the form this Triton's compiler takes (it changed in 3.2 and in 3.3)."""
    from triton.compiler import ASTSource

    names = fn.arg_names
    if _version() >= (3, 3):
        signature = {n: "constexpr" if n in constants else types[n] for n in names}
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
        return ASTSource(fn, signature, {(names.index(k),): v for k, v in constants.items()}, attrs)
    signature = {n: types[n] for n in names if n not in constants}
    if _version() >= (3, 2):
        from triton.backends.compiler import AttrsDescriptor

        attrs = AttrsDescriptor.from_hints({names.index(n): 16 for n in divisible})
    else:
        from triton.compiler.compiler import AttrsDescriptor

        attrs = AttrsDescriptor(divisible_by_16={names.index(n) for n in divisible})
    return ASTSource(fn, signature, dict(constants), attrs)


def _target(spec: str):
    from triton.backends.compiler import GPUTarget

    backend, arch = spec.split(":")
    return GPUTarget("cuda", int(arch), 32) if backend == "cuda" else GPUTarget("hip", arch, 64)


def _compile(source, target: str, num_warps: int) -> int:
    """Compiles for ``target``; returns the size of the machine code (cubin or hsaco)."""
    import triton

    from dcn_plugin.ops.triton.kernels import FP_FUSION

    kernel = triton.compile(source, target=_target(target),
                            options={"num_warps": num_warps, "enable_fp_fusion": FP_FUSION})
    binary = kernel.asm["cubin" if target.startswith("cuda") else "hsaco"]
    return len(binary)


def sample_source(n: int, dtype: str, kind: str, wide: bool, block_c: int):
    """``sample_kernel`` as :func:`dcn_plugin.ops.triton.kernels.sample` launches it; returns
    ``(source, num_warps)``."""
    import triton.language as tl

    from dcn_plugin.ops.triton.kernels import BLOCK_COLUMNS, sample_kernel, sample_warps

    acc = "fp64" if dtype == "fp64" else "fp32"
    constants = {flag: KINDS[kind].get(flag, False) for flag in FLAGS}
    constants.update(N=n, ACC=tl.float64 if acc == "fp64" else tl.float32, WIDE=wide, BLOCK_CHANNELS=block_c,
                     BLOCK_COLUMNS=BLOCK_COLUMNS)
    names = sample_kernel.arg_names
    pointers = {name: "*" + {"grad_image": acc, "partial": acc}.get(name, dtype) for name in names[:7]}
    types = {name: pointers.get(name, "i64" if wide else "i32") for name in names}
    divisible = set(pointers) | {"column_stride"}  # torch's allocations; column_stride (COLUMN_ALIGN)
    return _source(sample_kernel, constants, types, divisible), sample_warps(block_c)


def roi_source(dtype: str, kind: str, block_c: int):
    """``roi_pool_kernel`` as ``roi_pool._launch`` launches it; returns ``(source, num_warps)``."""
    import triton.language as tl

    from dcn_plugin.ops.triton.roi_pool import roi_pool_kernel, roi_pool_warps

    acc = "fp64" if dtype == "fp64" else "fp32"
    rule, flags = ROI_KINDS[kind]
    constants = {**ROI_RULES[rule], **{flag: flags.get(flag, False) for flag in ROI_FLAGS}}
    constants.update(ACC=tl.float64 if acc == "fp64" else tl.float32, BLOCK_CHANNELS=block_c)
    pointers = {"input": dtype, "table": acc, "offset": dtype, "grad_output": dtype, "output": dtype,
                "grad_input": acc, "partial": acc, "scale": acc}
    types = {name: "*" + pointers[name] if name in pointers else "i32" for name in roi_pool_kernel.arg_names}
    return _source(roi_pool_kernel, constants, types, set(pointers)), roi_pool_warps(block_c)


def source_of(spec: str):
    """``(source, num_warps)`` of a SPEC (see the module docstring)."""
    parts = spec.split(",")
    if parts[0] == "roi":
        return roi_source(parts[1], parts[2], int(parts[3]) if len(parts) > 3 else 64)
    n, dtype, kind, wide = parts[:4]
    return sample_source(int(n), dtype, kind, wide == "True", int(parts[4]) if len(parts) > 4 else 16)


try:  # the probe kernel: defined at module level, where every Triton's jit can read its source
    import triton as _triton
    import triton.language as tl

    @_triton.jit
    def _probe(x):
        tl.store(x + tl.arange(0, 32), 1.0)

except ImportError:  # no triton: main() says so
    _probe = None


def _probe_source():
    return _source(_probe, {}, {"x": "*fp32"}, {"x"})


def _short(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = " | ".join(lines[-3:]) if lines else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


def _cell(job):
    target, spec = job
    try:
        source, warps = source_of(spec)
        return dict(target=target, variant=spec, status="ok", bytes=_compile(source, target, warps))
    except Exception as exc:  # a compiler error: the cell failed
        return dict(target=target, variant=spec, status="failed", detail=_short(exc))


def main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="*")
    parser.add_argument("--all", action="store_true", help="every launch variant the drivers make")
    parser.add_argument("--target", action="append", help="cuda:80, cuda:90, cuda:100, hip:gfx90a, "
                        "hip:gfx942, or 'all' (default cuda:90; repeatable)")
    parser.add_argument("--json", help="write the cells here")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: the interpreter does not compile")
        return 2
    import triton

    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except Exception as exc:  # no NVIDIA backend in this triton build
        print(f"triton's NVIDIA backend is not available here ({exc!r})")
        return 3
    from dcn_plugin.ops.triton.kernels import FP_FUSION

    targets = args.target or ["cuda:90"]
    if "all" in targets:
        targets = DEFAULT_TARGETS
    specs = (launch_variants() if args.all else []) + args.specs
    cells, jobs = [], []
    for target in targets:
        try:
            _compile(_probe_source(), target, 1)
        except Exception as exc:
            reason = _short(exc)
            print(f"{target}: target unknown to triton {triton.__version__} (a probe kernel does not "
                  f"compile: {reason})", flush=True)
            cells += [dict(target=target, variant=spec, status="unknown", detail=reason) for spec in specs]
            continue
        jobs += [(target, spec) for spec in specs]
    if args.jobs > 1 and len(jobs) > 1:
        import multiprocessing

        # spawn, not fork: a process forked after Triton has compiled (the probes) can deadlock
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.imap(_cell, jobs)
            for cell in results:
                cells.append(cell)
                _print(cell)
    else:
        for job in jobs:
            cells.append(_cell(job))
            _print(cells[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, fp_fusion=FP_FUSION, cells=cells), f, indent=1)
    return 1 if any(c["status"] == "failed" for c in cells) else 0


def _print(cell: dict) -> None:
    if cell["status"] == "ok":
        print(f"{cell['target']} {cell['variant']}: ok ({cell['bytes']} bytes)", flush=True)
    else:
        print(f"{cell['target']} {cell['variant']}: FAILED: {cell['detail']}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
