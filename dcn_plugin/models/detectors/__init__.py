"""Detectors."""

from .single_stage import FCOS, SingleStageDetector
from .two_stage import RFCN, FasterRCNN, TwoStageDetector

__all__ = ["SingleStageDetector", "FCOS", "TwoStageDetector", "FasterRCNN", "RFCN"]
