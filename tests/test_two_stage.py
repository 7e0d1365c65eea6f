"""Two-stage detectors: anchors, box coding, assignment, sampling, NMS, RoI heads, R-FCN's voting,
and the quick-start Faster R-CNN / R-FCN configs learning."""

import glob
import math
import os.path as osp

import pytest
import torch
from extras import require_detector  # noqa: E402
from roi_reference import deform_psroi_pool_reference, deform_roi_pool_reference  # noqa: E402

require_detector()

from mmengine.config import Config  # noqa: E402

import dcn_plugin.models  # noqa: E402,F401
from dcn_plugin.datasets.shapes import CLASSES  # noqa: E402
from dcn_plugin.models.bbox import bbox_overlaps  # noqa: E402
from dcn_plugin.models.roi_heads import PSRoIBBoxHead, RoIAlign, SingleRoIExtractor, bbox2roi  # noqa: E402
from dcn_plugin.models.task_modules import (  # noqa: E402
    AnchorGenerator,
    DeltaXYWHBBoxCoder,
    MaxIoUAssigner,
    RandomSampler,
)
from dcn_plugin.ops import DeformRoIPoolPack, ModulatedDeformRoIPoolPack, nms  # noqa: E402
from dcn_plugin.registry import MODELS  # noqa: E402
from dcn_plugin.structures import DetDataSample, InstanceData  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
QUICK = osp.join(ROOT, "configs", "quickstart")
TWO_STAGE = sorted(glob.glob(osp.join(QUICK, "faster-rcnn_*.py")) + glob.glob(osp.join(QUICK, "rfcn_*.py")))


# ------------------------------------------------------------------------------------------------
# Anchors, coder, assigner, sampler


def test_anchor_generator_matches_mmdets_documented_example():
    # mmdet's AnchorGenerator docstring: AnchorGenerator([16], [1.], [1.], [9]) on a 2x2 map.
    generator = AnchorGenerator([16], [1.0], [1.0], [9])
    expected = torch.tensor([[-4.5, -4.5, 4.5, 4.5], [11.5, -4.5, 20.5, 4.5],
                             [-4.5, 11.5, 4.5, 20.5], [11.5, 11.5, 20.5, 20.5]])
    torch.testing.assert_close(generator.grid_priors([(2, 2)])[0], expected)


def test_anchor_order_sizes_and_valid_flags():
    generator = AnchorGenerator(strides=[8], ratios=[0.5, 1.0, 2.0], scales=[2, 4])
    (anchors,) = generator.grid_priors([(3, 4)])
    assert anchors.shape == (3 * 4 * 6, 4) and generator.num_base_priors == [6]
    # Within a cell: ratio-major, scales fastest; ratio = h / w at the area of (8 * scale)^2.
    cell = anchors[:6]
    w, h = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
    torch.testing.assert_close(w * h, torch.tensor([16.0, 32.0] * 3) ** 2)
    torch.testing.assert_close(h / w, torch.tensor([0.5, 0.5, 1.0, 1.0, 2.0, 2.0]))
    # Cell (row 1, column 2) is the 7th cell: its anchors are the first cell's shifted by (16, 8).
    torch.testing.assert_close(anchors[6 * 6:7 * 6], cell + torch.tensor([16.0, 8.0, 16.0, 8.0]))
    (valid,) = generator.valid_flags([(3, 4)], pad_shape=(16, 24))
    assert valid.view(3, 4, 6)[:2, :3].all() and not valid.view(3, 4, 6)[2:].any()
    assert not valid.view(3, 4, 6)[:, 3].any()


def test_delta_coder_matches_mmdets_documented_example_and_inverts():
    # mmdet's delta2bbox docstring (means 0, stds 1, max_shape 32x32).
    rois = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3 + [[5.0, 5.0, 5.0, 5.0]])
    deltas = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 2.0, -1.0],
                           [0.7, -1.9, -0.5, 0.3]])
    expected = torch.tensor([[0.0000, 0.0000, 1.0000, 1.0000], [0.1409, 0.1409, 2.8591, 2.8591],
                             [0.0000, 0.3161, 4.1945, 0.6839], [5.0000, 5.0000, 5.0000, 5.0000]])
    torch.testing.assert_close(DeltaXYWHBBoxCoder().decode(rois, deltas, max_shape=(32, 32)), expected,
                               atol=1e-4, rtol=0)
    coder = DeltaXYWHBBoxCoder(target_stds=[0.1, 0.1, 0.2, 0.2])
    boxes, gts = torch.tensor([[10.0, 20.0, 30.0, 60.0]]), torch.tensor([[12.0, 18.0, 40.0, 50.0]])
    # By hand: centres (20, 40) -> (26, 34), sizes (20, 40) -> (28, 32).
    by_hand = torch.tensor([[6 / 20 / 0.1, -6 / 40 / 0.1, math.log(28 / 20) / 0.2, math.log(32 / 40) / 0.2]])
    torch.testing.assert_close(coder.encode(boxes, gts), by_hand)
    torch.testing.assert_close(coder.decode(boxes, coder.encode(boxes, gts)), gts)


def test_max_iou_assigner_hand_computed():
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    priors = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],    # IoU 1 with gt 0: positive
        [0.0, 0.0, 10.0, 5.0],     # IoU 0.5 with gt 0: between the thresholds: ignored (-1)
        [50.0, 50.0, 60.0, 60.0],  # IoU 0: negative
        [20.0, 20.0, 30.0, 26.0],  # IoU 0.6 with gt 1: below pos_iou_thr, but gt 1's best: positive
    ])
    assigner = MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3)
    result = assigner.assign(priors, gts, torch.tensor([4, 2]))
    assert result.gt_inds.tolist() == [1, -1, 0, 2]
    assert result.labels.tolist() == [4, -1, -1, 2]
    torch.testing.assert_close(result.max_overlaps, torch.tensor([1.0, 0.5, 0.0, 0.6]))
    without = MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, match_low_quality=False)
    assert without.assign(priors, gts, torch.tensor([4, 2])).gt_inds.tolist() == [1, -1, 0, -1]
    empty = assigner.assign(priors, gts[:0], torch.tensor([], dtype=torch.long))
    assert empty.gt_inds.tolist() == [0, 0, 0, 0]


def test_random_sampler_counts_and_ground_truth_first():
    torch.manual_seed(0)
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    priors = torch.cat([torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(20, 1),
                        torch.tensor([[50.0, 50.0, 60.0, 60.0]]).repeat(30, 1)])
    assign = MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.5).assign(priors, gts, torch.tensor([3]))
    result = RandomSampler(num=16, pos_fraction=0.25).sample(assign, priors, gts, torch.tensor([3]))
    assert len(result.pos_inds) == 4 and len(result.neg_inds) == 12 and result.avg_factor == 16
    # Priors are (gt, *priors): positives index the first 21, negatives the last 30.
    assert (result.pos_inds <= 20).all() and (result.neg_inds > 20).all()
    assert result.pos_gt_labels.tolist() == [3] * 4 and (result.pos_gt_bboxes == gts).all()
    assert len(set(result.neg_inds.tolist())) == 12
    capped = RandomSampler(num=16, pos_fraction=0.25, neg_pos_ub=1, add_gt_as_proposals=False)
    assign = MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.5).assign(priors, gts, torch.tensor([3]))
    result = capped.sample(assign, priors, gts, torch.tensor([3]))
    assert len(result.pos_inds) == 4 and len(result.neg_inds) == 4 and not result.pos_is_gt.any()


# ------------------------------------------------------------------------------------------------
# NMS


def greedy_nms_reference(boxes, scores, threshold):
    """Greedy NMS written from its definition, one box at a time."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    iou = bbox_overlaps(boxes.double(), boxes.double())
    kept = []
    for i in order:
        if all(iou[k, i] <= threshold for k in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", range(3))
def test_nms_matches_greedy_definition(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(200, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + torch.rand(200, 2, generator=g) * 30], 1).to(dtype)
    scores = torch.randint(0, 20, (200,), generator=g).to(dtype)  # many ties: the earlier box first
    for threshold in (0.3, 0.5, 0.7):
        assert nms(boxes, scores, threshold).tolist() == greedy_nms_reference(boxes, scores, threshold)


def test_nms_edge_cases_and_errors():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []
    boxes = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 4.0, 4.0]])
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 1, 2]  # empty boxes overlap nothing
    assert nms(boxes.bfloat16(), torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 1, 2]
    with pytest.raises(RuntimeError, match=r"nms: boxes must have shape \(N, 4\)"):
        nms(torch.zeros(3, 5), torch.zeros(3), 0.5)
    with pytest.raises(RuntimeError, match=r"nms: scores must have shape \(N,\)"):
        nms(torch.zeros(3, 4), torch.zeros(2), 0.5)


# ------------------------------------------------------------------------------------------------
# RoI extraction and heads


def _feats_and_rois(seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = tuple(torch.randn(2, 8, 32 // 2**i, 32 // 2**i, generator=g, dtype=torch.float64)
                  for i in range(3))
    rois = torch.tensor([[0, 4.0, 4.0, 20.0, 20.0], [1, 10.0, 2.0, 90.0, 70.0], [0, 30.0, 40.0, 150.0, 200.0],
                         [1, 0.0, 0.0, 40.0, 40.0]], dtype=torch.float64)
    return feats, rois


@pytest.mark.parametrize("layer", ["RoIAlign", "mmcv.RoIAlign", "DeformRoIPoolPack",
                                   "dcn_plugin.DeformRoIPoolPack", "ModulatedDeformRoIPoolPack",
                                   DeformRoIPoolPack, ModulatedDeformRoIPoolPack])
def test_every_roi_layer_builds_from_config(layer):
    extra = {} if "RoIAlign" in str(layer) else dict(output_channels=8, deform_fc_channels=16)
    extractor = SingleRoIExtractor(dict(type=layer, output_size=7, sampling_ratio=2, **extra), 8, [4, 8, 16])
    assert [layer.spatial_scale for layer in extractor.roi_layers] == [0.25, 0.125, 0.0625]
    feats, rois = _feats_and_rois()
    extractor.double()
    out = extractor(feats, rois)
    assert out.shape == (4, 8, 7, 7)
    # At initialisation the deformable layers have zero offsets: RoIAlign, halved by the mask for
    # the modulated one; and RoIAlign is the reference pooling without offsets.
    levels = extractor.map_roi_levels(rois)
    expected = torch.stack([deform_roi_pool_reference(feats[lvl], rois[i:i + 1], None, (7, 7),
                                                      1 / 4 / 2**lvl, 2)[0]
                            for i, lvl in enumerate(levels.tolist())])
    scale = 0.5 if "Modulated" in str(layer) else 1.0
    torch.testing.assert_close(out, expected * scale)


def test_roi_levels_follow_the_scale_and_unknown_layers_fail():
    extractor = SingleRoIExtractor(dict(type="RoIAlign", output_size=7), 8, [4, 8, 16], finest_scale=32)
    # mmdet's rule: level 0 below 2 * finest_scale, level 1 below 4 * finest_scale, ...
    rois = torch.tensor([[0, 0, 0, 63, 63], [0, 0, 0, 64, 64], [0, 0, 0, 127, 127], [0, 0, 0, 128, 128],
                         [0, 0, 0, 500, 500.0]])
    assert extractor.map_roi_levels(rois).tolist() == [0, 1, 1, 2, 2]
    with pytest.raises(KeyError, match="roi_layer: unknown type 'RoIPool'"):
        SingleRoIExtractor(dict(type="RoIPool", output_size=7), 8, [4])
    with pytest.raises(ValueError, match="aligned=True"):
        RoIAlign(7, aligned=False)


@pytest.mark.parametrize("agnostic", [True, False])
def test_rfcn_position_sensitive_voting_against_direct_computation(agnostic):
    torch.manual_seed(0)
    head = PSRoIBBoxHead(in_channels=8, num_classes=3, feat_channels=8, group_size=3, sample_per_part=2,
                         spatial_scale=1 / 4, no_trans=True, reg_class_agnostic=agnostic).double()
    feat = torch.randn(2, 8, 16, 16, dtype=torch.float64)
    rois = torch.tensor([[0, 4.0, 4.0, 40.0, 30.0], [1, 10.0, 12.0, 60.0, 62.0]], dtype=torch.float64)
    cls_score, bbox_pred = head(feat, rois)
    x = torch.relu(head.conv_new(feat))
    # Direct: class c's score is the mean over bins (i, j) of channel (c * 3 + i) * 3 + j pooled in
    # bin (i, j) alone, here through the reference pooling.
    pooled = deform_psroi_pool_reference(head.conv_cls(x), rois, None, 1 / 4, 4, 3, 3, 3, 2, 0.0)
    torch.testing.assert_close(cls_score, pooled.mean((2, 3)))
    reg = deform_psroi_pool_reference(head.conv_reg(x), rois, None, 1 / 4, head.reg_outputs, 3, 3, 3, 2, 0.0)
    expected = reg.mean((2, 3)) if agnostic else reg.mean((2, 3)).view(2, 4, 4)[:, :3].flatten(1)
    torch.testing.assert_close(bbox_pred, expected)


def test_deformable_rfcn_starts_as_plain_rfcn_and_learns_offsets():
    torch.manual_seed(0)
    plain = PSRoIBBoxHead(in_channels=8, num_classes=3, feat_channels=8, group_size=3, spatial_scale=1 / 4,
                          no_trans=True)
    deformable = PSRoIBBoxHead(in_channels=8, num_classes=3, feat_channels=8, group_size=3,
                               spatial_scale=1 / 4, no_trans=False)
    deformable.init_weights()
    deformable.load_state_dict(plain.state_dict(), strict=False)
    assert deformable.conv_cls_offset.weight.abs().sum() == 0
    feat = torch.randn(2, 8, 16, 16)
    rois = torch.tensor([[0, 4.0, 4.0, 40.0, 30.0], [1, 10.0, 12.0, 60.0, 62.0]])
    for a, b in zip(plain(feat, rois), deformable(feat, rois), strict=True):
        torch.testing.assert_close(a, b)
    cls_score, bbox_pred = deformable(feat, rois)
    (cls_score.square().sum() + bbox_pred.square().sum()).backward()
    assert deformable.conv_cls_offset.weight.grad.abs().sum() > 0
    assert deformable.conv_reg_offset.weight.grad.abs().sum() > 0


def _batch(num_images=2, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for i in range(num_images):
        inputs.append(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g))
        s = DetDataSample(metainfo=dict(img_id=i, img_shape=(size, size), ori_shape=(size, size),
                                        scale_factor=(1.0, 1.0)))
        boxes = torch.tensor([[8.0, 10.0, 40.0, 50.0], [50.0, 20.0, 120.0, 80.0]])
        s.gt_instances = InstanceData(bboxes=boxes,
                                      labels=torch.tensor([i % 6, 3]))
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


def _build(config):
    model = MODELS.build(Config.fromfile(config).model)
    model.init_weights()
    return model


@pytest.mark.parametrize("config", TWO_STAGE, ids=osp.basename)
def test_quickstart_two_stage_configs_build_predict_every_class_and_run(config):
    torch.manual_seed(0)
    model = _build(config)
    assert model.roi_head.bbox_head.num_classes == len(CLASSES)
    data = model.data_preprocessor(_batch(), training=True)
    losses = model(**data, mode="loss")
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "acc"}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(_batch(), training=False), mode="predict")
    for sample in results:
        found = sample.pred_instances
        assert found.bboxes.shape[1:] == (4,)
        assert len(found.bboxes) == len(found.scores) == len(found.labels) <= 100
        assert ((found.labels >= 0) & (found.labels < 6)).all() and (found.scores > 0.05).all()
        assert (found.scores[:-1] >= found.scores[1:]).all()


def _train_steps(config, steps, seed=0):
    torch.manual_seed(seed)
    model = _build(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = model.data_preprocessor(_batch(4), training=True)
    history = []
    for _ in range(steps):
        losses = model(**data, mode="loss")
        total = sum(v for k, v in losses.items() if "loss" in k)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    return history, model


@pytest.mark.parametrize("name", ["faster-rcnn_r18-dconv-c3-c5_fpn_mdpool_shapes.py",
                                  "rfcn_r18-dconv-c5_dpsroi_shapes.py"])
def test_a_few_iterations_lower_the_loss_and_repeat_exactly(name):
    config = osp.join(QUICK, name)
    history, model = _train_steps(config, 6)
    assert history[-1] < 0.8 * history[0], history
    again, _ = _train_steps(config, 6)
    assert again == history
    # The deformable RoI pooling's offset layers learn.
    if "mdpool" in name:
        layer = model.roi_head.bbox_roi_extractor.roi_layers[0]
        assert layer.offset_fc[-1].weight.abs().sum() > 0
    else:
        assert model.roi_head.bbox_head.conv_cls_offset.weight.abs().sum() > 0


def test_roi_head_targets_and_losses_on_a_tiny_batch():
    torch.manual_seed(0)
    model = _build(osp.join(QUICK, "faster-rcnn_r18_fpn_shapes.py"))
    head = model.roi_head
    data = model.data_preprocessor(_batch(), training=True)
    feats = model.extract_feat(data["inputs"])
    gts = [s.gt_instances for s in data["data_samples"]]
    # Proposals: the ground truth boxes shifted a little (positives) and far boxes (negatives).
    far = torch.tensor([[100.0, 100.0, 127.0, 127.0]])
    proposals = [InstanceData(bboxes=torch.cat([gt.bboxes + 2.0, far])) for gt in gts]
    losses = head.loss(feats, proposals, data["data_samples"])
    assert set(losses) == {"loss_cls", "loss_bbox", "acc"}
    # Untrained, the head scores every class near uniformly: cross-entropy about log(7).
    assert abs(losses["loss_cls"].item() - math.log(7)) < 0.2
    rois = bbox2roi([p.bboxes for p in proposals])
    cls_score, bbox_pred = head._bbox_forward(feats, rois)
    assert cls_score.shape == (6, 7) and bbox_pred.shape == (6, 24)
