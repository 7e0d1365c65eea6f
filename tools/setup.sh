#!/usr/bin/env bash
# Installs what dcn_plugin needs and builds its compiled ops in place (editable install).
#
# Keeps a torch that is already installed (the extension is built against it); installs
# torch==2.13.0 only when there is none. Never lets pip choose a torch: a range or build isolation
# would download a CUDA build of several GB and break the ABI of the extension.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "torch==${DCN_TORCH_VERSION:-2.13.0}"
fi
# Dev tools: tests, Python lint, and the C++ formatter CI checks with (.clang-format).
python -m pip install -q "setuptools>=64" wheel ninja numpy pytest hypothesis ruff clang-format==23.1.3
# Triton, for the tests of the GPU kernels under its interpreter: only where none is importable
# (torch's CUDA wheels bring their own, which must stay). triton 3.9 requires nothing but
# importlib-metadata on Python < 3.10, so it cannot pull a torch.
if ! python -c "import triton" >/dev/null 2>&1; then
  python -m pip install -q "triton==3.9.0"
fi
# OpenMMLab side: mmengine plus the pure-Python mmcv (no compiled ops, no torch of its own), and
# pycocotools for COCO mAP.
python -m pip install -q mmengine==0.10.7 mmcv-lite==2.2.0 pycocotools
# Deployment (the deploy extra): ONNX export, onnxruntime and OpenVINO, exact pins (none of them
# pulls torch).
python -m pip install -q onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.32.0 openvino==2026.4.1
# The compiled ops are rebuilt only when their sources, the build script or torch changed since this
# tree's last build (the stamp records them), or when dcn_plugin does not import from this tree.
stamp=build/.dcn_plugin-build-stamp
fingerprint=$({ python -c "import torch; print(torch.__version__, torch.__file__)"
  find setup.py pyproject.toml dcn_plugin/ops/csrc -type f -print0 | sort -z | xargs -0 sha256sum; } | sha256sum)
here=$(pwd)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$fingerprint" ] && (cd / && python -c "import os, sys, dcn_plugin
sys.exit(not (dcn_plugin.has_ops() and os.path.dirname(dcn_plugin.__file__) == sys.argv[1]))" "$here/dcn_plugin"); then
  echo "dcn_plugin: compiled ops up to date with their sources and torch, not rebuilt"
else
  MAX_JOBS="${MAX_JOBS:-2}" python -m pip install -q --no-build-isolation --no-deps -e .
  mkdir -p build && echo "$fingerprint" > "$stamp"
fi
python -c "import dcn_plugin; assert dcn_plugin.has_ops(); print('dcn_plugin', dcn_plugin.__version__, \
'built against torch', __import__('torch').__version__, '| runs on CUDA (Triton kernels):', dcn_plugin.with_cuda())"
