"""Two-stage detectors: backbone -> neck -> region proposals -> RoI head, as an mmengine ``BaseModel``."""

from __future__ import annotations

import copy

from torch import Tensor

from ...registry import MODELS
from .base import BaseDetector

__all__ = ["TwoStageDetector", "FasterRCNN", "RFCN"]


def _get(cfg, key):
    return copy.deepcopy(cfg.get(key)) if cfg is not None else None


@MODELS.register_module()
class TwoStageDetector(BaseDetector):
    """``backbone`` -> optional ``neck`` -> ``rpn_head`` (proposals) -> ``roi_head``.

    ``train_cfg`` holds ``rpn`` (the RPN's assigner and sampler), ``rpn_proposal`` (how training
    makes proposals) and ``rcnn`` (the RoI head's assigner and sampler); ``test_cfg`` holds ``rpn``
    and ``rcnn``. ``forward(inputs, data_samples, mode)`` as :class:`SingleStageDetector`; in
    ``'tensor'`` mode it returns the RPN's outputs and the RoI head's ``(cls_score, bbox_pred)``.
    """

    def __init__(self, backbone: dict, rpn_head: dict, roi_head: dict, neck: dict | None = None,
                 train_cfg: dict | None = None, test_cfg: dict | None = None,
                 data_preprocessor: dict | None = None, init_cfg=None):
        super().__init__(backbone, neck, data_preprocessor, init_cfg)
        rpn_head = copy.deepcopy(rpn_head)
        rpn_head.update(train_cfg=_get(train_cfg, "rpn"), test_cfg=_get(test_cfg, "rpn"))
        self.rpn_head = MODELS.build(rpn_head)
        roi_head = copy.deepcopy(roi_head)
        roi_head.update(train_cfg=_get(train_cfg, "rcnn"), test_cfg=_get(test_cfg, "rcnn"))
        self.roi_head = MODELS.build(roi_head)
        self.train_cfg = copy.deepcopy(train_cfg)
        self.test_cfg = copy.deepcopy(test_cfg)

    def rpn_feats(self, feats: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The feature levels the RPN sees (all of them)."""
        return feats

    def forward(self, inputs: Tensor, data_samples: list | None = None, mode: str = "tensor"):
        feats = self.extract_feat(inputs)
        if mode == "loss":
            proposal_cfg = _get(self.train_cfg, "rpn_proposal")
            losses, proposals = self.rpn_head.loss_and_predict(self.rpn_feats(feats), data_samples,
                                                               proposal_cfg)
            losses.update(self.roi_head.loss(feats, proposals, data_samples))
            return losses
        if mode == "predict":
            proposals = self.rpn_head.predict(self.rpn_feats(feats), data_samples)
            return self.add_predictions(data_samples,
                                        self.roi_head.predict(feats, proposals, data_samples, rescale=True))
        if mode == "tensor":
            rpn_outs = self.rpn_head(self.rpn_feats(feats))
            metainfos = [s.metainfo for s in data_samples] if data_samples else [
                dict(img_shape=tuple(inputs.shape[-2:]))] * len(inputs)
            proposals = self.rpn_head.predict_by_feat(*rpn_outs, metainfos)
            return rpn_outs, self.roi_head(feats, proposals)
        raise ValueError(f"{type(self).__name__}.forward: mode must be 'loss', 'predict' or 'tensor', "
                         f"got {mode!r}")


@MODELS.register_module()
class FasterRCNN(TwoStageDetector):
    """Faster R-CNN (Ren et al., 2015): an RPN and a ``StandardRoIHead``."""


@MODELS.register_module()
class RFCN(TwoStageDetector):
    """R-FCN (Dai et al., 2016): the RPN on all feature levels but the last, the position-sensitive
    ``RFCNRoIHead`` on the last (the dilated C5 of Deformable ConvNets)."""

    def rpn_feats(self, feats: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        if len(feats) < 2:
            raise ValueError("RFCN: the backbone must give at least two levels (the RPN's and the head's)")
        return tuple(feats[:-1])
