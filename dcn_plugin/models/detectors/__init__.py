"""Detectors."""

from .single_stage import FCOS, SingleStageDetector

__all__ = ["SingleStageDetector", "FCOS"]
