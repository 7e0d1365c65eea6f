"""Necks registered in ``dcn_plugin``'s MODELS registry."""

from .fpn import FPN

__all__ = ["FPN"]
