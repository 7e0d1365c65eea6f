"""Detectors."""

from .base import BaseDetector
from .single_stage import FCOS, SingleStageDetector
from .two_stage import RFCN, FasterRCNN, TwoStageDetector

__all__ = ["BaseDetector", "SingleStageDetector", "FCOS", "TwoStageDetector", "FasterRCNN", "RFCN"]
