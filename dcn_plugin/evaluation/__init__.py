"""Evaluation metrics (mmengine ``METRICS``, ``dcn_plugin`` scope): ``CocoMetric`` (needs
pycocotools)."""

from .._extras import DETECTOR_MODULES, require

require("dcn_plugin.evaluation", DETECTOR_MODULES, extra="mmlab")

from .coco_metric import CocoMetric  # noqa: E402

__all__ = ["CocoMetric"]
