"""FCOS head: target assignment against a plain-Python oracle, decoding, losses, layer choice."""

import pytest
import torch
from extras import require_detector  # noqa: E402

require_detector()

import dcn_plugin.models  # noqa: E402,F401
from dcn_plugin.layers import DCN, DCNv2  # noqa: E402
from dcn_plugin.models.dense_heads import FCOSHead  # noqa: E402
from dcn_plugin.structures import DetDataSample, InstanceData  # noqa: E402

STRIDES = (8, 16, 32)
RANGES = ((-1, 24), (24, 48), (48, 1e8))


def make_head(**kwargs):
    args = dict(num_classes=3, in_channels=16, feat_channels=16, stacked_convs=2, strides=STRIDES,
                regress_ranges=RANGES, norm_cfg=dict(type="GN", num_groups=4))
    args.update(kwargs)
    head = FCOSHead(**args)
    head.init_weights()
    return head


def sample(boxes, labels, img_shape=(96, 128), scale_factor=(1.0, 1.0)):
    s = DetDataSample(metainfo=dict(img_shape=img_shape, ori_shape=img_shape, scale_factor=scale_factor))
    s.gt_instances = InstanceData(bboxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                  labels=torch.tensor(labels, dtype=torch.long))
    return s


def oracle_targets(head, points, boxes, labels, center_sampling=False, radius=1.5):
    out_labels, out_targets = [], []
    for level, level_points in enumerate(points):
        low, high = head.regress_ranges[level]
        stride = head.strides[level]
        for x, y in level_points.tolist():
            best, best_area = None, None
            for g, (x1, y1, x2, y2) in enumerate(boxes):
                d = (x - x1, y - y1, x2 - x, y2 - y)
                if center_sampling:
                    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
                    rx1, ry1 = max(cx - radius * stride, x1), max(cy - radius * stride, y1)
                    rx2, ry2 = min(cx + radius * stride, x2), min(cy + radius * stride, y2)
                    inside = min(x - rx1, y - ry1, rx2 - x, ry2 - y) > 0
                else:
                    inside = min(d) > 0
                area = (x2 - x1) * (y2 - y1)
                if inside and low < max(d) <= high and (best is None or area < best_area):
                    best, best_area = g, area
            if best is None:
                out_labels.append(head.num_classes)
                out_targets.append(None)
            else:
                x1, y1, x2, y2 = boxes[best]
                out_labels.append(labels[best])
                out_targets.append((x - x1, y - y1, x2 - x, y2 - y))
    return out_labels, out_targets


@pytest.mark.parametrize("center_sampling", [False, True])
def test_targets_match_oracle(center_sampling):
    head = make_head(center_sampling=center_sampling)
    sizes = [(96 // s, 128 // s) for s in STRIDES]
    points = head.points(sizes, "cpu")
    # Nested and overlapping boxes of several sizes, so levels and the smallest-area rule matter.
    boxes = [[4.0, 6.0, 30.0, 40.0], [10.0, 12.0, 120.0, 90.0], [20.0, 20.0, 60.0, 50.0], [70, 5, 80, 18]]
    labels = [0, 1, 2, 1]
    got_labels, got_targets = head.get_targets(points, [sample(boxes, labels).gt_instances])
    want_labels, want_targets = oracle_targets(head, points, boxes, labels, center_sampling)
    assert got_labels.tolist() == want_labels
    positives = [i for i, t in enumerate(want_targets) if t is not None]
    assert len(positives) > 10 and len(set(want_labels) - {3}) == 3
    assert torch.allclose(got_targets[positives], torch.tensor([want_targets[i] for i in positives]))


def test_targets_without_boxes_are_background():
    head = make_head()
    points = head.points([(4, 4), (2, 2), (1, 1)], "cpu")
    labels, targets = head.get_targets(points, [sample([], []).gt_instances])
    assert labels.tolist() == [3] * 21 and targets.shape == (21, 4)


def test_centerness_target():
    d = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    expected = torch.tensor([((1 / 3) * (2 / 4)) ** 0.5, 1.0])
    assert torch.allclose(FCOSHead.centerness_target(d), expected)


def test_predict_decodes_one_confident_location():
    head = make_head(test_cfg=dict(nms_pre=100, score_thr=0.3, nms=dict(iou_threshold=0.5), max_per_img=10))
    cls = [torch.full((1, 3, 96 // s, 128 // s), -10.0) for s in STRIDES]
    reg = [torch.ones(1, 4, 96 // s, 128 // s) for s in STRIDES]
    ctr = [torch.full((1, 1, 96 // s, 128 // s), 10.0) for s in STRIDES]
    cls[1][0, 2, 3, 5] = 10.0  # level stride 16, row 3, column 5: centre (88, 56)
    reg[1][0, :, 3, 5] = torch.tensor([8.0, 6.0, 4.0, 2.0])
    meta = dict(img_shape=(96, 128), scale_factor=(2.0, 0.5))
    (result,) = head.predict_by_feat(cls, reg, ctr, [meta])
    assert result.labels.tolist() == [2]
    expected = torch.tensor([[80.0 / 2, 50.0 / 0.5, 92.0 / 2, 58.0 / 0.5]])
    assert torch.allclose(result.bboxes, expected)
    assert result.scores.item() == pytest.approx(torch.sigmoid(torch.tensor(10.0)).item() ** 2, rel=1e-5)


def test_loss_and_predict_shapes_and_gradients():
    torch.manual_seed(0)
    head = make_head(dcn_on_last_conv=True)
    feats = [torch.randn(2, 16, 96 // s, 128 // s) for s in STRIDES]
    samples = [sample([[4.0, 6.0, 30.0, 40.0], [10.0, 12.0, 120.0, 90.0]], [0, 2]), sample([], [])]
    losses = head.loss(feats, samples)
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_centerness"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert head.conv_reg.weight.grad.abs().sum() > 0 and head.conv_cls.weight.grad.abs().sum() > 0
    # No object anywhere: every loss is finite and zero except classification.
    empty = head.loss(feats, [sample([], []), sample([], [])])
    assert empty["loss_bbox"].item() == 0 and empty["loss_centerness"].item() == 0
    head.eval()
    results = head.predict(feats, samples)
    assert len(results) == 2
    for r in results:
        assert r.bboxes.shape[1] == 4 and r.scores.shape == r.labels.shape == (r.bboxes.shape[0],)
        assert len(r) <= head.test_cfg["max_per_img"]


def test_layer_choice():
    plain = make_head()
    assert not any(isinstance(m, (DCN, DCNv2)) for m in plain.modules())
    last = make_head(dcn_on_last_conv=True)
    for tower in (last.cls_convs, last.reg_convs):
        assert [type(m.conv) for m in tower] == [torch.nn.Conv2d, DCNv2]
    v1_last = make_head(dcn_on_last_conv=True, dcn_cfg=dict(type="DCN"))
    assert [type(m.conv) for m in v1_last.reg_convs] == [torch.nn.Conv2d, DCN]
    all_dcn = make_head(conv_cfg=dict(type="DCN"))
    assert [type(m.conv) for m in all_dcn.cls_convs] == [DCN, DCN]


def test_bad_arguments():
    with pytest.raises(ValueError, match="regress_ranges"):
        make_head(regress_ranges=((-1, 64),))
    with pytest.raises(ValueError, match="num_classes"):
        make_head(num_classes=0)
    with pytest.raises(ValueError, match="levels"):
        make_head()([torch.zeros(1, 16, 4, 4)])
