"""Box helpers written with torch ops: pairwise IoU, distance decoding, clipping, class-aware NMS.

Boxes are ``(..., 4)`` tensors ``x1, y1, x2, y2``. ``box_area``, ``bbox_overlaps`` and
``nms`` are those of ``dcn_plugin.ops.boxes`` (NMS: a C++ kernel on the CPU).

``multiclass_nms`` is a torch op (``torch.ops.dcn_plugin.multiclass_nms``) with the semantics of
ONNX's ``NonMaxSuppression``, computed here with :func:`batched_nms`; the ONNX export of a detector
translates it to that standard op (``dcn_plugin.models.deploy``), so one decoding serves PyTorch
and the exported model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.boxes import bbox_overlaps, box_area, nms

__all__ = ["box_area", "bbox_overlaps", "distance2bbox", "clip_boxes", "nms", "batched_nms",
           "multiclass_nms"]


def distance2bbox(points: Tensor, distance: Tensor, max_shape: tuple[int, int] | None = None) -> Tensor:
    """Decodes ``(left, top, right, bottom)`` distances from points (..., 2) into boxes (..., 4).

    ``max_shape`` (h, w) clips the boxes to the image.
    """
    x1 = points[..., 0] - distance[..., 0]
    y1 = points[..., 1] - distance[..., 1]
    x2 = points[..., 0] + distance[..., 2]
    y2 = points[..., 1] + distance[..., 3]
    boxes = torch.stack([x1, y1, x2, y2], -1)
    if max_shape is not None:
        h, w = max_shape[:2]
        boxes = torch.stack([boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h),
                             boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)], -1)
    return boxes


def clip_boxes(boxes: Tensor, shapes: Tensor) -> Tensor:
    """Clips boxes (B, M, 4) into their images: ``shapes`` (B, 2) holds each image's (h, w)."""
    height, width = shapes[:, 0, None].to(boxes), shapes[:, 1, None].to(boxes)
    zero = boxes.new_zeros(())
    return torch.stack([torch.minimum(boxes[..., 0].maximum(zero), width),
                        torch.minimum(boxes[..., 1].maximum(zero), height),
                        torch.minimum(boxes[..., 2].maximum(zero), width),
                        torch.minimum(boxes[..., 3].maximum(zero), height)], -1)


def batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float,
                max_num: int = -1) -> tuple[Tensor, Tensor]:
    """Class-aware NMS: boxes of different labels never suppress each other.

    Args:
        boxes: (N, 4); scores: (N,); labels: (N,) int.
        max_num: keep at most this many (all when < 0).
    Returns:
        ``(dets, keep)``: dets (K, 5) = kept boxes and scores by decreasing score, keep (K,) their
        indices into the inputs.
    """
    if boxes.numel() == 0:
        return boxes.new_zeros((0, 5)), labels.new_zeros((0,), dtype=torch.long)
    # Shift each class into its own disjoint coordinate range, then one class-agnostic NMS. The shift
    # is mmcv's (max + 1 per label) where no coordinate is negative: IoUs of the shifted boxes round
    # as mmdet's, so the same boxes are kept.
    span = boxes.max() - boxes.min().clamp(max=0) + 1
    shifted = boxes + (labels.to(boxes) * span)[:, None]
    keep = nms(shifted, scores, iou_threshold)
    if max_num >= 0:
        keep = keep[:max_num]
    return torch.cat([boxes[keep], scores[keep, None]], -1), keep


@torch.library.custom_op("dcn_plugin::multiclass_nms", mutates_args=())
def multiclass_nms(boxes: Tensor, scores: Tensor, max_per_class: int, iou_threshold: float,
                   score_threshold: float) -> Tensor:
    """Per-class greedy NMS over a batch, as ONNX ``NonMaxSuppression`` (``center_point_box=0``).

    Args:
        boxes: (B, N, 4) ``x1, y1, x2, y2``.
        scores: (B, C, N), the score of every box for every class.
        max_per_class: keep at most this many boxes per image and class.
        iou_threshold: a box is suppressed by a kept box of its class with IoU above this.
        score_threshold: boxes whose score is not above this take no part.

    Returns:
        (K, 3) int64 rows ``(image, class, box)`` of the kept boxes.
    """
    rows = [boxes.new_zeros((0, 3), dtype=torch.long)]
    for image in range(boxes.shape[0]):
        classes, index = (scores[image] > score_threshold).nonzero(as_tuple=True)
        if index.numel() == 0:
            continue
        _, keep = batched_nms(boxes[image, index], scores[image, classes, index], classes, iou_threshold)
        classes, index = classes[keep], index[keep]
        # Rank of each kept box within its class (keep is by decreasing score).
        seen = (classes[:, None] == torch.arange(scores.shape[1], device=classes.device)).cumsum(0)
        rank = seen.gather(1, classes[:, None])[:, 0] - 1
        chosen = rank < max_per_class
        rows.append(torch.stack([torch.full_like(index[chosen], image), classes[chosen], index[chosen]], 1))
    return torch.cat(rows)


@multiclass_nms.register_fake
def _multiclass_nms_fake(boxes, scores, max_per_class, iou_threshold, score_threshold):
    count = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((count, 3), dtype=torch.long)
