"""Detection heads."""

from .fcos_head import FCOSHead

__all__ = ["FCOSHead"]
