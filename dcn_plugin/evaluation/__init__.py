"""Evaluation metrics (mmengine ``METRICS``, ``dcn_plugin`` scope): ``CocoMetric`` (needs
pycocotools)."""

from .coco_metric import CocoMetric

__all__ = ["CocoMetric"]
