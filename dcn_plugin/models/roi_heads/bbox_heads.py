"""Second-stage box heads: classify each RoI (``num_classes`` + background) and refine its box.

- ``Shared2FCBBoxHead`` (Faster R-CNN): two shared fully connected layers on the pooled RoI.
- ``PSRoIBBoxHead`` (R-FCN, Dai et al., 2016): position-sensitive score maps, pooled bin by bin
  with (deformable) position-sensitive RoI pooling and averaged ("voting").

Both share :class:`BBoxHead`'s targets, losses and decoding (mmdet's ``BBoxHead``).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmengine.structures import InstanceData
from torch import Tensor, nn

from ...ops import deform_psroi_pool
from ...registry import MODELS, TASK_UTILS
from ..bbox import batched_nms

__all__ = ["BBoxHead", "Shared2FCBBoxHead", "PSRoIBBoxHead"]


class BBoxHead(BaseModule):
    """Targets, losses and decoding of a second-stage box head.

    Subclasses compute ``cls_score`` (R, num_classes + 1) (background last) and ``bbox_pred``
    (R, 4) with ``reg_class_agnostic`` or (R, 4 * num_classes) otherwise: deltas from the RoI by
    ``bbox_coder``.

    Args:
        num_classes: object classes (no background).
        bbox_coder: a ``TASK_UTILS`` coder config (mmdet's Faster R-CNN stds by default).
        loss_cls / loss_bbox: softmax cross-entropy and L1 by default.
    """

    def __init__(self, num_classes: int, bbox_coder: dict | None = None, reg_class_agnostic: bool = False,
                 loss_cls: dict | None = None, loss_bbox: dict | None = None, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        if num_classes < 1:
            raise ValueError(f"{type(self).__name__}: num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.reg_class_agnostic = reg_class_agnostic
        self.bbox_coder = TASK_UTILS.build(copy.deepcopy(bbox_coder or dict(
            type="DeltaXYWHBBoxCoder", target_means=[0.0, 0.0, 0.0, 0.0], target_stds=[0.1, 0.1, 0.2, 0.2])))
        self.loss_cls = MODELS.build(copy.deepcopy(loss_cls or dict(type="CrossEntropyLoss",
                                                                    use_sigmoid=False)))
        self.loss_bbox = MODELS.build(copy.deepcopy(loss_bbox or dict(type="L1Loss")))

    @property
    def reg_channels(self) -> int:
        return 4 if self.reg_class_agnostic else 4 * self.num_classes

    @torch.no_grad()
    def get_targets(self, sampling_results: list,
                    pos_weight: float = -1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For the sampled RoIs of all images (positives then negatives, image by image): labels
        (R,) (``num_classes`` for background), label weights (R,) (``pos_weight`` for positives
        where it is > 0, else 1), delta targets (R, 4), weights."""
        labels, label_weights, targets, weights = [], [], [], []
        for result in sampling_results:
            num_pos, num_neg = len(result.pos_priors), len(result.neg_priors)
            image_labels = result.pos_priors.new_full((num_pos + num_neg,), self.num_classes,
                                                      dtype=torch.long)
            image_labels[:num_pos] = result.pos_gt_labels
            image_label_weights = result.pos_priors.new_ones(num_pos + num_neg)
            image_label_weights[:num_pos] = pos_weight if pos_weight > 0 else 1.0
            image_targets = result.pos_priors.new_zeros(num_pos + num_neg, 4)
            image_weights = result.pos_priors.new_zeros(num_pos + num_neg, 4)
            if num_pos:
                image_targets[:num_pos] = self.bbox_coder.encode(result.pos_priors, result.pos_gt_bboxes)
                image_weights[:num_pos] = 1.0
            labels.append(image_labels)
            label_weights.append(image_label_weights)
            targets.append(image_targets)
            weights.append(image_weights)
        return torch.cat(labels), torch.cat(label_weights), torch.cat(targets), torch.cat(weights)

    def loss_and_target(self, cls_score: Tensor, bbox_pred: Tensor, sampling_results: list,
                        pos_weight: float = -1) -> dict[str, Tensor]:
        """``loss_cls``, ``loss_bbox`` and ``acc`` (percent of sampled RoIs classified right)."""
        labels, label_weights, targets, target_weights = self.get_targets(sampling_results, pos_weight)
        avg_factor = max(float((label_weights > 0).sum()), 1.0)
        loss_cls = self.loss_cls(cls_score.float(), labels, label_weights, avg_factor=avg_factor)
        pos = (labels < self.num_classes).nonzero().flatten()
        if len(pos) == 0:
            loss_bbox = bbox_pred.sum() * 0.0
        else:
            deltas = bbox_pred.float().view(len(bbox_pred), -1, 4)
            deltas = deltas[pos, 0] if self.reg_class_agnostic else deltas[pos, labels[pos]]
            loss_bbox = self.loss_bbox(deltas, targets[pos], target_weights[pos], avg_factor=len(targets))
        acc = (cls_score.argmax(1) == labels).float().mean() * 100
        return dict(loss_cls=loss_cls, loss_bbox=loss_bbox, acc=acc.detach())

    @torch.no_grad()
    def predict_by_feat(self, rois: Tensor, cls_score: Tensor, bbox_pred: Tensor, metainfos: list[dict],
                        test_cfg: dict, rescale: bool = True) -> list[InstanceData]:
        """Per image: ``InstanceData(bboxes (K, 4), scores (K,), labels (K,))``, best first.

        Every RoI gives one box per class (decoded, clipped to ``img_shape``, divided by the scale
        factor when ``rescale``) scored by the class's softmax probability; boxes scoring above
        ``score_thr`` go through class-aware NMS and the ``max_per_img`` best are kept.
        """
        results = []
        counts = [int((rois[:, 0] == i).sum()) for i in range(len(metainfos))]
        probabilities = F.softmax(cls_score.float(), -1)
        for image_rois, scores, deltas, meta in zip(rois.split(counts), probabilities.split(counts),
                                                    bbox_pred.float().split(counts), metainfos, strict=True):
            num = len(image_rois)
            deltas = deltas.view(num, self.reg_channels // 4, 4).expand(num, self.num_classes, 4)
            boxes = self.bbox_coder.decode(image_rois[:, None, 1:].expand(num, self.num_classes, 4), deltas,
                                           max_shape=meta.get("img_shape"))
            if rescale and "scale_factor" in meta:
                # Times the reciprocal, as mmdet's scale_boxes (a division rounds differently).
                boxes = boxes * boxes.new_tensor([1 / s for s in meta["scale_factor"][:2]]).repeat(2)
            scores = scores[:, :self.num_classes]
            labels = torch.arange(self.num_classes, device=scores.device).expand(num, -1)
            valid = scores > test_cfg.get("score_thr", 0.05)
            boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
            iou_threshold = test_cfg.get("nms", {}).get("iou_threshold", 0.5)
            dets, keep = batched_nms(boxes, scores, labels, iou_threshold, test_cfg.get("max_per_img", 100))
            results.append(InstanceData(bboxes=dets[:, :4], scores=dets[:, 4], labels=labels[keep]))
        return results


@MODELS.register_module()
class Shared2FCBBoxHead(BBoxHead):
    """Faster R-CNN's box head (mmdet's ``Shared2FCBBoxHead``): the pooled RoI (R, C, k, k)
    flattened, two fully connected layers with ReLU, then ``fc_cls`` and ``fc_reg``."""

    def __init__(self, in_channels: int = 256, fc_out_channels: int = 1024, roi_feat_size: int = 7,
                 num_classes: int = 80, init_cfg=None, **kwargs):
        init_cfg = init_cfg if init_cfg is not None else [
            dict(type="Normal", std=0.01, override=dict(name="fc_cls")),
            dict(type="Normal", std=0.001, override=dict(name="fc_reg")),
            dict(type="Xavier", distribution="uniform", override=dict(name="shared_fcs")),
        ]
        super().__init__(num_classes, init_cfg=init_cfg, **kwargs)
        self.in_channels = in_channels
        self.roi_feat_size = roi_feat_size
        flat = in_channels * roi_feat_size * roi_feat_size
        self.shared_fcs = nn.ModuleList([nn.Linear(flat, fc_out_channels), nn.Linear(fc_out_channels,
                                                                                    fc_out_channels)])
        self.fc_cls = nn.Linear(fc_out_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_out_channels, self.reg_channels)

    def forward(self, roi_feats: Tensor) -> tuple[Tensor, Tensor]:
        """(R, C, k, k) -> ``cls_score`` (R, num_classes + 1), ``bbox_pred`` (R, 4 or 4 * num_classes)."""
        x = roi_feats.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


@MODELS.register_module()
class PSRoIBBoxHead(BBoxHead):
    """R-FCN's head on the last feature map, as Deformable ConvNets' R-FCN.

    A 1x1 conv (``feat_channels``, ReLU), then position-sensitive score maps: ``k^2 (C + 1)`` for
    the classes and ``k^2 * 4`` (``reg_class_agnostic``) or ``k^2 * 4 (C + 1)`` for the boxes, with
    ``k = group_size``. Bin ``(i, j)`` of a RoI pools only its own maps; the RoI's scores are the
    average over its bins. Unless ``no_trans``, each of the two poolings is deformable: offsets per
    part come from a 1x1 conv to ``k^2 * 2 * offset classes`` maps (zero-initialised, so training
    starts from plain R-FCN) pooled without offsets, one offset class per class for the scores and
    one for the boxes, scaled by ``trans_std``.

    ``forward(feat (B, in_channels, H, W), rois (R, 5))`` returns ``cls_score`` (R, C + 1) and
    ``bbox_pred`` (R, 4 or 4 (C + 1)).
    """

    def __init__(self, in_channels: int, num_classes: int, feat_channels: int = 256, group_size: int = 7,
                 sample_per_part: int = 4, trans_std: float = 0.1, no_trans: bool = False,
                 spatial_scale: float = 1 / 16, reg_class_agnostic: bool = True, init_cfg=None, **kwargs):
        init_cfg = init_cfg if init_cfg is not None else dict(type="Normal", layer="Conv2d", std=0.01)
        super().__init__(num_classes, reg_class_agnostic=reg_class_agnostic, init_cfg=init_cfg, **kwargs)
        self.group_size = group_size
        self.sample_per_part = sample_per_part
        self.trans_std = float(trans_std)
        self.no_trans = no_trans
        self.spatial_scale = float(spatial_scale)
        bins = group_size * group_size
        self.conv_new = nn.Conv2d(in_channels, feat_channels, 1)
        self.conv_cls = nn.Conv2d(feat_channels, bins * (num_classes + 1), 1)
        self.conv_reg = nn.Conv2d(feat_channels, bins * self.reg_outputs, 1)
        if not no_trans:
            self.conv_cls_offset = nn.Conv2d(feat_channels, bins * 2 * (num_classes + 1), 1)
            self.conv_reg_offset = nn.Conv2d(feat_channels, bins * 2, 1)

    @property
    def reg_outputs(self) -> int:
        """Box outputs per RoI: 4, or 4 per class and background (Deformable ConvNets' layout)."""
        return 4 if self.reg_class_agnostic else 4 * (self.num_classes + 1)

    def init_weights(self) -> None:
        super().init_weights()
        if not self.no_trans:
            for conv in (self.conv_cls_offset, self.conv_reg_offset):
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)

    def part_offsets(self, x: Tensor, rois: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The offsets of the class-score and box pooling for ``rois``, from ``x`` (the 1x1 conv's
        output): ``(R, 2 * (C + 1), k, k)`` (x, then y, per class) and ``(R, 2, k, k)``, in units of
        ``trans_std`` times the RoI's size; None with ``no_trans``."""
        if self.no_trans:
            return None, None
        k = self.group_size

        def pool(maps: Tensor) -> Tensor:
            return deform_psroi_pool(maps, rois, None, self.spatial_scale, maps.shape[1] // (k * k), k, k, k,
                                     self.sample_per_part)

        return pool(self.conv_cls_offset(x)), pool(self.conv_reg_offset(x))

    def _pool(self, maps: Tensor, rois: Tensor, output_dim: int, offset: Tensor | None) -> Tensor:
        """(R, output_dim, k, k): ``maps`` pooled bin by bin, moved by ``offset`` where given."""
        k = self.group_size
        return deform_psroi_pool(maps, rois, offset, self.spatial_scale, output_dim, k, k, k,
                                 self.sample_per_part, self.trans_std if offset is not None else 0.0)

    def forward(self, feat: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
        x = F.relu(self.conv_new(feat))
        cls_offset, reg_offset = self.part_offsets(x, rois)
        cls_score = self._pool(self.conv_cls(x), rois, self.num_classes + 1, cls_offset).mean((2, 3))
        bbox_pred = self._pool(self.conv_reg(x), rois, self.reg_outputs, reg_offset).mean((2, 3))
        if not self.reg_class_agnostic:
            bbox_pred = bbox_pred.view(len(rois), self.num_classes + 1, 4)[:, :self.num_classes].flatten(1)
        return cls_score, bbox_pred
