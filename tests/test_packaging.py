"""The package imports with what it declares: three installs, each simulated in a fresh process
that blocks the modules it lacks.

- torch only: ``dcn_plugin.ops`` works (the README's plain PyTorch example runs); the layers
  and the detector fail with an ImportError naming what to install;
- torch + mmengine: the DCN layers register and build from config; the detector fails with an
  ImportError naming the ``mmlab`` extra;
- everything: the detector imports.

In each, ``import dcn_plugin`` prints nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, Block())
"""

DETECTOR = ("mmcv", "cv2", "pycocotools")
INSTALLS = {
    "torch-only": ("mmengine",) + DETECTOR,
    "torch+mmengine": DETECTOR,
    "everything": (),
}


def _run(blocked, script: str) -> subprocess.CompletedProcess:
    source = _BLOCKER.format(blocked=tuple(blocked)) + textwrap.dedent(script)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", source], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _ok(blocked, script: str) -> str:
    proc = _run(blocked, script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _readme_torch_example() -> str:
    """The first Python block of the README's Usage section (the plain PyTorch example)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    usage = readme[readme.index("## Usage"):]
    return re.search(r"```python\n(.*?)```", usage, re.S).group(1)


@pytest.mark.parametrize("install", sorted(INSTALLS))
def test_import_prints_nothing(install):
    proc = _run(INSTALLS[install], "import dcn_plugin\nassert dcn_plugin.has_ops()\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == "", (proc.stdout, proc.stderr)


@pytest.mark.parametrize("install", sorted(INSTALLS))
def test_readme_plain_pytorch_example(install):
    out = _ok(INSTALLS[install], _readme_torch_example() + "\nprint('SHAPE', tuple(y.shape))\n")
    assert "SHAPE (2, 128, 32, 32)" in out


def _import_error(blocked, module: str) -> str:
    out = _ok(blocked, f"""
        try:
            import {module}
        except ImportError as exc:
            print('IMPORT ERROR:', exc)
        else:
            print('IMPORTED')
    """)
    assert "IMPORT ERROR:" in out, out
    return out


def test_torch_only_names_what_the_layers_and_the_detector_need():
    blocked = INSTALLS["torch-only"]
    assert "needs mmengine" in _import_error(blocked, "dcn_plugin.layers")
    assert "needs mmengine" in _import_error(blocked, "dcn_plugin.registry")
    for room in ("models", "datasets", "evaluation"):
        out = _import_error(blocked, f"dcn_plugin.{room}")
        assert f"dcn_plugin.{room} needs mmcv, cv2, pycocotools" in out
        assert "pip install 'dcn_plugin[mmlab]'" in out


def test_torch_and_mmengine_build_the_layers_from_config():
    blocked = INSTALLS["torch+mmengine"]
    out = _ok(blocked, """
        import sys
        import torch
        import dcn_plugin
        from mmengine.registry import MODELS
        for cfg in (dict(type='DCNv2'), dict(type='dcn_plugin.DCNv2')):
            layer = MODELS.build(dict(cfg, in_channels=4, out_channels=8, kernel_size=3, padding=1))
            assert type(layer) is dcn_plugin.layers.DCNv2, type(layer)
            assert layer(torch.randn(1, 4, 6, 6)).shape == (1, 8, 6, 6)
        assert not any(m.startswith(('mmcv', 'dcn_plugin.models')) for m in sys.modules)
        print('LAYERS OK')
    """)
    assert "LAYERS OK" in out
    for room in ("models", "datasets", "evaluation"):
        out = _import_error(blocked, f"dcn_plugin.{room}")
        assert "pip install 'dcn_plugin[mmlab]'" in out and "mmcv-lite (or mmcv-full)" in out


def test_everything_imports_the_detector():
    out = _ok((), """
        import dcn_plugin.models, dcn_plugin.datasets, dcn_plugin.evaluation
        from mmengine.registry import MODELS
        from dcn_plugin.registry import MODELS as SCOPED
        assert SCOPED.get('FCOS') is dcn_plugin.models.FCOS
        print('DETECTOR OK')
    """)
    assert "DETECTOR OK" in out


DEPLOY = ("onnx", "onnxscript", "onnxruntime")


def test_the_package_and_the_detector_never_import_the_deploy_extra():
    out = _ok((), """
        import sys
        import dcn_plugin, dcn_plugin.models
        loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxscript', 'onnxruntime'))
        print('LOADED', loaded)
    """)
    assert "LOADED []" in out


def test_without_the_deploy_extra_export_names_it():
    blocked = INSTALLS["everything"] + DEPLOY
    out = _ok(blocked, """
        import dcn_plugin, dcn_plugin.models  # both work without it
        try:
            import dcn_plugin.export
        except ImportError as exc:
            print('IMPORT ERROR:', exc)
    """)
    assert "dcn_plugin.export needs onnx, onnxscript, which is not installed" in out
    assert "pip install 'dcn_plugin[deploy]'" in out
    out = _ok(("onnxruntime",), """
        from dcn_plugin.export import inference_session
        try:
            inference_session(b'')
        except ImportError as exc:
            print('IMPORT ERROR:', exc)
    """)
    assert "needs onnxruntime" in out and "pip install 'dcn_plugin[deploy]'" in out


def test_no_import_cycles_and_no_private_name_imports():
    """No module of the package imports itself through others, and none imports another module's
    private names (``tools/check_imports.py`` reads the imports with ``ast``)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_imports.py")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 import cycle(s), 0 private-name import(s)" in result.stdout
