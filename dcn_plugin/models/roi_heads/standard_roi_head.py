"""Second stages of two-stage detectors: sample the proposals, pool them, classify and refine.

- ``StandardRoIHead`` (mmdet's): a RoI extractor on the pyramid, then a box head.
- ``RFCNRoIHead``: R-FCN's head, which pools position-sensitive maps of the last feature map.
"""

from __future__ import annotations

import copy

import torch
from mmengine.model import BaseModule
from mmengine.structures import InstanceData
from torch import Tensor

from ...registry import MODELS, TASK_UTILS

__all__ = ["bbox2roi", "StandardRoIHead", "RFCNRoIHead"]


def bbox2roi(boxes: list[Tensor]) -> Tensor:
    """Per-image boxes (K_i, 4) -> RoIs (sum K_i, 5) ``[image index, x1, y1, x2, y2]``."""
    return torch.cat([torch.cat([b.new_full((len(b), 1), float(i)), b[:, :4]], 1)
                      for i, b in enumerate(boxes)])


@MODELS.register_module()
class StandardRoIHead(BaseModule):
    """mmdet's ``StandardRoIHead`` (boxes only).

    Args:
        bbox_roi_extractor: e.g. ``SingleRoIExtractor`` with ``roi_layer=dict(type='RoIAlign' |
            'DeformRoIPoolPack' | 'ModulatedDeformRoIPoolPack', ...)``.
        bbox_head: e.g. ``Shared2FCBBoxHead``.
        train_cfg: ``assigner`` and ``sampler`` (``TASK_UTILS`` configs) for the proposals;
            ``pos_weight`` (> 0: the positives' classification weight), as mmdet's.
        test_cfg: ``score_thr``, ``nms=dict(iou_threshold=...)``, ``max_per_img``.
    """

    def __init__(self, bbox_head: dict, bbox_roi_extractor: dict | None = None, train_cfg: dict | None = None,
                 test_cfg: dict | None = None, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        self.bbox_roi_extractor = (MODELS.build(copy.deepcopy(bbox_roi_extractor))
                                   if bbox_roi_extractor is not None else None)
        self.bbox_head = MODELS.build(copy.deepcopy(bbox_head))
        self.train_cfg = copy.deepcopy(train_cfg)
        self.test_cfg = copy.deepcopy(test_cfg) if test_cfg is not None else dict(
            score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100)
        if self.train_cfg is not None:
            self.assigner = TASK_UTILS.build(copy.deepcopy(self.train_cfg["assigner"]))
            self.sampler = TASK_UTILS.build(copy.deepcopy(self.train_cfg["sampler"]))

    def _bbox_forward(self, feats: tuple[Tensor, ...], rois: Tensor) -> tuple[Tensor, Tensor]:
        """``cls_score`` (R, C + 1) and ``bbox_pred`` of RoIs (R, 5)."""
        return self.bbox_head(self.bbox_roi_extractor(feats, rois))

    def forward(self, feats: tuple[Tensor, ...], proposals: list[InstanceData]) -> tuple[Tensor, Tensor]:
        return self._bbox_forward(feats, bbox2roi([p.bboxes for p in proposals]))

    def loss(self, feats: tuple[Tensor, ...], proposals: list[InstanceData], data_samples: list) -> dict:
        """Assigns and samples each image's proposals, then the box head's losses."""
        if self.train_cfg is None:
            raise RuntimeError(f"{type(self).__name__}: training needs train_cfg with an assigner and a "
                               "sampler")
        sampling_results = []
        for proposal, sample in zip(proposals, data_samples, strict=True):
            gt = sample.gt_instances
            boxes = proposal.bboxes.detach()
            gt_boxes = gt.bboxes.to(boxes)
            assign = self.assigner.assign(boxes, gt_boxes, gt.labels)
            sampling_results.append(self.sampler.sample(assign, boxes, gt_boxes, gt.labels))
        rois = bbox2roi([result.priors for result in sampling_results])
        cls_score, bbox_pred = self._bbox_forward(feats, rois)
        return self.bbox_head.loss_and_target(cls_score, bbox_pred, sampling_results,
                                              self.train_cfg.get("pos_weight", -1))

    def predict(self, feats: tuple[Tensor, ...], proposals: list[InstanceData], data_samples: list,
                rescale: bool = True) -> list[InstanceData]:
        rois = bbox2roi([p.bboxes for p in proposals])
        cls_score, bbox_pred = self._bbox_forward(feats, rois)
        return self.bbox_head.predict_by_feat(rois, cls_score, bbox_pred, [s.metainfo for s in data_samples],
                                              self.test_cfg, rescale=rescale)


@MODELS.register_module()
class RFCNRoIHead(StandardRoIHead):
    """R-FCN's second stage: ``bbox_head`` (a ``PSRoIBBoxHead``) pools the last feature map itself,
    so there is no RoI extractor."""

    def __init__(self, bbox_head: dict, train_cfg: dict | None = None, test_cfg: dict | None = None,
                 init_cfg=None):
        super().__init__(bbox_head, None, train_cfg, test_cfg, init_cfg)

    def _bbox_forward(self, feats: tuple[Tensor, ...], rois: Tensor) -> tuple[Tensor, Tensor]:
        return self.bbox_head(feats[-1], rois)
