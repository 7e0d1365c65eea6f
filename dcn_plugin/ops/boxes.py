"""Box operations: area, IoU / GIoU, and greedy non-maximum suppression ``dcn_plugin::nms`` (as
``torchvision.ops.nms``). Boxes are ``(..., 4)`` tensors ``x1, y1, x2, y2``.

The NMS kernel on the CPU is C++ (``csrc/cpu/nms_cpu.cpp``); on other devices the op runs the torch
implementation below (an IoU matrix, then one pass in score order on the host).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _library  # noqa: F401  (loads the op library, which defines the schema)

__all__ = ["nms", "box_area", "bbox_overlaps"]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Indices (int64) of the boxes kept, by decreasing score (ties: the earlier box first).

    A box is kept unless a kept box of higher rank overlaps it with IoU above ``iou_threshold``.

    Args:
        boxes: (N, 4) ``x1, y1, x2, y2``; scores: (N,).
    """
    return torch.ops.dcn_plugin.nms(boxes, scores, float(iou_threshold))


def box_area(boxes: Tensor) -> Tensor:
    """(..., 4) -> (...), zero for degenerate boxes."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def bbox_overlaps(boxes1: Tensor, boxes2: Tensor, mode: str = "iou", is_aligned: bool = False,
                  eps: float = 1e-6) -> Tensor:
    """IoU or GIoU between boxes.

    Args:
        boxes1: (N, 4); boxes2: (M, 4), or (N, 4) when ``is_aligned``.
        mode: ``'iou'`` or ``'giou'``.
    Returns:
        (N, M), or (N,) when ``is_aligned``.
    """
    if mode not in ("iou", "giou"):
        raise ValueError(f"bbox_overlaps: mode must be 'iou' or 'giou', got {mode!r}")
    if not is_aligned:
        boxes1, boxes2 = boxes1[:, None, :], boxes2[None, :, :]
    area1, area2 = box_area(boxes1), box_area(boxes2)
    top_left = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    overlap = (bottom_right - top_left).clamp(min=0).prod(-1)
    union = (area1 + area2 - overlap).clamp(min=eps)
    iou = overlap / union
    if mode == "iou":
        return iou
    enclose = (torch.maximum(boxes1[..., 2:], boxes2[..., 2:])
               - torch.minimum(boxes1[..., :2], boxes2[..., :2])).clamp(min=0).prod(-1).clamp(min=eps)
    return iou - (enclose - union) / enclose


def _nms_with_torch_ops(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    order = scores.argsort(descending=True, stable=True)
    if order.numel() == 0:
        return order
    # "i suppresses j" for i ranked above j, then one pass in rank order on the host.
    suppresses = (bbox_overlaps(boxes[order], boxes[order]) > iou_threshold).triu_(diagonal=1).cpu()
    keep = torch.ones(order.numel(), dtype=torch.bool)
    for i in range(order.numel()):
        if keep[i]:
            keep[i + 1:] &= ~suppresses[i, i + 1:]
    return order[keep.to(order.device)]


if _library.has_ops():
    torch.library.register_kernel("dcn_plugin::nms", "CUDA", _nms_with_torch_ops)

    @torch.library.register_fake("dcn_plugin::nms")
    def _nms_fake(boxes, scores, iou_threshold):
        return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.long)
