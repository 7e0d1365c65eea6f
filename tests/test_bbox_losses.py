"""Box ops, NMS and detection losses against plain-Python oracles."""

import math
import random

import pytest
import torch
from extras import require_detector  # noqa: E402

require_detector()

from dcn_plugin.models.bbox import batched_nms, bbox_overlaps, distance2bbox, nms  # noqa: E402
from dcn_plugin.models.losses import (  # noqa: E402
    CrossEntropyLoss,
    FocalLoss,
    GIoULoss,
    IoULoss,
    L1Loss,
    SmoothL1Loss,
)


def py_iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def py_nms(boxes, scores, thr):
    order = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
    kept = []
    for i in order:
        if all(py_iou(boxes[i], boxes[k]) <= thr for k in kept):
            kept.append(i)
    return kept


def random_boxes(n, seed, size=100.0):
    rng = random.Random(seed)
    boxes = []
    for _ in range(n):
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        boxes.append([x, y, x + rng.uniform(2, 30), y + rng.uniform(2, 30)])
    return boxes


def test_bbox_overlaps_hand_values():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 5, 15, 15], [20, 20, 30, 30], [0, 0, 10, 10]])
    assert torch.allclose(bbox_overlaps(a, b), torch.tensor([[25 / 175, 0.0, 1.0]]))
    # GIoU of disjoint boxes: 0 - (enclosing 900 - union 200) / 900.
    giou = bbox_overlaps(a, b[1:2], mode="giou")
    assert giou.item() == pytest.approx(-700 / 900)
    aligned = bbox_overlaps(b, b, is_aligned=True)
    assert torch.allclose(aligned, torch.ones(3))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_nms_matches_python_greedy(seed, thr):
    boxes = random_boxes(60, seed)
    scores = [random.Random(seed * 1000 + i).random() for i in range(len(boxes))]
    keep = nms(torch.tensor(boxes), torch.tensor(scores), thr)
    assert keep.tolist() == py_nms(boxes, scores, thr)


def test_batched_nms_is_per_class():
    boxes = random_boxes(80, 7)
    scores = [random.Random(i).random() for i in range(80)]
    labels = [i % 3 for i in range(80)]
    dets, keep = batched_nms(torch.tensor(boxes), torch.tensor(scores), torch.tensor(labels), 0.5)
    expected = []
    for c in range(3):
        idx = [i for i in range(80) if labels[i] == c]
        expected += [idx[k] for k in py_nms([boxes[i] for i in idx], [scores[i] for i in idx], 0.5)]
    assert sorted(keep.tolist()) == sorted(expected)
    assert torch.all(dets[:-1, 4] >= dets[1:, 4])  # by decreasing score
    assert torch.equal(dets[:, :4], torch.tensor(boxes)[keep])
    # Same-class overlapping pair suppressed, different-class pair kept.
    pair = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11]])
    assert batched_nms(pair, torch.tensor([0.9, 0.8]), torch.tensor([0, 0]), 0.5)[1].tolist() == [0]
    assert batched_nms(pair, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), 0.5)[1].tolist() == [0, 1]
    top = batched_nms(pair, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), 0.5, max_num=1)
    assert top[1].tolist() == [0]
    empty = batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5)
    assert empty[0].shape == (0, 5) and empty[1].shape == (0,)


def test_distance2bbox_and_clip():
    points = torch.tensor([[10.0, 20.0]])
    boxes = distance2bbox(points, torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert boxes.tolist() == [[9.0, 18.0, 13.0, 24.0]]
    clipped = distance2bbox(points, torch.tensor([[20.0, 30.0, 3.0, 4.0]]), max_shape=(22, 12))
    assert clipped.tolist() == [[0.0, 0.0, 12.0, 22.0]]


def test_focal_loss_matches_formula():
    torch.manual_seed(0)
    logits = torch.randn(7, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 3, 1, 0])  # 3 = background
    gamma, alpha = 2.0, 0.25
    total = 0.0
    for n in range(7):
        for c in range(3):
            p = 1 / (1 + math.exp(-logits[n, c].item()))
            if labels[n] == c:
                total += -alpha * (1 - p) ** gamma * math.log(p)
            else:
                total += -(1 - alpha) * p ** gamma * math.log(1 - p)
    loss = FocalLoss(gamma=gamma, alpha=alpha, loss_weight=2.0)(logits, labels, avg_factor=4.0)
    assert loss.item() == pytest.approx(2.0 * total / 4.0, rel=1e-6)


def test_iou_losses():
    pred = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]])
    target = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10]])
    iou = torch.tensor([1.0, 50 / 150])
    assert IoULoss(mode="linear")(pred, target).item() == pytest.approx((1 - iou).mean().item())
    assert IoULoss(mode="log")(pred, target).item() == pytest.approx((-iou.log()).mean().item())
    weight = torch.tensor([0.0, 2.0])
    assert GIoULoss()(pred, target, weight=weight, avg_factor=2.0).item() == pytest.approx(
        2.0 * (1 - 50 / 150) / 2.0, rel=1e-5)
    logits, targets = torch.tensor([0.3, -1.2]), torch.tensor([0.7, 0.1])
    expected = -(targets * torch.sigmoid(logits).log() + (1 - targets) * (1 - torch.sigmoid(logits)).log())
    assert CrossEntropyLoss(use_sigmoid=True)(logits, targets).item() == pytest.approx(expected.mean().item(),
                                                                                        rel=1e-6)


def test_softmax_cross_entropy_l1_smooth_l1():
    logits, labels = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]]), torch.tensor([0, 1])
    by_hand = [-(2.0 - torch.tensor([2.0, 0.5, -1.0]).exp().sum().log()),
               -(0.0 - torch.tensor([0.0, 0.0, 3.0]).exp().sum().log())]
    weight = torch.tensor([1.0, 0.5])
    expected = (by_hand[0] * 1.0 + by_hand[1] * 0.5) / 4.0
    assert CrossEntropyLoss()(logits, labels, weight, avg_factor=4.0).item() == pytest.approx(expected.item(),
                                                                                             rel=1e-6)
    pred, target = torch.tensor([[0.0, 1.0], [3.0, -2.0]]), torch.tensor([[0.5, 1.0], [1.0, -2.0]])
    assert L1Loss(loss_weight=2.0)(pred, target).item() == pytest.approx(2.0 * (0.5 + 2.0) / 4)
    # |d| = 0.5 < beta: 0.5 * 0.25 / 1; |d| = 2 >= beta: 2 - 0.5.
    assert SmoothL1Loss(beta=1.0)(pred, target, avg_factor=1.0).item() == pytest.approx(0.125 + 1.5, rel=1e-6)


@pytest.mark.parametrize("bad", [dict(mode="square")])
def test_loss_bad_arguments(bad):
    with pytest.raises(ValueError, match="mode"):
        IoULoss(**bad)
    with pytest.raises(ValueError, match="mode"):
        bbox_overlaps(torch.zeros(1, 4), torch.zeros(1, 4), mode="diou")
