"""Build script for dcn_plugin's compiled op library ``dcn_plugin._C`` (schemas and CPU kernels).

There is nothing to compile for GPUs: the CUDA kernels are Triton kernels
(``dcn_plugin/ops/triton/``), compiled at run time for the GPU they run on, so no CUDA toolkit is
needed. Build without isolation so the torch that is already installed is used:
``pip install --no-build-isolation -e .``.
"""

import glob
import os

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


def _extension():
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    return CppExtension(
        "dcn_plugin._C",
        sources,
        include_dirs=[os.path.join(ROOT, CSRC)],
        extra_compile_args={"cxx": ["-O3", "-std=c++20", "-fopenmp" if os.name != "nt" else "/openmp"]},
        extra_link_args=["-fopenmp"] if os.name != "nt" else [],
    )


setup(
    packages=find_packages(include=["dcn_plugin", "dcn_plugin.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
