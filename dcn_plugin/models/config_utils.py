"""Helpers for modules built from config dicts."""

from __future__ import annotations

import copy
from typing import Optional

__all__ = ["copy_cfg"]


def copy_cfg(cfg, name: str) -> Optional[dict]:
    """A deep copy of an optional config dict, so that nothing done with it reaches the caller's."""
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise TypeError(f"{name} must be a dict or None, got {name}={cfg!r}")
    return copy.deepcopy(cfg)
