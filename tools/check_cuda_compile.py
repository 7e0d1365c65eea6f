"""Compile the CUDA sources with nvcc, without a GPU and without a CUDA build of torch.

CI runs on a CPU-only machine, where ``pip install -e .`` builds only the CPU kernels; this check
compiles every ``dcn_plugin/ops/csrc/cuda/*.cu`` file to an object file (and the C++ sources with
``DCN_WITH_CUDA`` defined, syntax only), with the flags the real CUDA build uses, so that a CUDA
compile error cannot land unnoticed. Nothing is linked or run.

Torch's CPU wheel ships the CUDA headers of c10 and ATen but not the header that CMake generates
for them (``c10/cuda/impl/cuda_cmake_macros.h``); it is written to a scratch include folder here,
with the content a shared-library build of torch generates.

Usage: ``python tools/check_cuda_compile.py [--arch sm_90] [--jobs 2]``
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "dcn_plugin", "ops", "csrc")
GENERATED_HEADERS = {
    os.path.join("c10", "cuda", "impl", "cuda_cmake_macros.h"):
        "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n",
}


def find_nvcc() -> str:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(cuda_home, "bin", "nvcc")] if cuda_home else []
    candidates.append(shutil.which("nvcc") or "")
    for nvcc in candidates:
        if nvcc and os.path.exists(nvcc):
            return os.path.realpath(nvcc)
    raise SystemExit("check_cuda_compile: nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def cuda_include_dirs(nvcc: str) -> list:
    """The include folders nvcc itself uses (nvcc may be a wrapper script outside the toolkit)."""
    result = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True)
    dirs = []
    for line in (result.stdout + result.stderr).splitlines():
        if "INCLUDES=" in line:
            args = line.split("=", 1)[1].strip().strip('"').split()
            dirs += [arg[2:] for arg in args if arg.startswith("-I")]
    if not dirs:
        raise SystemExit(f"check_cuda_compile: could not read nvcc's include folders from `{nvcc} --dryrun`")
    return [d.strip('"') for d in dirs]


def generated_include_dir(scratch: str) -> str:
    """A folder with the generated headers that this torch lacks."""
    torch_include = cpp_extension.include_paths()[0]
    for relative, content in GENERATED_HEADERS.items():
        if not os.path.exists(os.path.join(torch_include, relative)):
            path = os.path.join(scratch, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(content)
    return scratch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90", help="GPU architecture to compile for (default sm_90)")
    parser.add_argument("--jobs", type=int, default=2, help="compilers run at once")
    args = parser.parse_args(argv)

    nvcc = find_nvcc()
    cu_sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    cpp_sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    if not cu_sources:
        raise SystemExit(f"check_cuda_compile: no CUDA sources under {CSRC}/cuda")
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    defines = ["-DDCN_WITH_CUDA", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", abi]

    with tempfile.TemporaryDirectory() as scratch:
        generated = generated_include_dir(os.path.join(scratch, "include"))
        includes = [generated, CSRC, *cpp_extension.include_paths(), *cuda_include_dirs(nvcc),
                    sysconfig.get_paths()["include"]]
        include_flags = [f"-I{d}" for d in includes]
        commands = []
        for source in cu_sources:
            obj = os.path.join(scratch, os.path.basename(source) + ".o")
            nvcc_flags = [f"-arch={args.arch}", "-O3", "-std=c++20", "-lineinfo",
                          *cpp_extension.COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC"]
            commands.append((source, [nvcc, "-c", source, "-o", obj, *nvcc_flags, *defines, *include_flags]))
        cxx = os.environ.get("CXX", "c++")
        for source in cpp_sources:
            commands.append((source, [cxx, "-fsyntax-only", "-std=c++20", "-fopenmp", source, *defines,
                                      *include_flags]))

        def run(job):
            source, command = job
            return source, subprocess.run(command, capture_output=True, text=True)

        failed = 0
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for source, result in pool.map(run, commands):
                name = os.path.relpath(source, ROOT)
                status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
                print(f"check_cuda_compile: {name}: {status}", flush=True)
                failed += result.returncode != 0
                sys.stdout.write(result.stdout + result.stderr)  # errors, and warnings worth reading
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
