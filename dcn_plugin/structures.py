"""Per-image data records passed between the dataset, the detector and the metric (mmdet's layout).

A ``DetDataSample`` carries one image's metainfo and up to three ``InstanceData`` fields:

- ``gt_instances``: ``bboxes`` (N, 4) float32 ``x1, y1, x2, y2`` in the pixels of the network
  input (after resize/flip), ``labels`` (N,) int64 in ``[0, num_classes)``;
- ``ignored_instances``: same fields, crowd / ignored boxes;
- ``pred_instances``: ``bboxes`` (M, 4) in the pixels of the *original* image, ``scores`` (M,),
  ``labels`` (M,).

Metainfo keys: ``img_id``, ``img_path``, ``ori_shape`` (h, w), ``img_shape`` (h, w) after resize,
``scale_factor`` (w_scale, h_scale), ``flip``, ``flip_direction``, and, set by the data
preprocessor, ``pad_shape`` and ``batch_input_shape`` (h, w).

``label_categories`` is the one rule, shared by ``CocoDataset`` and ``CocoMetric``, that maps
labels to COCO categories.

A batch of detections in fixed-size tensors (what a head's batched ``detect`` and the exported ONNX
detector return) takes the metainfo as tensors (``batch_geometry``) and gives per-image
``InstanceData`` back (``instances_from_batch``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from mmengine.structures import BaseDataElement, InstanceData
from torch import Tensor

__all__ = ["DetDataSample", "InstanceData", "batch_geometry", "instances_from_batch", "label_categories"]


def label_categories(categories: Sequence[dict], classes: Sequence[str]) -> tuple[list[int], list[str], bool]:
    """The COCO category id and name of each label.

    Where ``classes`` are all category names, label ``i`` is the category named ``classes[i]``
    (the first by id, where names repeat) and ``matched`` is True. Otherwise label ``i`` is the
    ``i``-th category in ascending id order and ``matched`` is False.

    Returns:
        ``(cat_ids, names, matched)``.
    """
    ordered = sorted(categories, key=lambda c: c["id"])
    name2id: dict[str, int] = {}
    for cat in ordered:
        name2id.setdefault(cat["name"], cat["id"])
    if classes and all(c in name2id for c in classes):
        return [name2id[c] for c in classes], list(classes), True
    return [c["id"] for c in ordered], [c["name"] for c in ordered], False


class DetDataSample(BaseDataElement):
    """One image's metainfo, ground truth and predictions."""

    @property
    def gt_instances(self) -> InstanceData:
        return self._gt_instances

    @gt_instances.setter
    def gt_instances(self, value: InstanceData) -> None:
        self.set_field(value, "_gt_instances", dtype=InstanceData)

    @gt_instances.deleter
    def gt_instances(self) -> None:
        del self._gt_instances

    @property
    def ignored_instances(self) -> InstanceData:
        return self._ignored_instances

    @ignored_instances.setter
    def ignored_instances(self, value: InstanceData) -> None:
        self.set_field(value, "_ignored_instances", dtype=InstanceData)

    @ignored_instances.deleter
    def ignored_instances(self) -> None:
        del self._ignored_instances

    @property
    def pred_instances(self) -> InstanceData:
        return self._pred_instances

    @pred_instances.setter
    def pred_instances(self, value: InstanceData) -> None:
        self.set_field(value, "_pred_instances", dtype=InstanceData)

    @pred_instances.deleter
    def pred_instances(self) -> None:
        del self._pred_instances


def batch_geometry(metainfos: Sequence[dict], rescale: bool = True, device=None) -> tuple[Tensor, Tensor]:
    """Each image's ``img_shape`` and ``scale_factor`` as tensors.

    Returns:
        ``img_shapes`` (B, 2) float32 ``(h, w)``, inf where a metainfo has none (no clipping), and
        ``scale_factors`` (B, 2) float32 ``(w_scale, h_scale)``, ones where a metainfo has none or
        ``rescale`` is False (boxes stay in network-input pixels).
    """
    shapes = [tuple(meta.get("img_shape", (math.inf, math.inf)))[:2] for meta in metainfos]
    factors = [tuple(meta["scale_factor"])[:2] if rescale and "scale_factor" in meta else (1.0, 1.0)
               for meta in metainfos]
    return (torch.tensor(shapes, dtype=torch.float32, device=device).reshape(-1, 2),
            torch.tensor(factors, dtype=torch.float32, device=device).reshape(-1, 2))


def instances_from_batch(boxes: Tensor, scores: Tensor, labels: Tensor) -> list[InstanceData]:
    """Per image, ``InstanceData(bboxes, scores, labels)`` of the rows whose label is not -1.

    Args:
        boxes: (B, D, 4); scores: (B, D); labels: (B, D) int, -1 in rows that hold no detection.
    """
    instances = []
    for image_boxes, image_scores, image_labels in zip(boxes, scores, labels, strict=True):
        keep = image_labels >= 0
        instances.append(InstanceData(bboxes=image_boxes[keep], scores=image_scores[keep],
                                      labels=image_labels[keep].long()))
    return instances
