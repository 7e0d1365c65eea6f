"""Build script for dcn_plugin's compiled op library ``dcn_plugin._C`` (schemas and CPU kernels).

There is nothing to compile for GPUs: the CUDA kernels are Triton kernels
(``dcn_plugin/ops/triton/``), compiled at run time for the GPU they run on, so no CUDA toolkit is
needed. Build without isolation so the torch that is already installed is used:
``pip install --no-build-isolation -e .``.

The CPU sampling sweeps (``csrc/cpu/sweeps_*.cpp``) are compiled once per instruction set, each with
its own flags, as ATen compiles its kernels; the library picks one at run time.
"""

import glob
import os
import platform

from setuptools import find_packages, setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as exc:  # pragma: no cover - explained to the user
    raise SystemExit(
        "dcn_plugin needs PyTorch installed before it is built; install torch first and "
        "build with `pip install --no-build-isolation -e .`"
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("dcn_plugin", "ops", "csrc")
X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
MSVC = os.name == "nt"
# Flags of the per-ISA sweeps, as ATen's (cmake/Codegen.cmake) for its AVX2 and AVX512 kernels.
ISA_FLAGS = {
    "avx2": ["/arch:AVX2"] if MSVC else ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["/arch:AVX512"] if MSVC else ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2",
                                             "-mfma", "-mf16c"],
}


def _isa(source):
    stem = os.path.splitext(os.path.basename(source))[0]
    return stem.rsplit("_", 1)[-1] if stem.startswith("sweeps_") else None


class BuildWithISAFlags(BuildExtension):
    """Compiles each ``sweeps_<isa>.cpp`` with that instruction set's flags, after everything else:
    the linker keeps the first copy of an inline function, so the baseline objects come first."""

    def build_extension(self, ext):
        compile_all = self.compiler.compile

        def compile(sources, *args, extra_postargs=None, **kwargs):
            objects = []
            for isa in (None, *ISA_FLAGS):
                group = [s for s in sources if _isa(s) in ((isa,) if isa else (None, "default"))]
                if not group:
                    continue
                post = dict(extra_postargs or {"cxx": []})
                post["cxx"] = list(post["cxx"]) + ISA_FLAGS.get(isa, [])
                objects += compile_all(group, *args, extra_postargs=post, **kwargs)
            return objects

        self.compiler.compile = compile
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = compile_all


def _extension():
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    sources = [s for s in sources if _isa(s) in (None, "default") or X86]
    defines = [f"-DDCN_PLUGIN_{isa.upper()}" for isa in ISA_FLAGS if X86]
    return CppExtension(
        "dcn_plugin._C",
        sources,
        include_dirs=[os.path.join(ROOT, CSRC)],
        extra_compile_args={"cxx": ["-O3", "-std=c++20", "-fopenmp" if not MSVC else "/openmp", *defines]},
        extra_link_args=["-fopenmp"] if not MSVC else [],
    )


setup(
    packages=find_packages(include=["dcn_plugin", "dcn_plugin.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildWithISAFlags.with_options(use_ninja=True)},
)
