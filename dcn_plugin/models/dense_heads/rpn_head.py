"""Region proposal network (Ren et al., 2015), mmdet's ``RPNHead`` arguments.

A shared 3x3 conv per level, then per anchor an objectness logit and box deltas. Training assigns
anchors to ground truth boxes by IoU, samples them and takes binary cross-entropy and L1 on the
deltas; proposals are the best-scoring decoded anchors after NMS within each level.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmengine.model import BaseModule
from mmengine.structures import InstanceData
from torch import Tensor, nn

from ...registry import MODELS, TASK_UTILS
from ..bbox import batched_nms

__all__ = ["RPNHead"]


@MODELS.register_module()
class RPNHead(BaseModule):
    """RPN head.

    Args:
        in_channels: channels of every input level.
        feat_channels: channels of the shared conv.
        num_convs: 3x3 convs (with ReLU) before the predictions.
        anchor_generator / bbox_coder: ``TASK_UTILS`` configs (``AnchorGenerator``,
            ``DeltaXYWHBBoxCoder``).
        loss_cls / loss_bbox: binary cross-entropy and L1 by default, as mmdet.
        train_cfg: ``assigner``, ``sampler`` (``TASK_UTILS`` configs); as mmdet's, ``allowed_border``
            (>= 0: only anchors within the image by that margin are trained; default -1: all in
            ``pad_shape``) and ``pos_weight`` (> 0: the positives' classification weight).
        test_cfg: ``nms_pre`` (per level), ``nms=dict(iou_threshold=...)``, ``max_per_img``,
            ``min_bbox_size``; the detector passes its ``rpn_proposal`` config in training.
    """

    def __init__(self, in_channels: int, feat_channels: int = 256, num_convs: int = 1,
                 anchor_generator: dict | None = None, bbox_coder: dict | None = None,
                 loss_cls: dict | None = None, loss_bbox: dict | None = None, num_classes: int = 1,
                 train_cfg: dict | None = None, test_cfg: dict | None = None, init_cfg=None):
        super().__init__(init_cfg=init_cfg if init_cfg is not None else dict(type="Normal", layer="Conv2d",
                                                                                std=0.01))
        if num_classes != 1:
            raise ValueError(f"RPNHead: num_classes must be 1 (object or not), got {num_classes}")
        self.anchor_generator = TASK_UTILS.build(copy.deepcopy(anchor_generator or dict(
            type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32, 64])))
        self.bbox_coder = TASK_UTILS.build(copy.deepcopy(bbox_coder or dict(type="DeltaXYWHBBoxCoder")))
        self.loss_cls = MODELS.build(copy.deepcopy(loss_cls or dict(type="CrossEntropyLoss",
                                                                    use_sigmoid=True)))
        self.loss_bbox = MODELS.build(copy.deepcopy(loss_bbox or dict(type="L1Loss")))
        self.train_cfg = copy.deepcopy(train_cfg)
        self.test_cfg = copy.deepcopy(test_cfg) if test_cfg is not None else dict(
            nms_pre=1000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0)
        if self.train_cfg is not None:
            self.assigner = TASK_UTILS.build(copy.deepcopy(self.train_cfg["assigner"]))
            self.sampler = TASK_UTILS.build(copy.deepcopy(self.train_cfg["sampler"]))
        anchors = self.anchor_generator.num_base_priors
        if len(set(anchors)) != 1:
            raise ValueError(f"RPNHead: every level must have the same number of anchors per cell, "
                             f"got {anchors}")
        self.num_anchors = anchors[0]
        # mmdet's layout, so that its checkpoints load: one conv, or a stack of ConvModules.
        if num_convs == 1:
            self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        else:
            self.rpn_conv = nn.Sequential(*(
                ConvModule(in_channels if i == 0 else feat_channels, feat_channels, 3, padding=1,
                           inplace=False) for i in range(num_convs)))
        self.rpn_cls = nn.Conv2d(feat_channels, self.num_anchors, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, self.num_anchors * 4, 1)

    def forward(self, feats: tuple[Tensor, ...]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: objectness logits (B, A, H, W) and deltas (B, A * 4, H, W)."""
        if len(feats) != self.anchor_generator.num_levels:
            raise ValueError(f"RPNHead: got {len(feats)} feature levels, the anchor generator has "
                             f"{self.anchor_generator.num_levels}")
        scores, deltas = [], []
        for feat in feats:
            x = F.relu(self.rpn_conv(feat))
            scores.append(self.rpn_cls(x))
            deltas.append(self.rpn_reg(x))
        return scores, deltas

    def _anchors(self, cls_scores: list[Tensor], metainfos: list[dict]) -> tuple[Tensor, Tensor]:
        """All levels' anchors (N, 4) and, per image, which are valid (B, N)."""
        sizes = [tuple(score.shape[-2:]) for score in cls_scores]
        device = cls_scores[0].device
        anchors = torch.cat(self.anchor_generator.grid_priors(sizes, device=device))
        valid = torch.stack([torch.cat(self.anchor_generator.valid_flags(
            sizes, meta.get("pad_shape", meta.get("batch_input_shape", (1 << 30, 1 << 30))), device))
            for meta in metainfos])
        return anchors, valid

    @staticmethod
    def _flatten(maps: list[Tensor], channels: int) -> Tensor:
        """Per-level (B, A * channels, H, W) -> (B, N, channels), anchors in the generator's order."""
        batch = maps[0].shape[0]
        return torch.cat([m.permute(0, 2, 3, 1).reshape(batch, -1, channels) for m in maps], 1)

    # ----------------------------------------------------------------------------------------
    def loss(self, feats: tuple[Tensor, ...], data_samples: list) -> dict[str, Tensor]:
        return self.loss_by_feat(*self(feats), data_samples)

    def loss_and_predict(self, feats: tuple[Tensor, ...], data_samples: list,
                         proposal_cfg: dict | None = None) -> tuple[dict[str, Tensor], list[InstanceData]]:
        """The losses, and the proposals (detached) made with ``proposal_cfg``."""
        outs = self(feats)
        losses = self.loss_by_feat(*outs, data_samples)
        proposals = self.predict_by_feat(*outs, [s.metainfo for s in data_samples], cfg=proposal_cfg)
        return losses, proposals

    def loss_by_feat(self, cls_scores: list[Tensor], bbox_preds: list[Tensor], data_samples: list) -> dict:
        anchors, valid = self._anchors(cls_scores, [s.metainfo for s in data_samples])
        labels, label_weights, targets, target_weights, avg_factor = self.get_targets(
            anchors, valid, [s.gt_instances for s in data_samples], [s.metainfo for s in data_samples])
        scores = self._flatten(cls_scores, 1).reshape(-1)
        deltas = self._flatten(bbox_preds, 4).reshape(-1, 4)
        loss_cls = self.loss_cls(scores.float(), (labels == 0).float(), label_weights, avg_factor=avg_factor)
        loss_bbox = self.loss_bbox(deltas.float(), targets, target_weights, avg_factor=avg_factor)
        return dict(loss_rpn_cls=loss_cls, loss_rpn_bbox=loss_bbox)

    @torch.no_grad()
    def get_targets(self, anchors: Tensor, valid: Tensor, gt_instances: list[InstanceData],
                    metainfos: list[dict]):
        """Targets of every anchor of every image, flattened (B * N): labels (0 object, 1 background),
        label weights (1 where sampled), delta targets (B * N, 4) and weights, and the number of
        sampled anchors (the losses' ``avg_factor``)."""
        if self.train_cfg is None:
            raise RuntimeError("RPNHead: training needs train_cfg with an assigner and a sampler")
        labels, label_weights, targets, target_weights, sampled = [], [], [], [], 0
        allowed_border = self.train_cfg.get("allowed_border", -1)
        pos_weight = self.train_cfg.get("pos_weight", -1)
        for image_valid, gt, meta in zip(valid, gt_instances, metainfos, strict=True):
            if allowed_border >= 0:
                height, width = meta["img_shape"][:2]
                image_valid = (image_valid & (anchors[:, 0] >= -allowed_border)
                               & (anchors[:, 1] >= -allowed_border) & (anchors[:, 2] < width + allowed_border)
                               & (anchors[:, 3] < height + allowed_border))
            inside = image_valid.nonzero().flatten()
            gt_boxes = gt.bboxes.to(anchors)
            assign = self.assigner.assign(anchors[inside], gt_boxes, gt.labels)
            sample = self.sampler.sample(assign, anchors[inside], gt_boxes, gt.labels)
            image_labels = anchors.new_ones(len(anchors), dtype=torch.long)
            image_weights = anchors.new_zeros(len(anchors))
            image_targets = anchors.new_zeros(len(anchors), 4)
            image_target_weights = anchors.new_zeros(len(anchors), 4)
            pos, neg = inside[sample.pos_inds], inside[sample.neg_inds]
            image_labels[pos] = 0
            image_weights[neg] = 1.0
            image_weights[pos] = pos_weight if pos_weight > 0 else 1.0
            if len(pos):
                image_targets[pos] = self.bbox_coder.encode(sample.pos_priors, sample.pos_gt_bboxes)
                image_target_weights[pos] = 1.0
            labels.append(image_labels)
            label_weights.append(image_weights)
            targets.append(image_targets)
            target_weights.append(image_target_weights)
            sampled += sample.avg_factor
        return (torch.cat(labels), torch.cat(label_weights), torch.cat(targets), torch.cat(target_weights),
                max(sampled, 1))

    # ----------------------------------------------------------------------------------------
    def predict(self, feats: tuple[Tensor, ...], data_samples: list,
                rescale: bool = False) -> list[InstanceData]:
        """Proposals in input pixels (``rescale`` must be False: they feed the RoI head)."""
        if rescale:
            raise ValueError("RPNHead.predict: proposals stay in input pixels (rescale=False)")
        return self.predict_by_feat(*self(feats), [s.metainfo for s in data_samples])

    @torch.no_grad()
    def predict_by_feat(self, cls_scores: list[Tensor], bbox_preds: list[Tensor], metainfos: list[dict],
                        cfg: dict | None = None) -> list[InstanceData]:
        """Per image: ``InstanceData(bboxes (P, 4), scores (P,), labels (P,) zeros)``, best first.

        Per level the ``nms_pre`` best anchors (equal scores: the earlier anchor first; mmdet's
        unstable sort leaves them in an order of torch's choosing) are decoded (clipped to
        ``img_shape``); where ``min_bbox_size >= 0`` (as mmdet's) boxes not wider and taller than
        it are dropped; NMS runs within each level; the ``max_per_img`` best are kept. Computes
        in the scores' dtype, float32 at least.
        """
        cfg = cfg if cfg is not None else self.test_cfg
        dtype = torch.promote_types(cls_scores[0].dtype, torch.float32)
        anchors = self.anchor_generator.grid_priors([tuple(s.shape[-2:]) for s in cls_scores], dtype=dtype,
                                                    device=cls_scores[0].device)
        nms_pre, max_per_img = cfg.get("nms_pre", -1), cfg.get("max_per_img", -1)
        iou_threshold = cfg.get("nms", {}).get("iou_threshold", 0.7)
        min_size = cfg.get("min_bbox_size", -1)
        proposals = []
        for image, meta in enumerate(metainfos):
            boxes, scores, levels = [], [], []
            for level, (score_map, delta_map, level_anchors) in enumerate(zip(cls_scores, bbox_preds, anchors,
                                                                             strict=True)):
                score = score_map[image].permute(1, 2, 0).reshape(-1).to(dtype).sigmoid()
                delta = delta_map[image].permute(1, 2, 0).reshape(-1, 4).to(dtype)
                if 0 < nms_pre < len(score):
                    score, keep = score.sort(descending=True, stable=True)
                    score, keep = score[:nms_pre], keep[:nms_pre]
                    delta, level_anchors = delta[keep], level_anchors[keep]
                boxes.append(self.bbox_coder.decode(level_anchors, delta, max_shape=meta.get("img_shape")))
                scores.append(score)
                levels.append(torch.full_like(score, level, dtype=torch.long))
            boxes, scores, levels = torch.cat(boxes), torch.cat(scores), torch.cat(levels)
            if min_size >= 0:
                width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
                kept = (width > min_size) & (height > min_size)
                boxes, scores, levels = boxes[kept], scores[kept], levels[kept]
            dets, keep = batched_nms(boxes, scores, levels, iou_threshold, max_per_img)
            proposals.append(InstanceData(bboxes=dets[:, :4], scores=dets[:, 4],
                                          labels=levels.new_zeros(len(keep))))
        return proposals
