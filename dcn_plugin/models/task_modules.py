"""What two-stage detectors train with, mmdetection's names and arguments: anchors, box coding,
IoU assignment and sampling.

- ``AnchorGenerator``: anchors per feature level, one set per cell, in mmdet's order.
- ``DeltaXYWHBBoxCoder``: boxes as centre and log-size deltas from a reference box.
- ``MaxIoUAssigner``: each prior's ground truth box by IoU (``AssignResult``).
- ``RandomSampler``: a fixed number of positives and negatives (``SamplingResult``).

All are registered in ``TASK_UTILS``. Boxes are ``(N, 4)`` ``x1, y1, x2, y2`` in input pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..registry import TASK_UTILS
from .bbox import bbox_overlaps

__all__ = ["AnchorGenerator", "DeltaXYWHBBoxCoder", "MaxIoUAssigner", "AssignResult", "RandomSampler",
           "SamplingResult"]


@TASK_UTILS.register_module()
class AnchorGenerator:
    """Anchors of a feature pyramid, as mmdet's ``AnchorGenerator``.

    Level ``i`` has base anchors of size ``base_sizes[i] * scale`` (``base_sizes`` default to the
    strides) for every scale and ratio (``ratio = h / w``, area kept), centred at
    ``center_offset * stride`` and repeated at every cell. With ``scale_major`` the scales vary
    fastest within a ratio (mmdet's order).

    Args:
        strides: stride of each level, in input pixels.
        ratios: height/width ratios.
        scales: anchor scales (multiples of the base size); or ``octave_base_scale`` and
            ``scales_per_octave`` for ``octave_base_scale * 2 ** (i / scales_per_octave)``.
    """

    def __init__(self, strides: Sequence[int], ratios: Sequence[float], scales: Sequence[float] | None = None,
                 base_sizes: Sequence[int] | None = None, scale_major: bool = True,
                 octave_base_scale: float | None = None, scales_per_octave: int | None = None,
                 center_offset: float = 0.0):
        if (scales is None) == (octave_base_scale is None):
            raise ValueError("AnchorGenerator: give either scales or octave_base_scale and scales_per_octave")
        if scales is None:
            scales = [octave_base_scale * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)]
        self.strides = [int(s) if not isinstance(s, (tuple, list)) else int(s[0]) for s in strides]
        self.base_sizes = list(base_sizes) if base_sizes is not None else list(self.strides)
        if len(self.base_sizes) != len(self.strides):
            raise ValueError(f"AnchorGenerator: {len(self.base_sizes)} base_sizes for "
                             f"{len(self.strides)} strides")
        self.ratios = torch.tensor(ratios, dtype=torch.float32)
        self.scales = torch.tensor(scales, dtype=torch.float32)
        self.scale_major = scale_major
        self.center_offset = center_offset
        self.base_anchors = [self._base_anchors(size) for size in self.base_sizes]

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def num_base_priors(self) -> list[int]:
        """Anchors per cell, per level."""
        return [len(anchors) for anchors in self.base_anchors]

    def _base_anchors(self, base_size: float) -> Tensor:
        center = self.center_offset * base_size
        h_ratios = self.ratios.sqrt()
        w_ratios = 1 / h_ratios
        if self.scale_major:
            ws = (base_size * w_ratios[:, None] * self.scales[None, :]).reshape(-1)
            hs = (base_size * h_ratios[:, None] * self.scales[None, :]).reshape(-1)
        else:
            ws = (base_size * self.scales[:, None] * w_ratios[None, :]).reshape(-1)
            hs = (base_size * self.scales[:, None] * h_ratios[None, :]).reshape(-1)
        return torch.stack([center - 0.5 * ws, center - 0.5 * hs, center + 0.5 * ws, center + 0.5 * hs], -1)

    def grid_priors(self, sizes: Sequence[tuple[int, int]], dtype=torch.float32,
                    device="cpu") -> list[Tensor]:
        """Per level ``(H * W * A, 4)``: cells row-major, the ``A`` base anchors within a cell."""
        if len(sizes) != self.num_levels:
            raise ValueError(f"AnchorGenerator: {len(sizes)} feature levels for {self.num_levels} strides")
        priors = []
        for (h, w), stride, base in zip(sizes, self.strides, self.base_anchors, strict=True):
            xs = torch.arange(w, device=device, dtype=dtype) * stride
            ys = torch.arange(h, device=device, dtype=dtype) * stride
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([xx, yy, xx, yy], -1).reshape(-1, 1, 4)
            priors.append((shifts + base.to(device=device, dtype=dtype)[None]).reshape(-1, 4))
        return priors

    def valid_flags(self, sizes: Sequence[tuple[int, int]], pad_shape: tuple[int, int],
                    device="cpu") -> list[Tensor]:
        """Per level ``(H * W * A,)``: whether the anchor's cell lies inside the padded image."""
        flags = []
        for (h, w), stride, count in zip(sizes, self.strides, self.num_base_priors, strict=True):
            valid_h = min(math.ceil(pad_shape[0] / stride), h)
            valid_w = min(math.ceil(pad_shape[1] / stride), w)
            valid = torch.zeros(h, w, dtype=torch.bool, device=device)
            valid[:valid_h, :valid_w] = True
            flags.append(valid.reshape(-1, 1).expand(-1, count).reshape(-1))
        return flags


@TASK_UTILS.register_module()
class DeltaXYWHBBoxCoder:
    """Boxes as deltas ``(dx, dy, dw, dh)`` from reference boxes, normalised by means and stds
    (mmdet's ``DeltaXYWHBBoxCoder``): ``dx = (gx - px) / pw``, ``dw = log(gw / pw)``."""

    def __init__(self, target_means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
                 target_stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0), clip_border: bool = True,
                 wh_ratio_clip: float = 16 / 1000):
        self.means = tuple(float(m) for m in target_means)
        self.stds = tuple(float(s) for s in target_stds)
        self.clip_border = clip_border
        self.wh_ratio_clip = wh_ratio_clip

    def encode(self, boxes: Tensor, gt_boxes: Tensor) -> Tensor:
        """``(N, 4)`` deltas that turn ``boxes`` into ``gt_boxes`` (both ``(N, 4)``)."""
        boxes, gt_boxes = boxes.float(), gt_boxes.float()
        # Centres as mmdet's (x1 + x2) / 2, not x1 + w / 2: the same float32 rounding.
        pw, ph = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        px, py = (boxes[:, 0] + boxes[:, 2]) * 0.5, (boxes[:, 1] + boxes[:, 3]) * 0.5
        gw, gh = gt_boxes[:, 2] - gt_boxes[:, 0], gt_boxes[:, 3] - gt_boxes[:, 1]
        gx, gy = (gt_boxes[:, 0] + gt_boxes[:, 2]) * 0.5, (gt_boxes[:, 1] + gt_boxes[:, 3]) * 0.5
        deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, (gw / pw).log(), (gh / ph).log()], -1)
        return (deltas - deltas.new_tensor(self.means)) / deltas.new_tensor(self.stds)

    def decode(self, boxes: Tensor, deltas: Tensor, max_shape: Tensor | tuple | None = None) -> Tensor:
        """Applies ``deltas`` (..., 4) to ``boxes`` (..., 4); with ``clip_border`` clips to
        ``max_shape`` (h, w), a tuple or a tensor broadcasting against ``(..., 2)``."""
        deltas = deltas * deltas.new_tensor(self.stds) + deltas.new_tensor(self.means)
        max_ratio = abs(math.log(self.wh_ratio_clip))
        dw = deltas[..., 2].clamp(-max_ratio, max_ratio)
        dh = deltas[..., 3].clamp(-max_ratio, max_ratio)
        pw, ph = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        px, py = (boxes[..., 0] + boxes[..., 2]) * 0.5, (boxes[..., 1] + boxes[..., 3]) * 0.5
        gx, gy = px + pw * deltas[..., 0], py + ph * deltas[..., 1]
        gw, gh = pw * dw.exp(), ph * dh.exp()
        x1, y1, x2, y2 = gx - 0.5 * gw, gy - 0.5 * gh, gx + 0.5 * gw, gy + 0.5 * gh
        if self.clip_border and max_shape is not None:
            shape = torch.as_tensor(max_shape, dtype=x1.dtype, device=x1.device)
            height, width = shape[..., 0], shape[..., 1]
            x1, x2 = torch.minimum(x1.clamp(min=0), width), torch.minimum(x2.clamp(min=0), width)
            y1, y2 = torch.minimum(y1.clamp(min=0), height), torch.minimum(y2.clamp(min=0), height)
        return torch.stack([x1, y1, x2, y2], -1)


@dataclass
class AssignResult:
    """Which ground truth box each of N priors got.

    ``gt_inds`` (N,) int64: 0 negative, -1 ignored, ``i + 1`` ground truth ``i``; ``max_overlaps``
    (N,) the prior's best IoU; ``labels`` (N,) the assigned box's label, -1 where none.
    """

    num_gts: int
    gt_inds: Tensor
    max_overlaps: Tensor
    labels: Tensor

    def add_gt_(self, gt_labels: Tensor) -> None:
        """Puts the ground truth boxes first, as priors assigned to themselves."""
        own = torch.arange(1, len(gt_labels) + 1, dtype=torch.long, device=self.gt_inds.device)
        self.gt_inds = torch.cat([own, self.gt_inds])
        self.max_overlaps = torch.cat([self.max_overlaps.new_ones(len(gt_labels)), self.max_overlaps])
        self.labels = torch.cat([gt_labels.long(), self.labels])


@TASK_UTILS.register_module()
class MaxIoUAssigner:
    """mmdet's ``MaxIoUAssigner``.

    A prior is negative when its best IoU with any box is in ``[0, neg_iou_thr)`` (or within the
    pair ``neg_iou_thr``), positive for its best box when that IoU is at least ``pos_iou_thr``.
    With ``match_low_quality``, each box then also takes the priors of its highest IoU (all of
    them with ``gt_max_assign_all``) when that IoU is at least ``min_pos_iou``; this overrides the
    rules above, later boxes over earlier ones.
    """

    def __init__(self, pos_iou_thr: float, neg_iou_thr: float | tuple[float, float], min_pos_iou: float = 0.0,
                 gt_max_assign_all: bool = True, match_low_quality: bool = True, ignore_iof_thr: float = -1,
                 iou_calculator: dict | None = None):
        if ignore_iof_thr > 0:
            raise ValueError("MaxIoUAssigner: ignore_iof_thr > 0 (ignored boxes) is not supported")
        self.pos_iou_thr = pos_iou_thr
        self.neg_iou_thr = neg_iou_thr
        self.min_pos_iou = min_pos_iou
        self.gt_max_assign_all = gt_max_assign_all
        self.match_low_quality = match_low_quality

    def assign(self, priors: Tensor, gt_bboxes: Tensor, gt_labels: Tensor) -> AssignResult:
        num_gts, num_priors = len(gt_bboxes), len(priors)
        if num_gts == 0 or num_priors == 0:
            return AssignResult(num_gts, priors.new_zeros(num_priors, dtype=torch.long),
                                priors.new_zeros(num_priors), priors.new_full((num_priors,), -1,
                                                                              dtype=torch.long))
        overlaps = bbox_overlaps(gt_bboxes.float(), priors.float())  # (G, N)
        max_overlaps, best_gt = overlaps.max(0)
        gt_max_overlaps, _ = overlaps.max(1)
        gt_inds = priors.new_full((num_priors,), -1, dtype=torch.long)
        if isinstance(self.neg_iou_thr, (tuple, list)):
            low, high = self.neg_iou_thr
            gt_inds[(max_overlaps >= low) & (max_overlaps < high)] = 0
        else:
            gt_inds[(max_overlaps >= 0) & (max_overlaps < self.neg_iou_thr)] = 0
        positive = max_overlaps >= self.pos_iou_thr
        gt_inds[positive] = best_gt[positive] + 1
        if self.match_low_quality:
            for i in range(num_gts):
                if gt_max_overlaps[i] >= self.min_pos_iou:
                    if self.gt_max_assign_all:
                        gt_inds[overlaps[i] == gt_max_overlaps[i]] = i + 1
                    else:
                        gt_inds[overlaps[i].argmax()] = i + 1
        labels = torch.where(gt_inds > 0, gt_labels.long()[(gt_inds - 1).clamp(min=0)], -1)
        return AssignResult(num_gts, gt_inds, max_overlaps, labels)


@dataclass
class SamplingResult:
    """The priors a sampler chose: ``pos_inds`` / ``neg_inds`` into its priors (ground truth boxes
    first when it added them), the chosen priors, and each positive's box, label and index."""

    pos_inds: Tensor
    neg_inds: Tensor
    pos_priors: Tensor
    neg_priors: Tensor
    pos_gt_bboxes: Tensor
    pos_gt_labels: Tensor
    pos_assigned_gt_inds: Tensor
    pos_is_gt: Tensor

    @property
    def priors(self) -> Tensor:
        """Positives then negatives, ``(P + N, 4)``."""
        return torch.cat([self.pos_priors, self.neg_priors])

    @property
    def avg_factor(self) -> int:
        """What a sampled loss divides by: positives plus negatives, each counted as at least one
        (mmdet's), so that an image without positives still weighs in."""
        return max(len(self.pos_inds), 1) + max(len(self.neg_inds), 1)


@TASK_UTILS.register_module()
class RandomSampler:
    """mmdet's ``RandomSampler``: up to ``num * pos_fraction`` positives at random, negatives to fill
    ``num`` (at most ``neg_pos_ub`` per positive when that is >= 0). ``add_gt_as_proposals`` puts the
    ground truth boxes among the priors first. The chosen indices come sorted, as mmdet's.

    Draws as mmdet's do: ``torch.randperm`` on the CPU generator, positives then negatives, and only
    where there are more candidates than places; so with the same seed both choose the same priors.
    """

    def __init__(self, num: int, pos_fraction: float, neg_pos_ub: int = -1, add_gt_as_proposals: bool = True):
        self.num = num
        self.pos_fraction = pos_fraction
        self.neg_pos_ub = neg_pos_ub
        self.add_gt_as_proposals = add_gt_as_proposals

    @staticmethod
    def _choose(indices: Tensor, count: int) -> Tensor:
        if len(indices) <= count:
            return indices
        return indices[torch.randperm(len(indices))[:count].to(indices.device)].sort().values

    def sample(self, assign: AssignResult, priors: Tensor, gt_bboxes: Tensor,
               gt_labels: Tensor) -> SamplingResult:
        priors = priors[:, :4]
        is_gt = priors.new_zeros(len(priors), dtype=torch.bool)
        if self.add_gt_as_proposals and len(gt_bboxes) > 0:
            priors = torch.cat([gt_bboxes.to(priors), priors])
            assign.add_gt_(gt_labels)
            is_gt = torch.cat([is_gt.new_ones(len(gt_bboxes)), is_gt])
        pos = self._choose(torch.nonzero(assign.gt_inds > 0).flatten(), int(self.num * self.pos_fraction))
        num_neg = self.num - len(pos)
        if self.neg_pos_ub >= 0:
            num_neg = min(num_neg, int(self.neg_pos_ub * max(1, len(pos))))
        neg = self._choose(torch.nonzero(assign.gt_inds == 0).flatten(), num_neg)
        assigned = assign.gt_inds[pos] - 1
        pos_gt = gt_bboxes.to(priors)[assigned] if len(gt_bboxes) else priors.new_zeros((0, 4))
        return SamplingResult(pos, neg, priors[pos], priors[neg], pos_gt, assign.labels[pos], assigned,
                              is_gt[pos])
