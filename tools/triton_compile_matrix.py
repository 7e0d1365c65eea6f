"""Compiles dcn_plugin's Triton kernels with every Triton that a supported torch's CUDA wheels pin,
for NVIDIA and AMD GPUs, without a GPU, and writes the table.

    python tools/triton_compile_matrix.py                      # every Triton in TRITONS (about 40 min)
    python tools/triton_compile_matrix.py --tritons 3.0.0 --require cuda:80,cuda:90   # CI: the oldest
    python tools/triton_compile_matrix.py --installed          # the Triton of this python (gpu_check.sh)
    ... [--targets cuda:80,cuda:90,...] [--markdown FILE] [--json FILE] [--jobs N] [--env-dir DIR]

Each Triton runs in its own throwaway venv under ``--env-dir`` (made on first use with
``python -m venv --system-site-packages`` and ``pip install --no-deps triton==X``: the venv sees this
python's torch, and pip never installs another), with a fresh Triton cache, and compiles every
launch variant of ``tests/triton_compile_check.py --all`` (the one compile mechanism) for every
target. A cell is ``ok`` when the kernel compiled to machine code, ``unknown`` when this Triton
cannot compile even a one-line probe kernel for the target (reason in the JSON), ``FAILED``
otherwise; the exit status is 1 when any cell failed, or when a target named by ``--require`` is
unknown to a Triton (so that a broken environment cannot pass as "nothing to compile").

Triton up to 3.4 links AMD code with an external ``ld.lld`` (ROCm's; the torch ROCm wheels bundle
one): where one is on PATH (``ld.lld``, or Debian's ``ld.lld-NN``) it is passed to those Tritons as
``TRITON_HIP_LLD_PATH``, as a ROCm install would provide it; without one their AMD cells are
``unknown``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, "tests", "triton_compile_check.py")
# The Triton that the CUDA wheels of each supported torch minor pin (torch>=2.4, pyproject.toml).
TRITONS = {"3.0.0": "2.4", "3.1.0": "2.5", "3.2.0": "2.6", "3.3.1": "2.7", "3.4.0": "2.8", "3.5.1": "2.9",
           "3.6.0": "2.10", "3.7.1": "2.11", "3.8.0": "2.12", "3.9.0": "2.13"}
TARGETS = ["cuda:80", "cuda:90", "cuda:100", "hip:gfx90a", "hip:gfx942"]
TARGET_NAMES = {"cuda:80": "sm_80", "cuda:90": "sm_90", "cuda:100": "sm_100", "hip:gfx90a": "gfx90a",
                "hip:gfx942": "gfx942"}


def find_lld():
    """An ld.lld for the Tritons that link AMD code with an external one: the newest versioned one
    (Debian's ld.lld-NN; LLVM 14's cannot read the code objects of Triton 3.3 and later), else
    ``ld.lld`` on PATH, else None."""
    versioned = glob.glob("/usr/bin/ld.lld-*") + glob.glob("/usr/lib/llvm-*/bin/ld.lld")

    def version(path):
        digits = "".join(c if c.isdigit() else " " for c in path).split()
        return int(digits[0]) if digits else 0

    if versioned:
        return max(versioned, key=version)
    return shutil.which("ld.lld")


def venv_python(version: str, env_dir: str) -> str:
    """The python of a venv with ``triton==version`` (made if missing)."""
    env = os.path.join(env_dir, version)
    python = os.path.join(env, "bin", "python")
    probe = [python, "-c", f"import importlib.metadata as m; assert m.version('triton') == '{version}'"]
    if os.path.exists(python) and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", env], check=True)
    # --no-deps: triton's only dependencies are tiny ones the system python has; never a torch
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    f"triton=={version}"], check=True)
    return python


def run_row(python: str, targets, jobs: int, lld):
    """Runs the compile check with ``python``; returns its JSON (triton version, cells) and seconds."""
    with tempfile.TemporaryDirectory(prefix="dcn-triton-matrix-") as tmp:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(TRITON_CACHE_DIR=os.path.join(tmp, "cache"), PYTHONPATH=ROOT)
        if lld and "TRITON_HIP_LLD_PATH" not in env:
            env["TRITON_HIP_LLD_PATH"] = lld
        out = os.path.join(tmp, "cells.json")
        command = [python, CHECK, "--all", "--json", out, "--jobs", str(jobs)]
        for target in targets:
            command += ["--target", target]
        start = time.time()
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        took = time.time() - start
        if not os.path.exists(out):
            raise RuntimeError(f"{python}: the compile check wrote nothing (exit {result.returncode}):\n"
                               f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        with open(out) as f:
            return json.load(f), took


def summarise(row: dict, targets) -> dict:
    """Per target: 'N/N', 'unknown: reason' or 'k of N FAILED'."""
    summary = {}
    for target in targets:
        cells = [c for c in row["cells"] if c["target"] == target]
        ok = sum(c["status"] == "ok" for c in cells)
        failed = sum(c["status"] == "failed" for c in cells)
        if cells and all(c["status"] == "unknown" for c in cells):
            summary[target] = "unknown: " + cells[0].get("detail", "")
        elif failed:
            summary[target] = f"{failed} of {len(cells)} FAILED"
        else:
            summary[target] = f"{ok}/{len(cells)}"
    return summary


def _reason(detail: str) -> str:
    if "not defined for option 'gpu-name'" in detail or "not a recognized processor" in detail:
        return "target unknown to this Triton (its ptxas)"
    if "ld.lld" in detail:
        return "no ROCm ld.lld (this Triton links AMD code with one)"
    return "target unknown to this Triton"


def markdown(rows, targets) -> str:
    lines = ["| Triton | torch (CUDA wheels) | " + " | ".join(TARGET_NAMES.get(t, t) for t in targets) + " |",
             "|---|---|" + "---|" * len(targets)]
    for row in rows:
        cells = []
        for target in targets:
            text = row["summary"][target]
            cells.append(_reason(text) if text.startswith("unknown") else
                         f"**{text}**" if "FAILED" in text else f"{text} compiled")
        lines.append(f"| {row['triton']} | {row['torch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tritons", default=",".join(TRITONS), help="comma-separated versions")
    parser.add_argument("--installed", action="store_true", help="only the Triton of this python")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--env-dir", default=os.path.join(tempfile.gettempdir(), "triton-envs"))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--markdown", help="write the table here")
    parser.add_argument("--json", help="write every cell here")
    parser.add_argument("--require", default="", help="targets that must compile (unknown fails)")
    args = parser.parse_args(argv)
    required = [t for t in args.require.split(",") if t]
    targets = args.targets.split(",")
    lld = find_lld()
    pythons = [("installed", sys.executable)] if args.installed else \
        [(v, None) for v in args.tritons.split(",")]
    rows, status = [], 0
    for version, python in pythons:
        python = python or venv_python(version, args.env_dir)
        data, took = run_row(python, targets, args.jobs, lld)
        row = dict(triton=data["triton"], torch=TRITONS.get(data["triton"], "?"), seconds=round(took),
                   summary=summarise(data, targets), cells=data["cells"])
        rows.append(row)
        print(f"triton {row['triton']} ({took:.0f}s): " +
              ", ".join(f"{TARGET_NAMES.get(t, t)} {row['summary'][t][:60]}" for t in targets), flush=True)
        for cell in data["cells"]:
            if cell["status"] == "failed" or (cell["status"] == "unknown" and cell["target"] in required):
                status = 1
                print(f"  {cell['status'].upper()} {cell['target']} {cell['variant']}: {cell['detail']}")
    table = markdown(rows, targets)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(lld=lld, rows=rows), f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
