"""tools/visualize_offsets.py --roi: the bins of deformable RoI pooling land where the definition
puts them, and the tool writes its picture.

The models are the quick-start Faster R-CNN with modulated deformable RoI pooling and R-FCN with
deformable position-sensitive RoI pooling (untrained), whose offset generators are set to known
offsets (last layer's weight zero, bias the offsets), so that bin ``(i, j)`` of a RoI moves by
``gamma * (ox, oy) * (w, h)`` (``trans_std`` for R-FCN); the expected bins are written out here from
the ops' definitions. The geometry is also checked against the ops themselves, pooling a map whose
values are its own coordinates.
"""

import importlib.util
import math
import os.path as osp
import sys

import numpy as np
import pytest
import torch
from extras import require_detector  # noqa: E402

require_detector()

import cv2  # noqa: E402
from mmengine.config import Config  # noqa: E402

import dcn_plugin.models  # noqa: E402,F401
from dcn_plugin.ops import deform_psroi_pool, deform_roi_pool  # noqa: E402
from dcn_plugin.registry import MODELS  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
QUICK = osp.join(ROOT, "configs", "quickstart")
FASTER = osp.join(QUICK, "faster-rcnn_r18_fpn_mdpool_shapes.py")
RFCN = osp.join(QUICK, "rfcn_r18_dpsroi_shapes.py")
K = 7  # bins per side in both configs
SCALE = 4 / 3  # a 96x72 image becomes the 128x96 network input
NO_DETECTION = ["--cfg-options", "model.test_cfg.rcnn.score_thr=1.0"]  # softmax scores stay below 1


def _load_tool():
    path = osp.join(ROOT, "tools", "visualize_offsets.py")
    spec = importlib.util.spec_from_file_location("visualize_offsets", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


vo = _load_tool()


# ---- known offsets, written out independently of the tool ----

def faster_offsets(level):
    """(K, K, 2): (ox, oy) of bin (i, j) at pyramid level ``level``; they differ by level, row and column."""
    return np.array([[(0.5 - 0.25 * level + 0.0625 * i, -0.25 + 0.125 * level - 0.125 * j) for j in range(K)]
                     for i in range(K)])


def faster_mask(level):
    return 1 / (1 + math.exp(-(level - 1.0)))  # sigmoid of the mask bias level - 1


def rfcn_offsets(c):
    """(K, K, 2): (ox, oy) of bin (i, j) for class ``c``."""
    return np.array([[(0.25 * (c + 1) + 0.0625 * i, -0.125 * (c + 1) + 0.03125 * j) for j in range(K)]
                     for i in range(K)])


def set_faster_offsets(model):
    for level, layer in enumerate(model.roi_head.bbox_roi_extractor.roi_layers):
        last, mask_last = layer.offset_fc[-1], layer.mask_fc[-2]
        bias = torch.from_numpy(faster_offsets(level).transpose(2, 0, 1).copy())  # (2, K, K): x, then y
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(bias.flatten())
            mask_last.weight.zero_()
            mask_last.bias.fill_(level - 1.0)


def set_rfcn_offsets(model):
    head = model.roi_head.bbox_head
    classes = head.num_classes + 1
    # Output channel 2c + d of bin (i, j) pools input channel ((2c + d) * K + i) * K + j.
    bias = torch.from_numpy(np.stack([rfcn_offsets(c).transpose(2, 0, 1) for c in range(classes)]))
    with torch.no_grad():
        head.conv_cls_offset.weight.zero_()
        head.conv_cls_offset.bias.copy_(bias.flatten())


def expected_bins(box, offsets, scale):
    """Regular and moved bins (K, K, 4) of ``box`` (x1, y1, x2, y2): bin (i, j) is
    [x1 + j w / K, y1 + i h / K, ...], moved by ``scale * offsets[i, j] * (w, h)``."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    regular, moved = np.zeros((K, K, 4)), np.zeros((K, K, 4))
    for i in range(K):
        for j in range(K):
            regular[i, j] = [x1 + j * w / K, y1 + i * h / K, x1 + (j + 1) * w / K, y1 + (i + 1) * h / K]
            ox, oy = offsets[i, j]
            moved[i, j] = regular[i, j] + [scale * ox * w, scale * oy * h] * 2
    return regular, moved


def level_of(box, finest_scale=32, levels=3):
    """SingleRoIExtractor's level of a box in network-input pixels."""
    s = math.sqrt((box[2] - box[0]) * (box[3] - box[1]))
    return min(max(math.floor(math.log2(s / finest_scale + 1e-6)), 0), levels - 1)


def round_half_away(x):
    return math.copysign(math.floor(abs(x) + 0.5), x)


def assert_tiles(bins, box):
    """The regular bins (K, K, 4) tile the box: equal sizes, shared edges, the box's outer edges."""
    np.testing.assert_allclose(bins[0, :, 1], box[1])
    np.testing.assert_allclose(bins[:, 0, 0], box[0])
    np.testing.assert_allclose(bins[-1, :, 3], box[3])
    np.testing.assert_allclose(bins[:, -1, 2], box[2])
    np.testing.assert_allclose(bins[:, 1:, 0], bins[:, :-1, 2])
    np.testing.assert_allclose(bins[1:, :, 1], bins[:-1, :, 3])
    np.testing.assert_allclose(bins[..., 2] - bins[..., 0], (box[2] - box[0]) / K)
    np.testing.assert_allclose(bins[..., 3] - bins[..., 1], (box[3] - box[1]) / K)


# ---- fixtures ----

def _build(config, set_offsets):
    torch.manual_seed(0)
    cfg = Config.fromfile(config)
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model).eval()
    set_offsets(model)
    return model


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    image = np.full((72, 96, 3), 200, np.uint8)  # (h, w): resized to (96, 128) by the pipeline
    image[10:50, 15:70] = rng.integers(0, 256, (40, 55, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("image") / "image.png"
    cv2.imwrite(str(path), image)
    return str(path)


def _saved(model, tmp_path_factory, name):
    path = tmp_path_factory.mktemp(name) / "model.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def faster(tmp_path_factory):
    model = _build(FASTER, set_faster_offsets)
    return model, _saved(model, tmp_path_factory, "faster")


@pytest.fixture(scope="module")
def rfcn(tmp_path_factory):
    model = _build(RFCN, set_rfcn_offsets)
    return model, _saved(model, tmp_path_factory, "rfcn")


def detections(model, config, image_path, topk):
    """The model's ``topk`` best detections (boxes in original pixels, labels), computed directly."""
    cfg = Config.fromfile(config)
    with torch.no_grad():
        data = model.data_preprocessor(vo.prepare_inputs(cfg, image_path), False)
        pred = model(**data, mode="predict")[0].pred_instances
    order = torch.argsort(pred.scores, descending=True)[:topk]
    return pred.bboxes[order].double().numpy(), pred.labels[order].numpy()


def run(config, checkpoint, image_path, out, *extra):
    return vo.main([config, checkpoint, image_path, "--out", str(out), "--roi", *extra])


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


# ---- tests ----

def test_faster_rcnn_bins_move_by_gamma_times_the_offset_of_their_level(faster, image_path, tmp_path, capsys):
    model, checkpoint = faster
    out = tmp_path / "faster.png"
    result = run(FASTER, checkpoint, image_path, out, "--topk", "3")
    assert_png(out)
    assert str(out) in capsys.readouterr().out
    boxes, _ = detections(model, FASTER, image_path, 3)
    assert result["source"] == "detection" and len(boxes) == 3
    np.testing.assert_allclose(result["rois"], boxes, rtol=0, atol=1e-4)
    # Faster R-CNN pools the box itself (as float32 RoIs, as the detector does).
    np.testing.assert_allclose(result["boxes"], result["rois"], rtol=0, atol=1e-5)
    assert (np.diff(result["scores"]) <= 0).all()
    assert result["regular"].shape == result["deformable"].shape == (3, K, K, 4)
    levels = set()
    for r, box in enumerate(result["boxes"]):
        level = level_of(box * SCALE)  # the level is chosen on the network input's box
        levels.add(level)
        assert result["layers"][r] == f"roi_head.bbox_roi_extractor.roi_layers.{level}"
        # The shift is a fraction of the box size, so it holds in original pixels as well.
        regular, moved = expected_bins(box, faster_offsets(level), 0.1)
        np.testing.assert_allclose(result["regular"][r], regular, rtol=0, atol=1e-6)
        np.testing.assert_allclose(result["deformable"][r], moved, rtol=0, atol=1e-6)
        assert_tiles(result["regular"][r], box)
        np.testing.assert_allclose(result["weights"][r], faster_mask(level), rtol=1e-6)
    assert not np.allclose(result["regular"], result["deformable"])
    print("levels of the drawn RoIs:", sorted(levels))


def test_rfcn_bins_move_by_trans_std_times_the_offset_of_the_detected_class(rfcn, image_path, tmp_path):
    model, checkpoint = rfcn
    out = tmp_path / "rfcn.png"
    result = run(RFCN, checkpoint, image_path, out, "--topk", "2")
    assert_png(out)
    boxes, labels = detections(model, RFCN, image_path, 2)
    assert result["source"] == "detection"
    np.testing.assert_allclose(result["rois"], boxes, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(result["labels"], labels)
    assert result["layers"] == ["roi_head.bbox_head.conv_cls_offset"] * 2
    np.testing.assert_array_equal(result["weights"], 1.0)
    for r, box in enumerate(result["rois"]):
        # deform_psroi_pool's box, on the network input: corners rounded, the end pixel included.
        x1, y1, x2, y2 = (round_half_away(v) for v in box * SCALE)
        pooled = np.array([x1, y1, x2 + 1, y2 + 1]) / SCALE
        np.testing.assert_allclose(result["boxes"][r], pooled, rtol=0, atol=1e-9)
        regular, moved = expected_bins(pooled, rfcn_offsets(labels[r]), 0.1)
        np.testing.assert_allclose(result["regular"][r], regular, rtol=0, atol=1e-6)
        np.testing.assert_allclose(result["deformable"][r], moved, rtol=0, atol=1e-6)
        assert_tiles(result["regular"][r], pooled)


def test_without_detections_the_top_proposals_are_drawn(faster, rfcn, image_path, tmp_path, capsys):
    for config, (_, checkpoint) in ((FASTER, faster), (RFCN, rfcn)):
        out = tmp_path / "proposals.png"
        result = run(config, checkpoint, image_path, out, "--topk", "2", *NO_DETECTION)
        assert "no detection above test_cfg.rcnn.score_thr" in capsys.readouterr().out
        assert_png(out)
        assert result["source"] == "proposal" and len(result["rois"]) == 2
        assert (np.diff(result["scores"]) <= 0).all()
        assert ((result["labels"] >= 0) & (result["labels"] < 6)).all()
        for r, box in enumerate(result["boxes"]):
            if config == FASTER:
                offsets = faster_offsets(level_of(box * SCALE))
            else:
                offsets = rfcn_offsets(result["labels"][r])
            _, moved = expected_bins(box, offsets, 0.1)
            np.testing.assert_allclose(result["deformable"][r], moved, rtol=0, atol=1e-6)


def test_models_without_deformable_roi_pooling_fail_clearly(image_path, tmp_path):
    for name in ("faster-rcnn_r18_fpn_shapes.py", "rfcn_r18_shapes.py", "fcos_r18-dcn-c3-c5_fpn_shapes.py"):
        config = osp.join(QUICK, name)
        model = _build(config, lambda m: None)
        checkpoint = tmp_path / f"{name}.pth"
        torch.save({"state_dict": model.state_dict()}, checkpoint)
        with pytest.raises(ValueError, match="no deformable RoI pooling to draw"):
            run(config, str(checkpoint), image_path, tmp_path / "none.png")
        assert not (tmp_path / "none.png").exists()


def test_points_and_roi_do_not_mix(rfcn, image_path, tmp_path):
    with pytest.raises(ValueError, match="--points"):
        run(RFCN, rfcn[1], image_path, tmp_path / "x.png", "--points", "10,10")


# ---- the geometry against the ops: pooling a map whose values are its coordinates ----

def _coordinate_maps(h, w, repeat=1):
    """(1, 2 * repeat, h, w) float64: x coordinates (repeat channels), then y coordinates."""
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                          indexing="ij")
    return torch.stack([x] * repeat + [y] * repeat)[None]


def _random_rois(g, n, lo, hi):
    xy = torch.rand(n, 2, 2, generator=g, dtype=torch.float64) * (hi - lo) + lo
    boxes = torch.cat([xy.min(1).values, xy.max(1).values + 8], 1)
    return boxes, torch.cat([boxes.new_zeros(n, 1), boxes], 1)


def test_roi_bins_are_where_deform_roi_pool_samples():
    # Sampling ratio 2: a bin averages samples at (s + 0.5) / 2 of its size, whose mean is the bin's
    # centre; on a map of its own coordinates, the pooled values are the centre in feature pixels.
    g = torch.Generator().manual_seed(0)
    spatial_scale, gamma = 0.25, 0.1
    boxes, rois = _random_rois(g, 5, 16.0, 100.0)
    offset = torch.rand(5, 2, K, K, generator=g, dtype=torch.float64) - 0.5
    maps = _coordinate_maps(32, 32)
    pooled = deform_roi_pool(maps, rois, offset, K, spatial_scale, 2, gamma)  # (5, 2, K, K)
    bins = vo.roi_bins(boxes.numpy(), (K, K), offset.numpy(), gamma)
    centres = (bins[..., :2] + bins[..., 2:]) / 2 * spatial_scale - 0.5  # feature pixels, (x, y)
    np.testing.assert_allclose(pooled.permute(0, 2, 3, 1).numpy(), centres, rtol=0, atol=1e-9)
    regular = vo.roi_bins(boxes.numpy(), (K, K))
    pooled = deform_roi_pool(maps, rois, None, K, spatial_scale, 2)
    centres = (regular[..., :2] + regular[..., 2:]) / 2 * spatial_scale - 0.5
    np.testing.assert_allclose(pooled.permute(0, 2, 3, 1).numpy(), centres, rtol=0, atol=1e-9)


def test_psroi_bins_are_where_deform_psroi_pool_samples():
    # R-FCN samples a bin at s / 4 of its size from its start (s < 4): their mean is 3/8 in.
    g = torch.Generator().manual_seed(1)
    spatial_scale, trans_std = 0.125, 0.1
    boxes, rois = _random_rois(g, 5, 16.0, 100.0)
    boxes[0] = torch.tensor([20.5, 30.5, 60.49, 70.5], dtype=torch.float64)  # halves round away from zero
    rois[0, 1:] = boxes[0]
    offset = torch.rand(5, 2, K, K, generator=g, dtype=torch.float64) - 0.5
    maps = _coordinate_maps(16, 16, repeat=K * K)  # output channel c reads channels c * K * K + ...
    pooled = deform_psroi_pool(maps, rois, offset, spatial_scale, 2, K, K, K, 4, trans_std)  # (5, 2, K, K)
    box = vo.psroi_boxes(boxes.numpy(), spatial_scale)
    np.testing.assert_array_equal(box[0], [21, 31, 61, 72])
    bins = vo.roi_bins(box, (K, K), offset.numpy(), trans_std)
    mean = (bins[..., :2] + 3 / 8 * (bins[..., 2:] - bins[..., :2])) * spatial_scale - 0.5
    np.testing.assert_allclose(pooled.permute(0, 2, 3, 1).numpy(), mean, rtol=0, atol=1e-9)
