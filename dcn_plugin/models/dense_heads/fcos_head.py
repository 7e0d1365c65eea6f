"""FCOS: anchor-free one-stage head (Tian et al., 2019), mmdet's ``FCOSHead`` arguments.

Each FPN level gets a classification tower and a regression tower of ``stacked_convs`` 3x3
ConvModules (GroupNorm + ReLU). Every location predicts per-class scores, the distances
``(left, top, right, bottom)`` to the sides of its object's box, and a centerness logit.
"""

from __future__ import annotations

import copy

import torch
from mmcv.cnn import ConvModule, Scale
from mmengine.dist import get_world_size
from mmengine.model import BaseModule
from mmengine.structures import InstanceData
from torch import Tensor, nn

from ...registry import MODELS
from ...structures import batch_geometry, instances_from_batch
from ..bbox import clip_boxes, distance2bbox

__all__ = ["FCOSHead"]

INF = 1e8


def reduce_mean(tensor: Tensor) -> Tensor:
    """Mean over the processes of a distributed run (the tensor itself otherwise)."""
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    tensor = tensor.clone()
    torch.distributed.all_reduce(tensor.div_(world_size))
    return tensor


@MODELS.register_module()
class FCOSHead(BaseModule):
    """FCOS head.

    Args:
        num_classes: number of object classes (no background class).
        in_channels: channels of every input level.
        feat_channels: channels of the towers.
        stacked_convs: convs per tower.
        strides: stride of each input level, in input pixels.
        regress_ranges: per level, the ``(low, high]`` range of ``max(l, t, r, b)`` it is
            responsible for.
        dcn_on_last_conv: build the last conv of each tower with ``dcn_cfg``.
        dcn_cfg: the deformable layer for ``dcn_on_last_conv`` (mmdet's choice, DCNv2, by default).
        conv_cfg: the other conv layers of the towers (e.g. ``dict(type='DCN')`` for all of them).
        center_sampling / center_sample_radius: positives only within ``radius * stride`` of the
            box centre.
        norm_on_bbox: regress distances divided by the level's stride (through ReLU, not exp).
        centerness_on_reg: centerness from the regression tower instead of the classification one.
        loss_cls / loss_bbox / loss_centerness: loss configs.
        test_cfg: ``nms_pre``, ``score_thr``, ``nms=dict(iou_threshold=...)``, ``max_per_img``,
            ``min_bbox_size`` (see :meth:`detect`).
    """

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int = 256,
                 stacked_convs: int = 4, strides=(4, 8, 16, 32, 64),
                 regress_ranges=((-1, 64), (64, 128), (128, 256), (256, 512), (512, INF)),
                 dcn_on_last_conv: bool = False, dcn_cfg: dict | None = None, conv_bias="auto",
                 conv_cfg: dict | None = None,
                 norm_cfg: dict | None = None, center_sampling: bool = False,
                 center_sample_radius: float = 1.5, norm_on_bbox: bool = False,
                 centerness_on_reg: bool = False,
                 loss_cls: dict | None = None, loss_bbox: dict | None = None,
                 loss_centerness: dict | None = None, train_cfg: dict | None = None,
                 test_cfg: dict | None = None, init_cfg=None):
        if init_cfg is None:
            init_cfg = dict(type="Normal", layer="Conv2d", std=0.01,
                            override=dict(type="Normal", name="conv_cls", std=0.01, bias_prob=0.01))
        super().__init__(init_cfg=init_cfg)
        if num_classes < 1:
            raise ValueError(f"FCOSHead: num_classes must be >= 1, got {num_classes}")
        if len(regress_ranges) != len(strides):
            raise ValueError(f"FCOSHead: regress_ranges has {len(regress_ranges)} levels but strides has "
                             f"{len(strides)}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.feat_channels = feat_channels
        self.stacked_convs = stacked_convs
        self.strides = tuple(strides)
        self.regress_ranges = tuple(tuple(float(v) for v in r) for r in regress_ranges)
        self.dcn_on_last_conv = dcn_on_last_conv
        self.dcn_cfg = copy.deepcopy(dcn_cfg) if dcn_cfg is not None else dict(type="DCNv2")
        self.conv_cfg = copy.deepcopy(conv_cfg)
        self.norm_cfg = copy.deepcopy(norm_cfg if norm_cfg is not None
                                      else dict(type="GN", num_groups=32, requires_grad=True))
        self.conv_bias = self.norm_cfg is None if conv_bias == "auto" else conv_bias
        self.center_sampling = center_sampling
        self.center_sample_radius = center_sample_radius
        self.norm_on_bbox = norm_on_bbox
        self.centerness_on_reg = centerness_on_reg
        self.train_cfg = copy.deepcopy(train_cfg)
        self.test_cfg = copy.deepcopy(test_cfg) if test_cfg is not None else dict(
            nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5),
            max_per_img=100)
        self.loss_cls = MODELS.build(copy.deepcopy(loss_cls) if loss_cls is not None else dict(
            type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0))
        self.loss_bbox = MODELS.build(copy.deepcopy(loss_bbox) if loss_bbox is not None
                                      else dict(type="IoULoss", loss_weight=1.0))
        self.loss_centerness = MODELS.build(copy.deepcopy(loss_centerness) if loss_centerness is not None
                                            else dict(type="CrossEntropyLoss", use_sigmoid=True,
                                                      loss_weight=1.0))

        self.cls_convs = self._tower()
        self.reg_convs = self._tower()
        self.conv_cls = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.conv_reg = nn.Conv2d(feat_channels, 4, 3, padding=1)
        self.conv_centerness = nn.Conv2d(feat_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in self.strides)

    def _tower(self) -> nn.Sequential:
        layers = []
        for i in range(self.stacked_convs):
            last = i == self.stacked_convs - 1
            conv_cfg = self.dcn_cfg if self.dcn_on_last_conv and last else self.conv_cfg
            layers.append(ConvModule(self.in_channels if i == 0 else self.feat_channels,
                                     self.feat_channels, 3, padding=1,
                                     conv_cfg=copy.deepcopy(conv_cfg), norm_cfg=copy.deepcopy(self.norm_cfg),
                                     bias=self.conv_bias))
        return nn.Sequential(*layers)

    # ----------------------------------------------------------------------------------------
    def forward(self, feats: tuple[Tensor, ...]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per level: cls scores (B, num_classes, H, W), distances (B, 4, H, W), centerness (B, 1, H, W).

        Distances are in input pixels, except with ``norm_on_bbox`` in training, where they are in
        units of the level's stride (the targets are scaled alike).
        """
        if len(feats) != len(self.strides):
            raise ValueError(f"FCOSHead: got {len(feats)} feature levels, strides has {len(self.strides)}")
        cls_scores, bbox_preds, centernesses = [], [], []
        for feat, scale, stride in zip(feats, self.scales, self.strides, strict=True):
            cls_feat = self.cls_convs(feat)
            reg_feat = self.reg_convs(feat)
            cls_scores.append(self.conv_cls(cls_feat))
            centernesses.append(self.conv_centerness(reg_feat if self.centerness_on_reg else cls_feat))
            bbox_pred = scale(self.conv_reg(reg_feat)).float()
            if self.norm_on_bbox:
                bbox_pred = bbox_pred.clamp(min=0)
                if not self.training:
                    bbox_pred = bbox_pred * stride
            else:
                bbox_pred = bbox_pred.exp()
            bbox_preds.append(bbox_pred)
        return cls_scores, bbox_preds, centernesses

    def points(self, sizes: list[tuple[int, int]], device, dtype=torch.float32) -> list[Tensor]:
        """Per level, the (H*W, 2) input-pixel centres ``(x, y)`` of the feature cells, row-major."""
        points = []
        for (h, w), stride in zip(sizes, self.strides, strict=True):
            ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * stride
            xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * stride
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            points.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], -1))
        return points

    # ----------------------------------------------------------------------------------------
    def loss(self, feats: tuple[Tensor, ...], data_samples: list) -> dict[str, Tensor]:
        return self.loss_by_feat(*self(feats), [s.gt_instances for s in data_samples])

    def loss_by_feat(self, cls_scores: list[Tensor], bbox_preds: list[Tensor], centernesses: list[Tensor],
                     gt_instances: list[InstanceData]) -> dict[str, Tensor]:
        sizes = [tuple(score.shape[-2:]) for score in cls_scores]
        points = self.points(sizes, cls_scores[0].device)
        labels, bbox_targets = self.get_targets(points, gt_instances)
        batch = cls_scores[0].shape[0]

        def flatten(maps: list[Tensor], channels: int) -> Tensor:
            return torch.cat([m.permute(0, 2, 3, 1).reshape(batch, -1, channels) for m in maps], 1).reshape(
                -1, channels)

        flat_cls = flatten(cls_scores, self.num_classes)
        flat_bbox = flatten(bbox_preds, 4).float()
        flat_centerness = flatten(centernesses, 1).reshape(-1)
        flat_points = torch.cat(points).repeat(batch, 1)

        pos = ((labels >= 0) & (labels < self.num_classes)).nonzero().reshape(-1)
        num_pos = reduce_mean(torch.tensor(float(pos.numel()), device=flat_cls.device)).clamp(min=1.0)
        loss_cls = self.loss_cls(flat_cls.float(), labels, avg_factor=num_pos)

        pos_bbox_preds = flat_bbox[pos]
        pos_centerness = flat_centerness[pos].float()
        if pos.numel() == 0:
            # Zero losses that still reach every parameter (DDP needs all grads each step).
            return dict(loss_cls=loss_cls, loss_bbox=pos_bbox_preds.sum(),
                        loss_centerness=pos_centerness.sum())
        pos_targets = bbox_targets[pos]
        centerness_targets = self.centerness_target(pos_targets)
        centerness_denorm = reduce_mean(centerness_targets.sum().detach()).clamp(min=1e-6)
        pos_points = flat_points[pos]
        loss_bbox = self.loss_bbox(distance2bbox(pos_points, pos_bbox_preds),
                                   distance2bbox(pos_points, pos_targets),
                                   weight=centerness_targets, avg_factor=centerness_denorm)
        loss_centerness = self.loss_centerness(pos_centerness, centerness_targets, avg_factor=num_pos)
        return dict(loss_cls=loss_cls, loss_bbox=loss_bbox, loss_centerness=loss_centerness)

    @staticmethod
    def centerness_target(distances: Tensor) -> Tensor:
        """(N, 4) positive distances -> (N,) ``sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))``."""
        left_right, top_bottom = distances[:, [0, 2]], distances[:, [1, 3]]
        ratio = (left_right.min(-1).values / left_right.max(-1).values.clamp(min=1e-6)) * (
            top_bottom.min(-1).values / top_bottom.max(-1).values.clamp(min=1e-6))
        return ratio.clamp(min=0).sqrt()

    @torch.no_grad()
    def get_targets(self, points: list[Tensor], gt_instances: list[InstanceData]) -> tuple[Tensor, Tensor]:
        """Assigns every location to the smallest box that contains it within its level's range.

        Returns, flattened over images then levels then locations: labels (B*P,) with
        ``num_classes`` for background, and distance targets (B*P, 4) (over the stride with
        ``norm_on_bbox``).
        """
        num_levels = len(points)
        ranges = torch.cat([points[i].new_tensor(self.regress_ranges[i]).expand(len(points[i]), 2)
                            for i in range(num_levels)])
        strides = torch.cat([points[i].new_full((len(points[i]),), float(self.strides[i]))
                             for i in range(num_levels)])
        all_points = torch.cat(points)
        labels, targets = [], []
        for gt in gt_instances:
            image_labels, image_targets = self._targets_single(gt.bboxes.to(all_points), gt.labels,
                                                               all_points, ranges, strides)
            labels.append(image_labels)
            targets.append(image_targets)
        return torch.cat(labels), torch.cat(targets)

    def _targets_single(self, gt_bboxes: Tensor, gt_labels: Tensor, points: Tensor, ranges: Tensor,
                        strides: Tensor) -> tuple[Tensor, Tensor]:
        num_points, num_gts = points.shape[0], gt_bboxes.shape[0]
        if num_gts == 0:
            return (gt_labels.new_full((num_points,), self.num_classes, dtype=torch.long),
                    points.new_zeros((num_points, 4)))
        xs, ys = points[:, 0, None], points[:, 1, None]
        # (P, G, 4) distances from every point to every box's sides.
        distances = torch.stack([xs - gt_bboxes[:, 0], ys - gt_bboxes[:, 1],
                                 gt_bboxes[:, 2] - xs, gt_bboxes[:, 3] - ys], -1)
        if self.center_sampling:
            centre_x = (gt_bboxes[:, 0] + gt_bboxes[:, 2]) / 2
            centre_y = (gt_bboxes[:, 1] + gt_bboxes[:, 3]) / 2
            radius = strides[:, None] * self.center_sample_radius
            # The centre region, clipped to the box.
            region = torch.stack([torch.maximum(centre_x - radius, gt_bboxes[:, 0]),
                                  torch.maximum(centre_y - radius, gt_bboxes[:, 1]),
                                  torch.minimum(centre_x + radius, gt_bboxes[:, 2]),
                                  torch.minimum(centre_y + radius, gt_bboxes[:, 3])], -1)
            inside = torch.stack([xs - region[..., 0], ys - region[..., 1],
                                  region[..., 2] - xs, region[..., 3] - ys], -1).min(-1).values > 0
        else:
            inside = distances.min(-1).values > 0
        max_distance = distances.max(-1).values
        in_range = (max_distance > ranges[:, :1]) & (max_distance <= ranges[:, 1:])
        areas = ((gt_bboxes[:, 2] - gt_bboxes[:, 0]) * (gt_bboxes[:, 3] - gt_bboxes[:, 1]))[None].expand(
            num_points, num_gts).clone()
        areas[~(inside & in_range)] = INF
        min_area, assigned = areas.min(1)
        labels = gt_labels.long()[assigned]
        labels[min_area == INF] = self.num_classes
        targets = distances[torch.arange(num_points, device=points.device), assigned]
        if self.norm_on_bbox:
            targets = targets / strides[:, None]
        return labels, targets

    # ----------------------------------------------------------------------------------------
    def predict(self, feats: tuple[Tensor, ...], data_samples: list,
                rescale: bool = True) -> list[InstanceData]:
        return self.predict_by_feat(*self(feats), [s.metainfo for s in data_samples], rescale=rescale)

    @torch.no_grad()
    def predict_by_feat(self, cls_scores: list[Tensor], bbox_preds: list[Tensor], centernesses: list[Tensor],
                        img_metas: list[dict], rescale: bool = True) -> list[InstanceData]:
        """Per image: ``InstanceData(bboxes (K, 4), scores (K,), labels (K,))``, by decreasing score.

        Boxes are in the original image's pixels when ``rescale`` (``img_shape`` pixels otherwise).
        """
        img_shapes, scale_factors = batch_geometry(img_metas, rescale, cls_scores[0].device)
        detections = self.detect(cls_scores, bbox_preds, centernesses, img_shapes, scale_factors)
        return instances_from_batch(*detections)

    def detect(self, cls_scores: list[Tensor], bbox_preds: list[Tensor], centernesses: list[Tensor],
               img_shapes: Tensor, scale_factors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Decoding and class-aware NMS of a batch, in tensors of fixed size (what ONNX export traces).

        Per level, the ``nms_pre`` best (location, class) pairs above ``score_thr`` are decoded into
        boxes clipped to the image and scored ``sigmoid(cls) * sigmoid(centerness)``; the boxes are
        divided by the scale factor, those not wider and taller than ``min_bbox_size`` dropped, and
        the best ``max_per_img`` that survive NMS (``torch.ops.dcn_plugin.multiclass_nms``) kept.

        Args:
            cls_scores, bbox_preds, centernesses: the head's outputs, per level (B, *, H, W).
            img_shapes: (B, 2) ``(h, w)`` of each image inside the padded input; boxes are clipped to it.
            scale_factors: (B, 2) ``(w_scale, h_scale)`` of each image from its original.

        Returns:
            ``boxes`` (B, D, 4), ``scores`` (B, D), ``labels`` (B, D) int64, by decreasing score; rows
            past an image's detections hold zero boxes, score -1 and label -1.
        """
        sizes = [tuple(score.shape[-2:]) for score in cls_scores]
        points = self.points(sizes, cls_scores[0].device)
        candidates = [self._level_candidates(*level, img_shapes)
                      for level in zip(cls_scores, bbox_preds, centernesses, points, strict=True)]
        boxes, scores, labels = (torch.cat(parts, 1) for parts in zip(*candidates, strict=True))
        boxes = boxes / scale_factors.to(boxes).repeat(1, 2)[:, None, :]
        min_size = self.test_cfg.get("min_bbox_size", 0)
        if min_size > 0:
            width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
            scores = torch.where((width > min_size) & (height > min_size), scores, -1.0)
        return self._nms(boxes, scores, labels)

    def _level_candidates(self, cls_score: Tensor, bbox_pred: Tensor, centerness: Tensor, points: Tensor,
                          img_shapes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One level's candidates: boxes (B, k, 4), scores (B, k) (-1: none), labels (B, k)."""
        batch = cls_score.shape[0]
        cls = cls_score.permute(0, 2, 3, 1).reshape(batch, -1).float().sigmoid()  # (B, H*W*C)
        dist = bbox_pred.permute(0, 2, 3, 1).reshape(batch, -1, 4).float()
        centerness = centerness.reshape(batch, -1).float().sigmoid()
        cls = torch.where(cls > self.test_cfg.get("score_thr", 0.0), cls, -1.0)
        nms_pre = self.test_cfg.get("nms_pre", -1)
        if nms_pre > 0:
            # Padded, so that k = nms_pre is valid however small the level is.
            top, index = torch.cat([cls, cls.new_full((batch, nms_pre), -1.0)], 1).topk(nms_pre, dim=1)
            index = index.clamp(max=cls.shape[1] - 1)
        else:
            top, index = cls.sort(dim=1, descending=True)
        location, label = index // self.num_classes, index % self.num_classes
        boxes = distance2bbox(points[location], dist.gather(1, location[..., None].expand(-1, -1, 4)))
        scores = torch.where(top >= 0, top * centerness.gather(1, location), -1.0)
        return clip_boxes(boxes, img_shapes), scores, label

    def _nms(self, boxes: Tensor, scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Class-aware NMS of candidates (B, M) (score -1: none), then the ``max_per_img`` best."""
        cfg = self.test_cfg
        classes = torch.arange(self.num_classes, device=labels.device)
        class_scores = torch.where(labels[:, None, :] == classes[:, None], scores[:, None, :], -1.0)
        max_num = cfg.get("max_per_img", -1)
        iou_threshold = cfg.get("nms", dict(iou_threshold=0.5)).get("iou_threshold", 0.5)
        # Candidates score >= 0, placeholders -1: a threshold between keeps exactly the candidates.
        per_class = max_num if max_num >= 0 else 2**31 - 1
        keep = torch.ops.dcn_plugin.multiclass_nms(boxes, class_scores, per_class, iou_threshold, -0.5)
        image, box = keep[:, 0], keep[:, 2]
        kept = torch.full_like(scores, -1.0).index_put((image, box), scores[image, box])
        top, order = kept.sort(dim=1, descending=True)
        if max_num >= 0:
            top, order = top[:, :max_num], order[:, :max_num]
        found = top >= 0
        boxes = torch.where(found[..., None], boxes.gather(1, order[..., None].expand(-1, -1, 4)), 0.0)
        return boxes, top, torch.where(found, labels.gather(1, order), -1)
