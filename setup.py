"""Build script for dcn_plugin's compiled op library ``dcn_plugin._C``.

The CUDA sources are compiled only with ``FORCE_CUDA=1`` (and a CUDA build of torch and nvcc):
they compile cleanly (``tools/check_cuda_compile.py``, run by CI) but have not yet run on a GPU,
so they are not built by default until the test suite has passed on one. Build without isolation
so the torch that is already installed is used: ``pip install --no-build-isolation -e .``.
"""

import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - explained to the user
    raise SystemExit(
        "dcn_plugin needs PyTorch installed before it is built; install torch first and "
        "build with `pip install --no-build-isolation -e .`"
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("dcn_plugin", "ops", "csrc")


def _want_cuda() -> bool:
    if os.environ.get("FORCE_CUDA") != "1":
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        raise SystemExit("FORCE_CUDA=1 needs a CUDA build of torch and the CUDA toolkit (nvcc, CUDA_HOME)")
    return True


def _extension():
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp" if os.name != "nt" else "/openmp"]
    define_macros = []
    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    if cuda_sources and _want_cuda():
        sources += cuda_sources
        define_macros.append(("DCN_WITH_CUDA", None))
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension(
            "dcn_plugin._C",
            sources,
            include_dirs=[os.path.join(ROOT, CSRC)],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    return CppExtension(
        "dcn_plugin._C",
        sources,
        include_dirs=[os.path.join(ROOT, CSRC)],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"] if os.name != "nt" else [],
    )


setup(
    packages=find_packages(include=["dcn_plugin", "dcn_plugin.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
