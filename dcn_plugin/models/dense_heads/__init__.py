"""Detection heads: FCOS (single-stage) and the RPN (first stage of two-stage detectors)."""

from .fcos_head import FCOSHead
from .rpn_head import RPNHead

__all__ = ["FCOSHead", "RPNHead"]
