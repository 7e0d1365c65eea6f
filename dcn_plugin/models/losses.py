"""Detection losses (mmdet's names and arguments): focal, (G)IoU, cross-entropy, L1 and smooth L1.

Every loss is called as ``loss(pred, target, weight=None, avg_factor=None)`` and returns
``loss_weight * sum(elementwise * weight) / avg_factor`` (the mean when ``avg_factor`` is None).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import MODELS
from .bbox import bbox_overlaps

__all__ = ["FocalLoss", "IoULoss", "GIoULoss", "CrossEntropyLoss", "L1Loss", "SmoothL1Loss"]


def _reduce(loss: Tensor, weight: Tensor | None, avg_factor: float | Tensor | None) -> Tensor:
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return loss.mean()
    # eps keeps an empty batch (avg_factor 0) at zero instead of NaN.
    return loss.sum() / (avg_factor + torch.finfo(torch.float32).eps)


class _Loss(nn.Module):
    def __init__(self, loss_weight: float = 1.0):
        super().__init__()
        self.loss_weight = float(loss_weight)

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None,
                avg_factor: float | Tensor | None = None) -> Tensor:
        return self.loss_weight * _reduce(self.elementwise(pred, target), weight, avg_factor)

    def elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError


@MODELS.register_module()
class FocalLoss(_Loss):
    """Sigmoid focal loss (Lin et al., 2017).

    ``pred``: (N, C) logits; ``target``: (N,) labels in ``[0, C]``, where ``C`` is background.
    """

    def __init__(self, use_sigmoid: bool = True, gamma: float = 2.0, alpha: float = 0.25,
                 loss_weight: float = 1.0):
        super().__init__(loss_weight)
        if not use_sigmoid:
            raise ValueError("FocalLoss: only use_sigmoid=True is supported")
        self.gamma, self.alpha = float(gamma), float(alpha)

    def elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        num_classes = pred.shape[1]
        one_hot = F.one_hot(target.long(), num_classes + 1)[:, :num_classes].to(pred.dtype)
        prob = pred.sigmoid()
        p_wrong = prob * (1 - one_hot) + (1 - prob) * one_hot
        alpha = self.alpha * one_hot + (1 - self.alpha) * (1 - one_hot)
        bce = F.binary_cross_entropy_with_logits(pred, one_hot, reduction="none")
        return alpha * p_wrong.pow(self.gamma) * bce

    def forward(self, pred, target, weight=None, avg_factor=None):
        if weight is not None and weight.dim() == 1:
            weight = weight[:, None]
        return super().forward(pred, target, weight, avg_factor)


@MODELS.register_module()
class IoULoss(_Loss):
    """``1 - IoU`` (``mode='linear'``) or ``-log(IoU)`` (``mode='log'``) of aligned boxes (N, 4)."""

    def __init__(self, mode: str = "log", eps: float = 1e-6, loss_weight: float = 1.0):
        super().__init__(loss_weight)
        if mode not in ("linear", "log"):
            raise ValueError(f"IoULoss: mode must be 'linear' or 'log', got {mode!r}")
        self.mode, self.eps = mode, eps

    def elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        iou = bbox_overlaps(pred, target, is_aligned=True).clamp(min=self.eps)
        return 1 - iou if self.mode == "linear" else -iou.log()


@MODELS.register_module()
class GIoULoss(_Loss):
    """``1 - GIoU`` of aligned boxes (N, 4) (Rezatofighi et al., 2019)."""

    def elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        return 1 - bbox_overlaps(pred, target, mode="giou", is_aligned=True)


@MODELS.register_module()
class CrossEntropyLoss(_Loss):
    """Cross-entropy on logits.

    ``use_sigmoid=True``: binary, ``pred`` and ``target`` of one shape (e.g. FCOS's centerness, the
    RPN's objectness). ``use_sigmoid=False``: softmax over ``pred`` (N, C) against labels (N,).
    """

    def __init__(self, use_sigmoid: bool = False, loss_weight: float = 1.0):
        super().__init__(loss_weight)
        self.use_sigmoid = use_sigmoid

    def elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        if self.use_sigmoid:
            return F.binary_cross_entropy_with_logits(pred, target.to(pred.dtype), reduction="none")
        return F.cross_entropy(pred, target.long(), reduction="none")


@MODELS.register_module()
class L1Loss(_Loss):
    """``|pred - target|`` elementwise (e.g. box deltas (N, 4))."""

    def elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        return (pred - target).abs()


@MODELS.register_module()
class SmoothL1Loss(_Loss):
    """Huber-style L1: ``0.5 * d^2 / beta`` below ``beta``, ``d - 0.5 * beta`` above."""

    def __init__(self, beta: float = 1.0, loss_weight: float = 1.0):
        super().__init__(loss_weight)
        if beta <= 0:
            raise ValueError(f"SmoothL1Loss: beta must be positive, got {beta}")
        self.beta = float(beta)

    def elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        diff = (pred - target).abs()
        return torch.where(diff < self.beta, 0.5 * diff * diff / self.beta, diff - 0.5 * self.beta)
