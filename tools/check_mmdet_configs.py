"""mmdetection's own configs that use deformable layers, built with mmcv-full's layers and with
dcn_plugin's, compared output for output from the same weights.

Needs mmcv-full and mmdetection (``bash ../shared/tools/mmcv-full-env.sh`` makes a venv with them):

    ../venv-mmcv-full/bin/python tools/check_mmdet_configs.py [--folders dcn dcnv2 ...] [--out FILE.md]

For each config (of the given folders of mmdetection's configs) that names a deformable layer, the
model is built twice: with the names ``DCN``/``DCNv2`` served by mmcv-full, and after
``import dcn_plugin`` (which takes them over). The generators of the mmcv-full model get random
weights (so offsets and masks are not zero), its state_dict is loaded strictly into the dcn_plugin
model, and both run on the same random image on the CPU in float64: the backbone and neck
(``extract_feat``) and, for single-stage detectors, the head's ``forward``. Prints a Markdown table
(config, what was compared, the largest absolute difference) and exits non-zero when a config fails
to build or differs by more than ``--tol``.
"""

from __future__ import annotations

import argparse
import glob
import os
import os.path as osp
import re
import sys
import traceback
import warnings

import torch

FOLDERS = ["dcn", "dcnv2", "tood", "solov2", "nas_fcos", "vfnet", "fcos", "gfl", "reppoints", "centernet",
           "regnet", "htc", "empirical_attention", "ddod"]
# What turns on a deformable layer in a config (a layer type, ResNet's dcn key, or a head flag).
DEFORMABLE = re.compile(r"DCN|dcn=dict|dcn_on_last_conv=True|use_dcn=True|DeformConv")


def mmdet_config_dir() -> str:
    import mmdet

    return osp.join(osp.dirname(mmdet.__file__), ".mim", "configs")


def deformable_configs(root: str, folders) -> list:
    """Configs of ``folders`` whose text, or that of a base they inherit, turns on a deformable layer."""
    from mmengine.config import Config

    found = []
    for folder in folders:
        for path in sorted(glob.glob(osp.join(root, folder, "*.py"))):
            text = Config.fromfile(path).pretty_text
            if DEFORMABLE.search(text):
                found.append(path)
    return found


def _flatten(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _flatten(item)]
    if isinstance(out, dict):
        return [t for key in sorted(out) for t in _flatten(out[key])]
    return []


def _randomise_generators(model: torch.nn.Module, generator: torch.Generator) -> int:
    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "conv_offset" in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.05)
                count += 1
    return count


def _outputs(model, image: torch.Tensor) -> tuple:
    """The outputs compared: the features, and the single-stage head's raw outputs."""
    feats = model.extract_feat(image)
    parts, outs = ["feat"], _flatten(feats)
    head = getattr(model, "bbox_head", None) or getattr(model, "mask_head", None)
    if head is not None and not hasattr(model, "roi_head"):
        try:
            outs += _flatten(head(feats))
            parts.append(type(head).__name__)
        except Exception as exc:  # heads whose forward needs more than the features
            parts.append(f"{type(head).__name__} not run: {type(exc).__name__}")
    return ", ".join(parts), outs


class Names:
    """Switches the root registry's deformable names between mmcv-full's classes and dcn_plugin's."""

    def __init__(self) -> None:
        import mmcv.ops  # noqa: F401  (registers mmcv-full's DCN/DCNv2)
        from mmengine.registry import MODELS

        self.registry = MODELS
        self.mmcv = {name: MODELS.module_dict[name] for name in ("DCN", "DCNv2")}
        import dcn_plugin.layers as layers

        self.ours = {name: getattr(layers, name) for name in self.mmcv}

    def use(self, which: str) -> None:
        for name, cls in (self.mmcv if which == "mmcv" else self.ours).items():
            self.registry.register_module(name=name, module=cls, force=True)


def compare(path: str, names: Names, size: int) -> tuple:
    """(compared parts, largest absolute difference) for one config."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    cfg = Config.fromfile(path)
    models = {}
    for which in ("mmcv", "dcn_plugin"):
        names.use(which)
        torch.manual_seed(0)
        models[which] = MODELS.build(cfg.model).double().eval()
    reference, ours = models["mmcv"], models["dcn_plugin"]
    if not _randomise_generators(reference, torch.Generator().manual_seed(0)):
        raise RuntimeError("no deformable layer was built (no conv_offset parameter)")
    ours.load_state_dict(reference.state_dict(), strict=True)
    kinds = {type(m).__module__.split(".")[0] for m in ours.modules() if hasattr(m, "conv_offset")}
    if "mmcv" in kinds:
        raise RuntimeError("dcn_plugin's model still holds mmcv-full's deformable layers")
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        parts, expected = _outputs(reference, image)
        _, actual = _outputs(ours, image)
    assert len(expected) == len(actual)
    diff = max((a - e).abs().max().item() for a, e in zip(actual, expected))
    return parts, diff


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", help="mmdetection's configs folder (default: mmdet's own)")
    parser.add_argument("--folders", nargs="+", default=FOLDERS)
    parser.add_argument("--size", type=int, default=96, help="side of the random test image")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--out", help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    names = Names()
    paths = deformable_configs(args.configs or mmdet_config_dir(), args.folders)
    rows, failures = ["| config | compared | max abs diff | result |", "|---|---|---|---|"], 0
    for path in paths:
        name = osp.relpath(path, args.configs or mmdet_config_dir())
        try:
            parts, diff = compare(path, names, args.size)
            ok = diff <= args.tol
            rows.append(f"| {name} | {parts} | {diff:.2e} | {'same' if ok else 'DIFFERENT'} |")
        except Exception as exc:
            ok = False
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            rows.append(f"| {name} | - | - | FAILED: {reason} |")
            traceback.print_exc(file=sys.stderr)
        failures += not ok
        print(rows[-1], flush=True)
    summary = f"{len(paths) - failures} of {len(paths)} configs build and match to {args.tol:g}"
    print(summary)
    if args.out:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(rows) + f"\n\n{summary}\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
