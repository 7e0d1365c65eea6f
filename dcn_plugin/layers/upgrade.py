"""Loading version-1 checkpoints, whose offset conv sits beside the layer.

mmcv's early DCN layers (state_dict version 1) kept the generator beside the layer:
``conv2_offset.weight`` instead of ``conv2.conv_offset.weight``. mmcv's in-layer upgrade no longer
fires with torch 2.x's ``Module.load_state_dict`` (each child only sees the keys under its own
prefix), so the renaming is done here, on the whole state_dict: call
:func:`upgrade_dcn_state_dict` before loading, or :func:`register_dcn_upgrade_hook` once on the
model, or convert the file with ``tools/convert_mmcv_dcn_checkpoint.py``. Needs only torch.
"""

from __future__ import annotations

from typing import List, MutableMapping, Optional

from torch import nn

__all__ = ["upgrade_dcn_state_dict", "register_dcn_upgrade_hook"]

_SUFFIXES = ("weight", "bias")


def _candidates(state_dict, model: Optional[nn.Module], prefix: str) -> List[str]:
    if model is not None:
        # Every layer that owns a ``conv_offset`` (ours and mmcv-full's), unless the model really
        # has a module named ``<layer>_offset``.
        names = {name for name, _ in model.named_modules()}
        return [prefix + name for name, module in model.named_modules()
                if name and "conv_offset" in module._modules and f"{name}_offset" not in names]
    # No model: a key ``X_offset.weight`` beside a layer weight ``X.weight``.
    tail = "_offset.weight"
    return [key[: -len(tail)] for key in state_dict
            if key.endswith(tail) and f"{key[: -len(tail)]}.weight" in state_dict]


def upgrade_dcn_state_dict(state_dict: MutableMapping, model: Optional[nn.Module] = None,
                           prefix: str = "") -> List[str]:
    """Renames version-1 keys ``<layer>_offset.{weight,bias}`` to ``<layer>.conv_offset.{weight,bias}``.

    Works in place (``_metadata`` included, where present) and returns the names of the layers
    upgraded. With ``model``, the layers are those of ``model`` that own a ``conv_offset`` (keys
    taken under ``prefix``); without it, every ``X_offset.weight`` that sits beside ``X.weight``.
    A layer whose metadata says version 2 or more is left alone, as mmcv does.
    """
    metadata = getattr(state_dict, "_metadata", None)
    upgraded = []
    for layer in _candidates(state_dict, model, prefix):
        version = metadata.get(layer, {}).get("version") if metadata is not None else None
        if version is not None and version >= 2:
            continue
        renamed = False
        for suffix in _SUFFIXES:
            old, new = f"{layer}_offset.{suffix}", f"{layer}.conv_offset.{suffix}"
            if old in state_dict and new not in state_dict:
                state_dict[new] = state_dict.pop(old)
                renamed = True
        if renamed:
            upgraded.append(layer)
            if metadata is not None:
                old_meta = metadata.pop(f"{layer}_offset", None)
                if old_meta is not None:
                    metadata.setdefault(f"{layer}.conv_offset", old_meta)
    return upgraded


def register_dcn_upgrade_hook(model: nn.Module):
    """Makes ``model.load_state_dict`` accept version-1 DCN keys; returns the hook's handle.

    Register it on the module whose ``load_state_dict`` is called (the hook sees the whole
    state_dict before any child does).
    """

    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
             error_msgs) -> None:
        upgrade_dcn_state_dict(state_dict, module, prefix)

    return model.register_load_state_dict_pre_hook(hook)
