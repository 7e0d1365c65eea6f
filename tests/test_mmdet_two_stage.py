"""Our Faster R-CNN against mmdetection 3.3.0's, the oracle: the same parameters (its checkpoints
load into ours), the same numbers from the same weights, and the same task modules.

Runs where mmcv-full and mmdetection are installed (``bash ../shared/tools/mmcv-full-env.sh``, then
this file with that venv's python). The detectors run on the CPU in float32 (mmcv-full's NMS takes
float32 only). Where both sides do the same arithmetic the results are compared exactly.

What stays different on purpose:

- Equal scores: mmdet orders them as torch's unstable CPU sort leaves them (choosing a level's
  ``nms_pre`` best, and in mmcv-full's NMS), an order that varies with the torch build; ours puts the
  earlier first (torchvision's NMS). Outputs are compared with equal scores ordered by box.
- mmdet's ``batched_nms`` runs one NMS per class once there are 10000 boxes or more (a speed-up);
  ours always shifts the classes apart. The boxes kept are the same up to float rounding.
- Boxes below zero: mmcv's class shift (max + 1 per label) can overlap two classes (a bug); ours
  cannot (tested).
- mmdet's IoU does not clamp the areas of degenerate boxes (x2 < x1) at zero; ours does.
- mmcv-full's deformable RoI pooling has no CPU kernel; where it has none, the ``dpool``/``mdpool``
  comparison skips (tests/test_mmdet_compat.py compares ours at zero offsets with its RoIAlign).
"""

from __future__ import annotations

import copy
import os.path as osp

import pytest
import torch
from extras import require

require("mmcv.ops", "mmdet")

import mmdet  # noqa: E402
from mmdet.models.task_modules import AnchorGenerator as MAnchorGenerator  # noqa: E402
from mmdet.models.task_modules import DeltaXYWHBBoxCoder as MDeltaXYWHBBoxCoder  # noqa: E402
from mmdet.models.task_modules import MaxIoUAssigner as MMaxIoUAssigner  # noqa: E402
from mmdet.models.task_modules import RandomSampler as MRandomSampler  # noqa: E402
from mmdet.registry import MODELS as MMDET_MODELS  # noqa: E402
from mmdet.structures import DetDataSample as MDetDataSample  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config, ConfigDict  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

import dcn_plugin.models  # noqa: E402,F401
from dcn_plugin.models.roi_heads import bbox2roi  # noqa: E402
from dcn_plugin.models.task_modules import (  # noqa: E402
    AnchorGenerator,
    DeltaXYWHBBoxCoder,
    MaxIoUAssigner,
    RandomSampler,
)
from dcn_plugin.registry import MODELS  # noqa: E402
from dcn_plugin.structures import DetDataSample  # noqa: E402

register_all_modules(init_default_scope=False)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
MMDET_CONFIGS = osp.join(osp.dirname(mmdet.__file__), ".mim", "configs")
OURS = {"": "faster-rcnn_r50_fpn_1x_coco.py", "dpool": "faster-rcnn_r50_fpn_dpool_1x_coco.py",
        "mdpool": "faster-rcnn_r50_fpn_mdpool_1x_coco.py"}
EXACT = dict(rtol=0, atol=0)


def _mmdet_config(variant: str) -> Config:
    if variant == "":
        return Config.fromfile(osp.join(MMDET_CONFIGS, "faster_rcnn", "faster-rcnn_r50_fpn_1x_coco.py"))
    folder = "dcn" if variant == "dpool" else "dcnv2"
    return Config.fromfile(osp.join(MMDET_CONFIGS, folder, f"faster-rcnn_r50_fpn_{variant}_1x_coco.py"))


def _build_pair(variant: str = ""):
    """(mmdetection's model, ours) from the two configs, without the pretrained backbone."""
    mmdet_cfg, our_cfg = _mmdet_config(variant), Config.fromfile(osp.join(ROOT, "configs", "faster_rcnn",
                                                                           OURS[variant]))
    mmdet_cfg.model.backbone.init_cfg = None
    our_cfg.model.backbone.init_cfg = None
    with DefaultScope.overwrite_default_scope("mmdet"):
        reference = MMDET_MODELS.build(mmdet_cfg.model)
    with DefaultScope.overwrite_default_scope("dcn_plugin"):
        ours = MODELS.build(our_cfg.model)
    return reference, ours


@pytest.mark.parametrize("variant", ["", "dpool", "mdpool"], ids=["roialign", "dpool", "mdpool"])
def test_parameters_are_mmdetections(variant):
    """The same state_dict keys and shapes as mmdetection's config, so that its checkpoints load."""
    reference, ours = _build_pair(variant)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert actual == expected
    ours.load_state_dict(reference.state_dict(), strict=True)


# ------------------------------------------------------------------------------------------------
# Task modules on random boxes


def _boxes(count: int, generator: torch.Generator, size: float = 100.0, min_side: float = 2.0):
    """(count, 4) random boxes in a square of side ``size``."""
    xy = torch.rand(count, 2, generator=generator) * size
    wh = torch.rand(count, 2, generator=generator) * size / 2 + min_side
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("kwargs", [
    dict(strides=[4, 8, 16, 32, 64], ratios=[0.5, 1.0, 2.0], scales=[8]),  # mmdet's RPN
    dict(strides=[8, 16, 32, 64, 128], ratios=[0.5, 1.0, 2.0], octave_base_scale=4, scales_per_octave=3),
    dict(strides=[8, 16], ratios=[0.25, 1.0], scales=[2, 3], scale_major=False, center_offset=0.5,
         base_sizes=[10, 20]),
], ids=["rpn", "octave", "center-offset"])
def test_anchor_generator_grid_priors_and_valid_flags(kwargs):
    reference, ours = MAnchorGenerator(**kwargs), AnchorGenerator(**kwargs)
    sizes = [(33 // s + 1, 41 // s + 2) for s in (1, 2, 4, 8, 16)][:len(kwargs["strides"])]
    assert ours.num_base_priors == reference.num_base_priors
    for got, want in zip(ours.grid_priors(sizes), reference.grid_priors(sizes, device="cpu"), strict=True):
        torch.testing.assert_close(got, want, **EXACT)
    for pad_shape in [(32, 40), (25, 61)]:
        for got, want in zip(ours.valid_flags(sizes, pad_shape),
                             reference.valid_flags(sizes, pad_shape, device="cpu"), strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize("stds", [(1.0, 1.0, 1.0, 1.0), (0.1, 0.1, 0.2, 0.2)], ids=["rpn", "rcnn"])
def test_delta_coder_encode_and_decode(stds):
    g = torch.Generator().manual_seed(0)
    boxes, gts = _boxes(200, g), _boxes(200, g)
    reference = MDeltaXYWHBBoxCoder(target_means=[0.0] * 4, target_stds=list(stds))
    ours = DeltaXYWHBBoxCoder(target_means=[0.0] * 4, target_stds=list(stds))
    torch.testing.assert_close(ours.encode(boxes, gts), reference.encode(boxes, gts), **EXACT)
    deltas = torch.randn(200, 4, generator=g) * 3  # some beyond the log-size clip
    for max_shape in [None, (80, 110)]:
        torch.testing.assert_close(ours.decode(boxes, deltas, max_shape=max_shape),
                                   reference.decode(boxes, deltas, max_shape=max_shape), **EXACT)
    # The RoI head decodes one box per class: (R, C, 4) here, (R, C * 4) there.
    deltas = torch.randn(50, 3, 4, generator=g)
    want = reference.decode(boxes[:50].repeat_interleave(3, 0), deltas.reshape(-1, 4), max_shape=(80, 110))
    got = ours.decode(boxes[:50, None].expand(50, 3, 4), deltas, max_shape=(80, 110))
    torch.testing.assert_close(got.reshape(-1, 4), want, **EXACT)


def _priors_with_ties(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random priors and boxes, with ties: repeated priors (a box's best IoU twice), a repeated
    box (a prior's best box twice), and IoUs exactly at the thresholds 0.3, 0.5 and 0.7."""
    gts = _boxes(5, generator, min_side=10.0)
    gts = torch.cat([gts, gts[:1], torch.tensor([[0.0, 0.0, 10.0, 10.0]])])
    exact = torch.tensor([[0.0, 0.0, 10.0, 3.0], [0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 7.0]])
    priors = _boxes(300, generator)
    priors = torch.cat([priors, priors[:40], gts[1:3] + 1.0, gts[1:3] + 1.0, exact])
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    return priors, gts, labels


ASSIGNERS = {
    "rpn": dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True),
    "rcnn": dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=False),
    "low-quality-one": dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0, match_low_quality=True,
                            gt_max_assign_all=False),
    "min-pos-iou": dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.6, match_low_quality=True),
    "neg-range": dict(pos_iou_thr=0.5, neg_iou_thr=(0.1, 0.4), min_pos_iou=0.3, match_low_quality=True),
}


@pytest.mark.parametrize("name", list(ASSIGNERS))
def test_max_iou_assigner(name):
    priors, gts, labels = _priors_with_ties(torch.Generator().manual_seed(1))
    reference, ours = MMaxIoUAssigner(**ASSIGNERS[name]), MaxIoUAssigner(**ASSIGNERS[name])
    want = reference.assign(InstanceData(priors=priors), InstanceData(bboxes=gts, labels=labels))
    got = ours.assign(priors, gts, labels)
    assert got.num_gts == want.num_gts
    assert torch.equal(got.gt_inds, want.gt_inds)
    assert torch.equal(got.labels, want.labels)
    torch.testing.assert_close(got.max_overlaps, want.max_overlaps, **EXACT)
    # The cases are not vacuous: positives, negatives and (but for one) ignored priors.
    assert (got.gt_inds > 0).any() and (got.gt_inds == 0).any()


@pytest.mark.parametrize("num_gts, num_priors", [(0, 20), (3, 0)])
def test_max_iou_assigner_without_boxes_or_priors(num_gts, num_priors):
    g = torch.Generator().manual_seed(2)
    priors, gts, labels = _boxes(num_priors, g), _boxes(num_gts, g), torch.arange(num_gts)
    kwargs = ASSIGNERS["rpn"]
    want = MMaxIoUAssigner(**kwargs).assign(InstanceData(priors=priors),
                                            InstanceData(bboxes=gts, labels=labels))
    got = MaxIoUAssigner(**kwargs).assign(priors, gts, labels)
    assert torch.equal(got.gt_inds, want.gt_inds) and torch.equal(got.labels, want.labels)
    torch.testing.assert_close(got.max_overlaps, want.max_overlaps, **EXACT)


@pytest.mark.parametrize("kwargs", [
    dict(num=256, pos_fraction=0.5, neg_pos_ub=-1, add_gt_as_proposals=False),  # RPN
    dict(num=64, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True),  # R-CNN, fewer places
    dict(num=64, pos_fraction=0.5, neg_pos_ub=2, add_gt_as_proposals=True),
    dict(num=10_000, pos_fraction=0.5, neg_pos_ub=-1, add_gt_as_proposals=True),  # takes everything
], ids=["rpn", "rcnn", "neg-pos-ub", "all"])
def test_random_sampler_chooses_what_mmdetection_chooses_from_the_same_seed(kwargs):
    """Same seed, same priors: both draw with ``torch.randperm`` on the CPU in the same order."""
    priors, gts, labels = _priors_with_ties(torch.Generator().manual_seed(3))
    assign_kwargs = ASSIGNERS["rcnn"]
    want_assign = MMaxIoUAssigner(**assign_kwargs).assign(InstanceData(priors=priors),
                                                          InstanceData(bboxes=gts, labels=labels))
    got_assign = MaxIoUAssigner(**assign_kwargs).assign(priors, gts, labels)
    torch.manual_seed(7)
    want = MRandomSampler(**kwargs).sample(want_assign, InstanceData(priors=priors),
                                           InstanceData(bboxes=gts, labels=labels))
    torch.manual_seed(7)
    got = RandomSampler(**kwargs).sample(got_assign, priors, gts, labels)
    for name in ("pos_inds", "neg_inds", "pos_priors", "neg_priors", "pos_gt_bboxes", "pos_gt_labels",
                 "pos_assigned_gt_inds", "priors"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert torch.equal(got.pos_is_gt, want.pos_is_gt.bool())
    assert got.avg_factor == want.avg_factor


def test_sampler_avg_factor_counts_at_least_one_positive_and_negative():
    """An image without ground truth boxes: no positives, yet the loss divides by 1 + negatives."""
    priors = _boxes(30, torch.Generator().manual_seed(4))
    gts, labels = priors.new_zeros((0, 4)), torch.zeros(0, dtype=torch.long)
    kwargs = dict(num=16, pos_fraction=0.5, neg_pos_ub=-1, add_gt_as_proposals=False)
    torch.manual_seed(0)
    want = MRandomSampler(**kwargs).sample(
        MMaxIoUAssigner(**ASSIGNERS["rpn"]).assign(InstanceData(priors=priors), InstanceData(bboxes=gts,
                                                                                                labels=labels)),
        InstanceData(priors=priors), InstanceData(bboxes=gts, labels=labels))
    torch.manual_seed(0)
    got_assign = MaxIoUAssigner(**ASSIGNERS["rpn"]).assign(priors, gts, labels)
    got = RandomSampler(**kwargs).sample(got_assign, priors, gts, labels)
    assert torch.equal(got.neg_inds, want.neg_inds) and len(got.pos_inds) == 0
    assert got.avg_factor == want.avg_factor == 1 + 16


def test_batched_nms_keeps_what_mmcv_keeps_at_the_iou_threshold():
    """1500 classes of two boxes each with IoU within 1e-4 of the threshold: the classes are shifted
    apart by mmcv's offset, so the shifted IoUs round alike and the same boxes are kept."""
    from mmcv.ops import batched_nms as mmcv_batched_nms

    from dcn_plugin.models.bbox import batched_nms

    g = torch.Generator().manual_seed(9)
    x1, width = 10 + torch.rand(1500, generator=g) * 500, 20 + torch.rand(1500, generator=g) * 200
    shift = width / 3 * (1 + (torch.rand(1500, generator=g) - 0.5) * 1e-4)  # IoU (w - s) / (w + s) ~ 0.5
    first = torch.stack([x1, torch.full_like(x1, 20.0), x1 + width, torch.full_like(x1, 120.0)], 1)
    second = first + torch.stack([shift, torch.zeros_like(shift), shift, torch.zeros_like(shift)], 1)
    boxes, labels = torch.stack([first, second], 1).reshape(-1, 4), torch.arange(3000) // 2
    scores = torch.rand(3000, generator=g)
    want_dets, want_keep = mmcv_batched_nms(boxes, scores, labels, dict(type="nms", iou_threshold=0.5))
    dets, keep = batched_nms(boxes, scores, labels, 0.5)
    assert torch.equal(keep, want_keep) and torch.equal(dets, want_dets)
    assert 1500 < len(keep) < 3000


def test_batched_nms_with_negative_coordinates_keeps_classes_apart():
    """Where boxes reach below zero, mmcv's shift (max + 1 per label) can put a box of one class onto
    a box of another, which then suppresses it (an mmcv bug, kept out of ours): ours shifts by the
    whole extent and keeps what mmcv's NMS keeps class by class."""
    from mmcv.ops import batched_nms as mmcv_batched_nms
    from mmcv.ops import nms as mmcv_nms

    from dcn_plugin.models.bbox import batched_nms

    # Label 1's box shifted by max + 1 = 11 is label 0's first box.
    boxes = torch.tensor([[-20.0, -20.0, 10.0, 10.0], [-31.0, -31.0, -1.0, -1.0], [-20.0, -20.0, 9.0, 10.0]])
    scores, labels = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 1, 0])
    by_class = torch.cat([(labels == c).nonzero().flatten()[mmcv_nms(boxes[labels == c], scores[labels == c],
                                                                          0.5)[1]] for c in (0, 1)])
    _, keep = batched_nms(boxes, scores, labels, 0.5)
    assert torch.equal(keep.sort().values, by_class.sort().values) and keep.tolist() == [0, 1]
    _, mmcv_keep = mmcv_batched_nms(boxes, scores, labels, dict(type="nms", iou_threshold=0.5))
    assert mmcv_keep.tolist() == [0]


def test_roi_extractor_level_mapping_and_features():
    """RoIs of every size (and exactly at the level boundaries 112, 224, 448) go to mmdet's level,
    and pool the same features as mmdet's SingleRoIExtractor with mmcv-full's RoIAlign."""
    cfg = dict(type="SingleRoIExtractor", roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0),
               out_channels=4, featmap_strides=[4, 8, 16, 32])
    with DefaultScope.overwrite_default_scope("mmdet"):
        reference = MMDET_MODELS.build(copy.deepcopy(cfg))
    with DefaultScope.overwrite_default_scope("dcn_plugin"):
        ours = MODELS.build(copy.deepcopy(cfg))
    g = torch.Generator().manual_seed(5)
    boundaries = torch.tensor([[0.0, 0.0, 112.0, 112.0], [10.0, 10.0, 234.0, 234.0], [5.0, 0.0, 453.0, 448.0],
                               [0.0, 0.0, 111.9, 112.0], [1.0, 2.0, 3.0, 4.0]])
    boxes = torch.cat([_boxes(60, g, size=400.0) * torch.rand(60, 1, generator=g) * 2, boundaries])
    rois = torch.cat([torch.randint(0, 2, (len(boxes), 1), generator=g).float(), boxes], 1)
    want = reference.map_roi_levels(rois, 4)
    assert torch.equal(ours.map_roi_levels(rois), want)
    assert set(want.tolist()) == {0, 1, 2, 3}
    feats = tuple(torch.randn(2, 4, 256 // s, 320 // s, generator=g, dtype=torch.float64)
                  for s in (4, 8, 16, 32))
    rois = rois.double()
    torch.testing.assert_close(ours(feats, rois), reference(feats, rois), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# The whole detector, from mmdetection's weights

SIZES = [(128, 160), (90, 120)]  # the second is padded to 128x160 in the batch, its pad_shape 96x128
ORI_SHAPES = [(128, 160), (100, 150)]
GTS = [(torch.tensor([[10.0, 12.0, 90.0, 100.0], [60.0, 20.0, 150.0, 70.0], [5.0, 5.0, 30.0, 40.0]]),
        torch.tensor([3, 7, 3])),
       (torch.tensor([[20.0, 30.0, 110.0, 85.0]]), torch.tensor([1]))]


@pytest.fixture(scope="module")
def detectors():
    """(mmdetection's Faster R-CNN, ours with its state_dict), in eval mode, on two images."""
    torch.manual_seed(0)
    reference, ours = _build_pair()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in reference.modules():  # frozen batch norms that do something
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=g) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)
        # Class scores of PyTorch's initialisation all lie near 1/81, below the 0.05 threshold.
        reference.roi_head.bbox_head.fc_cls.weight.mul_(20)
    ours.load_state_dict(reference.state_dict(), strict=True)
    images = [torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8) for size in SIZES]
    return reference.eval(), ours.eval(), images


def _samples(cls, zero_labels: bool = False) -> list:
    samples = []
    for size, ori_shape, (boxes, labels) in zip(SIZES, ORI_SHAPES, GTS, strict=True):
        scale = (size[1] / ori_shape[1], size[0] / ori_shape[0])
        sample = cls(metainfo=dict(img_shape=size, ori_shape=ori_shape, scale_factor=scale))
        sample.gt_instances = InstanceData(bboxes=boxes.clone(),
                                           labels=torch.zeros_like(labels) if zero_labels else labels.clone())
        samples.append(sample)
    return samples


def _inputs(model, images, cls, training=False, zero_labels=False):
    data = model.data_preprocessor(dict(inputs=[i.clone() for i in images],
                                        data_samples=_samples(cls, zero_labels)), training)
    return data["inputs"], data["data_samples"]


def _by_score(instances):
    """Best first; equal scores by label and box. mmdet orders equal scores as torch's unstable
    CPU sort leaves them (in its nms_pre choice and in mmcv-full's NMS), ours the earlier first
    (torchvision's NMS): an order that varies with the torch build is not compared."""
    order = torch.arange(len(instances))
    for key in [instances.bboxes[:, i] for i in (3, 2, 1, 0)] + [instances.labels, -instances.scores]:
        order = order[key[order].argsort(stable=True)]
    return instances[order]


def _assert_instances_equal(got, want, tol=1e-5):
    assert len(got) == len(want)
    got, want = _by_score(got), _by_score(want)
    torch.testing.assert_close(got.bboxes, want.bboxes, rtol=tol, atol=tol)
    torch.testing.assert_close(got.scores, want.scores, rtol=tol, atol=tol)
    assert torch.equal(got.labels, want.labels)


def test_data_preprocessor_gives_mmdetections_inputs_and_metainfo(detectors):
    reference, ours, images = detectors
    want_inputs, want_samples = _inputs(reference, images, MDetDataSample)
    got_inputs, got_samples = _inputs(ours, images, DetDataSample)
    torch.testing.assert_close(got_inputs, want_inputs, **EXACT)
    for got, want in zip(got_samples, want_samples, strict=True):
        for key in ("img_shape", "pad_shape", "batch_input_shape", "scale_factor"):
            assert got.metainfo[key] == want.metainfo[key], key


def test_rpn_maps_proposals_and_roi_head_outputs(detectors):
    """Features, RPN maps, proposals (test_cfg; ties in the padding broken as mmdet's), and the RoI
    head's cls_score / bbox_pred for the same proposals."""
    reference, ours, images = detectors
    inputs, samples = _inputs(reference, images, MDetDataSample)
    metainfos = [s.metainfo for s in samples]
    with torch.no_grad():
        want_feats, got_feats = reference.extract_feat(inputs), ours.extract_feat(inputs)
        for got, want in zip(got_feats, want_feats, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        want_rpn, got_rpn = reference.rpn_head(want_feats), ours.rpn_head(got_feats)
        for got_maps, want_maps in zip(got_rpn, want_rpn, strict=True):
            for got, want in zip(got_maps, want_maps, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        want_proposals = reference.rpn_head.predict_by_feat(*want_rpn, batch_img_metas=metainfos,
                                                            rescale=False)
        got_proposals = ours.rpn_head.predict_by_feat(*got_rpn, metainfos)
        for got, want in zip(got_proposals, want_proposals, strict=True):
            assert len(want) > 500
            _assert_instances_equal(got, want)
        rois = bbox2roi([p.bboxes for p in want_proposals])
        want_outs = reference.roi_head._bbox_forward(want_feats, rois)
        got_cls, got_reg = ours.roi_head(got_feats, want_proposals)
        torch.testing.assert_close(got_cls, want_outs["cls_score"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_reg, want_outs["bbox_pred"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("min_bbox_size", [0, None], ids=["min-size-0", "no-min-size"])
def test_rpn_proposals_with_and_without_min_bbox_size(detectors, min_bbox_size):
    """Random maps, boxes clipped to nothing beyond ``img_shape``: ``min_bbox_size=0`` drops them,
    no ``min_bbox_size`` keeps them (mmdet filters only where it is given)."""
    reference, ours, _ = detectors
    g = torch.Generator().manual_seed(8)
    sizes = [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]
    scores = [torch.randn(2, 3, h, w, generator=g) for h, w in sizes]
    deltas = [torch.randn(2, 12, h, w, generator=g) for h, w in sizes]
    metainfos = [dict(img_shape=(90, 120)), dict(img_shape=(128, 160))]
    cfg = ConfigDict(nms_pre=300, max_per_img=200, nms=dict(type="nms", iou_threshold=0.7))
    if min_bbox_size is not None:
        cfg.min_bbox_size = min_bbox_size
    want = reference.rpn_head.predict_by_feat(scores, deltas, batch_img_metas=metainfos, cfg=cfg,
                                              rescale=False)
    got = ours.rpn_head.predict_by_feat(scores, deltas, metainfos, cfg=cfg)
    for got_image, want_image in zip(got, want, strict=True):
        _assert_instances_equal(got_image, want_image, tol=0)
    widths = want[0].bboxes[:, 2] - want[0].bboxes[:, 0]
    assert bool((widths == 0).any()) == (min_bbox_size is None)


def test_detections(detectors):
    """predict: boxes (rescaled to the original image), scores and labels after NMS."""
    reference, ours, images = detectors
    with torch.no_grad():
        want = reference.predict(*_inputs(reference, images, MDetDataSample))
        got = ours(*_inputs(ours, images, DetDataSample), mode="predict")
    for got_sample, want_sample in zip(got, want, strict=True):
        assert len(want_sample.pred_instances) > 10
        _assert_instances_equal(got_sample.pred_instances, want_sample.pred_instances)


def _take_all(monkeypatch, *samplers):
    """Samplers that take every positive and negative: no random choice."""
    for sampler in samplers:
        monkeypatch.setattr(sampler, "num", 1_000_000)


@pytest.mark.parametrize("allowed_border, pos_weight", [(-1, -1), (0, 2.0)],
                         ids=["default", "border-0-pos-weight-2"])
def test_rpn_loss_and_targets(detectors, monkeypatch, allowed_border, pos_weight):
    """The RPN's losses from the same maps (every valid anchor sampled), and per anchor the same
    targets; anchors outside the second image's pad_shape take no part, as mmdet's. With
    ``allowed_border >= 0`` only anchors inside the image (by that margin) do."""
    reference, ours, images = detectors
    _take_all(monkeypatch, reference.rpn_head.sampler, ours.rpn_head.sampler)
    for head in (reference.rpn_head, ours.rpn_head):
        monkeypatch.setitem(head.train_cfg, "allowed_border", allowed_border)
        monkeypatch.setitem(head.train_cfg, "pos_weight", pos_weight)
    inputs, samples = _inputs(reference, images, MDetDataSample, training=True, zero_labels=True)
    with torch.no_grad():
        maps = reference.rpn_head(reference.extract_feat(inputs))
        want = reference.rpn_head.loss_by_feat(*maps, [s.gt_instances for s in samples],
                                               [s.metainfo for s in samples])
        got = ours.rpn_head.loss_by_feat(*maps, samples)
        torch.testing.assert_close(got["loss_rpn_cls"], sum(want["loss_rpn_cls"]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["loss_rpn_bbox"], sum(want["loss_rpn_bbox"]), rtol=1e-5, atol=1e-6)

        sizes = [tuple(m.shape[-2:]) for m in maps[0]]
        anchor_list, valid_list = reference.rpn_head.get_anchors(sizes, [s.metainfo for s in samples],
                                                                     device="cpu")
        labels, label_weights, targets, target_weights, avg_factor = reference.rpn_head.get_targets(
            anchor_list, valid_list, [s.gt_instances for s in samples], [s.metainfo for s in samples])
        anchors, valid = ours.rpn_head._anchors(maps[0], [s.metainfo for s in samples])
        got_targets = ours.rpn_head.get_targets(anchors, valid, [s.gt_instances for s in samples],
                                                [s.metainfo for s in samples])

    def flat(per_level):  # mmdet's (B, N_level, ...) per level -> ours (B * N, ...)
        return torch.cat(per_level, 1).flatten(0, 1)

    assert torch.equal(got_targets[0], flat(labels))
    assert torch.equal(got_targets[1], flat(label_weights))
    torch.testing.assert_close(got_targets[2], flat(targets), **EXACT)
    assert torch.equal(got_targets[3], flat(target_weights))
    assert got_targets[4] == avg_factor
    assert not valid[1].all()  # the second image's padding beyond its pad_shape


@pytest.mark.parametrize("pos_weight", [-1, 2.0])
def test_roi_head_loss_for_the_same_proposals(detectors, monkeypatch, pos_weight):
    """The RoI head's losses and accuracy for the same proposals, every one of them sampled."""
    reference, ours, images = detectors
    _take_all(monkeypatch, reference.roi_head.bbox_sampler, ours.roi_head.sampler)
    for head in (reference.roi_head, ours.roi_head):
        monkeypatch.setitem(head.train_cfg, "pos_weight", pos_weight)
    inputs, samples = _inputs(reference, images, MDetDataSample, training=True)
    with torch.no_grad():
        feats = reference.extract_feat(inputs)
        proposals = reference.rpn_head.predict_by_feat(*reference.rpn_head(feats),
                                                       batch_img_metas=[s.metainfo for s in samples],
                                                       cfg=reference.train_cfg.rpn_proposal)
        want = reference.roi_head.loss(feats, copy.deepcopy(proposals), samples)
        got = ours.roi_head.loss(feats, copy.deepcopy(proposals), samples)
    for key in ("loss_cls", "loss_bbox", "acc"):  # mmdet's acc has shape (1,)
        torch.testing.assert_close(got[key], want[key].reshape(()), rtol=1e-5, atol=1e-5)


def test_training_losses_and_gradients_from_the_same_seed(detectors):
    """mode='loss' of the whole detectors with mmdet's random samplers: from the same seed both
    choose the same anchors and proposals, so the losses and the gradients are the same."""
    reference, ours, images = detectors
    want_inputs, want_samples = _inputs(reference, images, MDetDataSample, training=True)
    got_inputs, got_samples = _inputs(ours, images, DetDataSample, training=True)
    with torch.no_grad():  # no equal scores, whose order would decide what the samplers choose
        for proposals in reference.rpn_head.predict_by_feat(
                *reference.rpn_head(reference.extract_feat(want_inputs)),
                batch_img_metas=[s.metainfo for s in want_samples], cfg=reference.train_cfg.rpn_proposal):
            assert len(proposals.scores.unique()) == len(proposals)
    try:
        reference.train()
        ours.train()
        torch.manual_seed(11)
        want = reference.loss(want_inputs, want_samples)
        torch.manual_seed(11)
        got = ours(got_inputs, got_samples, mode="loss")
        assert set(got) == set(want)
        for key in want:
            expected = sum(want[key]) if isinstance(want[key], list) else want[key]
            torch.testing.assert_close(got[key], expected.reshape(()), rtol=1e-5, atol=1e-5, msg=key)
        reference.parse_losses(want)[0].backward()
        ours.parse_losses(got)[0].backward()
    finally:
        reference.eval()
        ours.eval()
    want_grads = dict(reference.named_parameters())
    names = ["backbone.layer4.2.conv3.weight", "neck.fpn_convs.0.conv.weight", "rpn_head.rpn_conv.weight",
             "rpn_head.rpn_reg.bias", "roi_head.bbox_head.shared_fcs.0.weight",
             "roi_head.bbox_head.fc_cls.weight", "roi_head.bbox_head.fc_reg.bias"]
    for name, param in ours.named_parameters():
        if name in names:
            want_grad = want_grads[name].grad
            assert want_grad is not None and want_grad.abs().max() > 0, name
            torch.testing.assert_close(param.grad, want_grad, rtol=1e-4, atol=1e-6, msg=name)
    for model in (reference, ours):
        model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------
# Deformable RoI pooling of the dpool / mdpool configs


@pytest.mark.parametrize("modulated", [False, True], ids=["dpool", "mdpool"])
def test_deformable_roi_pooling_against_mmcv_full(modulated):
    """Our layers of the dpool/mdpool configs against mmcv-full's, with the same (random) weights."""
    from mmcv.ops import DeformRoIPoolPack as MDeformRoIPoolPack
    from mmcv.ops import ModulatedDeformRoIPoolPack as MModulatedDeformRoIPoolPack

    from dcn_plugin.ops import DeformRoIPoolPack, ModulatedDeformRoIPoolPack

    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference_cls = MModulatedDeformRoIPoolPack if modulated else MDeformRoIPoolPack
    reference = reference_cls(output_size=7, output_channels=8, spatial_scale=0.25).to(device).double()
    ours = (ModulatedDeformRoIPoolPack if modulated else DeformRoIPoolPack)(
        output_size=7, output_channels=8, spatial_scale=0.25).to(device).double()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(torch.randn(param.shape, generator=g, dtype=param.dtype) * 0.05)
    ours.load_state_dict(reference.state_dict(), strict=True)
    feat = torch.randn(2, 8, 24, 32, generator=g, dtype=torch.float64).to(device)
    rois = torch.tensor([[0.0, 4.0, 6.0, 60.0, 70.0], [1.0, 30.0, 10.0, 120.0, 90.0]], dtype=torch.float64,
                        device=device)
    try:
        want = reference(feat, rois)
    except RuntimeError as exc:
        if "not found" in str(exc) and device == "cpu":
            pytest.skip("mmcv-full 2.1.0 has no CPU kernel for deformable RoI pooling "
                        f"({str(exc).strip()}); runs where mmcv-full is built with CUDA and a GPU is present")
        raise
    torch.testing.assert_close(ours(feat, rois), want, rtol=1e-8, atol=1e-8)
