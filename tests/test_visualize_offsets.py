"""tools/visualize_offsets.py: traced sampling points land where the definition puts them, and the
tool writes its picture.

The model is the quick-start DCN detector (untrained) whose offset generators are set to a known
constant offset (weight zero, bias ``(dy, dx)`` for every kernel point), so that every deformable
layer samples at ``p * stride - padding + k * dilation + (dy, dx)``; the expected image positions
are computed here, independently, from the layers' geometry.
"""

import importlib.util
import itertools
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
from dcn_plugin.layers import LAYERS  # noqa: E402
from dcn_plugin.registry import MODELS  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(ROOT, "configs", "quickstart", "fcos_r18-dcn-c3-c5_fpn_shapes.py")
DY, DX = 1.0, -2.0
# A (H, W) = (96, 128) network input: layer4's input map is (3, 4) (stride 32), layer4.0's is
# (6, 8) (stride 16). A 96x72 image resized by the test pipeline (fit in 128x128, keep ratio)
# becomes 128x96, already a multiple of the preprocessor's pad_size_divisor 32.
IMAGE_SIZE = (96, 128)


def _load_tool():
    path = osp.join(ROOT, "tools", "visualize_offsets.py")
    spec = importlib.util.spec_from_file_location("visualize_offsets", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


vo = _load_tool()


def set_constant_offsets(model, dy, dx):
    """Every deformable layer's generator outputs the offset (dy, dx) for every kernel point."""
    count = 0
    for layer in model.modules():
        if isinstance(layer, tuple(LAYERS.values())):
            gen = layer.conv_offset
            n_offset = 2 * layer.deform_groups * math.prod(layer.kernel_size)
            with torch.no_grad():
                gen.weight.zero_()
                gen.bias.zero_()
                gen.bias[:n_offset].view(-1, 2).copy_(torch.tensor([dy, dx]))
            count += 1
    return count


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = Config.fromfile(CONFIG)
    cfg.model.backbone.init_cfg = None
    m = MODELS.build(cfg.model).eval()
    assert set_constant_offsets(m, DY, DX) >= 6  # c3-c5 of ResNet-18, plus the head's
    return m


def traced_levels(model, n):
    layers = vo.deformable_layers(model)
    x = torch.randn(1, 3, *IMAGE_SIZE)
    with torch.no_grad(), vo.record_inputs(layers) as records:
        model(x, mode="tensor")
    return vo.make_levels(layers, records, n)


# ---- the definition, written out independently of the tool ----

def window(layer, cell_xy, dy, dx):
    """Input-grid positions (x, y), row-major over the kernel, sampled for the output ``cell_xy``."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (layer.kernel_size, layer.stride, layer.padding,
                                              layer.dilation)
    cx, cy = cell_xy
    return [(cx * sw - pw + kx * dw + dx, cy * sh - ph + ky * dh + dy)
            for ky, kx in itertools.product(range(kh), range(kw))]


def to_pixels(xy, stride):
    return ((xy[0] + 0.5) * stride - 0.5, (xy[1] + 0.5) * stride - 0.5)


def cell_of(pixel, stride, grid_hw):
    """The nearest cell (x, y) of a grid with this stride to an image pixel: the grid position
    (pixel + 0.5) / stride - 0.5, rounded half up, clamped into the grid."""
    x = math.floor((pixel[0] + 0.5) / stride - 0.5 + 0.5)
    y = math.floor((pixel[1] + 0.5) / stride - 0.5 + 0.5)
    return min(max(x, 0), grid_hw[1] - 1), min(max(y, 0), grid_hw[0] - 1)


def expected_points(model, start_pixel, levels, offset=(DY, DX)):
    """Image pixels of the traced sampling points of backbone.layer4.1.conv1 (1 level) or of
    layer4.0.conv1 under it (2 levels), for a (96, 128) input and a constant (dy, dx) offset."""
    dy, dx = offset
    l40, l41 = model.backbone.layer4[0].conv1, model.backbone.layer4[1].conv1
    cell = cell_of(start_pixel, 32, (3, 4))  # layer4.1's output grid: (3, 4), stride 32
    top = window(l41, cell, dy, dx)  # on layer4.1's input: (3, 4), stride 32
    if levels == 1:
        return [to_pixels(p, 32) for p in top]
    out = []
    for p in top:
        below = cell_of(to_pixels(p, 32), 32, (3, 4))  # layer4.0's output grid: (3, 4), stride 32
        out += [to_pixels(q, 16) for q in window(l40, below, dy, dx)]  # its input: (6, 8), stride 16
    return out


# ---- tests ----

def test_traced_levels_are_the_last_backbone_layers_in_forward_order(model):
    levels = traced_levels(model, 3)
    assert [lv.name for lv in levels] == ["backbone.layer3.1.conv1", "backbone.layer4.0.conv1",
                                          "backbone.layer4.1.conv1"]
    assert [lv.in_size for lv in levels] == [(6, 8), (6, 8), (3, 4)]
    assert [lv.out_size for lv in levels] == [(6, 8), (3, 4), (3, 4)]
    np.testing.assert_array_equal(levels[-1].offset[0::2], DY)
    np.testing.assert_array_equal(levels[-1].offset[1::2], DX)


@pytest.mark.parametrize("n_levels", [1, 2])
def test_points_are_where_the_constant_offsets_put_them(model, n_levels):
    levels = traced_levels(model, n_levels)
    start = np.array([[85.0, 40.0], [3.0, 90.0]])  # cells (2, 1) and (0, 2) of layer4.1's grid
    points, weights, starts = vo.trace_sampling_points(levels, IMAGE_SIZE, start)
    assert points.shape == (2, 9 ** n_levels, 2)
    np.testing.assert_array_equal(weights, 1.0)  # DCN (v1): no mask
    np.testing.assert_array_equal(starts, [[79.5, 47.5], [15.5, 79.5]])
    for i, s in enumerate(start):
        want = expected_points(model, s, n_levels)
        np.testing.assert_allclose(points[i], want, rtol=0, atol=1e-9)
    # The offsets do move the points: the regular grid differs.
    regular, _, _ = vo.trace_sampling_points(levels, IMAGE_SIZE, start, with_offsets=False)
    for i, s in enumerate(start):
        want = expected_points(model, s, n_levels, offset=(0.0, 0.0))
        np.testing.assert_allclose(regular[i], want, rtol=0, atol=1e-9)
    assert not np.allclose(regular, points)


def test_zero_offsets_give_the_regular_grid(model):
    levels = traced_levels(model, 3)
    for level in levels:
        level.offset = np.zeros_like(level.offset)
    start = np.array([[60.0, 50.0]])
    points, _, _ = vo.trace_sampling_points(levels, IMAGE_SIZE, start)
    regular, _, _ = vo.trace_sampling_points(levels, IMAGE_SIZE, start, with_offsets=False)
    assert points.shape == (1, 729, 2)
    np.testing.assert_array_equal(points, regular)
    # A 3x3 regular grid at stride 16 (layer3.1 under the stride-2 layer4.0): the pixels
    # (x + 0.5) * 16 - 0.5 of whole input cells x.
    np.testing.assert_array_equal(((regular + 0.5) / 16 - 0.5) % 1, 0)


def test_maps_of_different_resolution_and_fractional_offsets():
    """Levels whose grids differ (the lower layer's output is finer than the upper layer's input),
    with dilation, padding, fractional offsets and masks; pure geometry, on a (64, 64) image."""
    dy, dx = 0.3, -1.2
    lower = vo.DeformLevel("a", (3, 3), (1, 1), (1, 1), (1, 1), in_size=(8, 8),
                           offset=np.tile(np.array([dy, dx] * 9)[:, None, None], (1, 8, 8)),
                           mask=np.full((9, 8, 8), 0.5))
    upper = vo.DeformLevel("b", (3, 3), (1, 1), (2, 2), (2, 2), in_size=(4, 4),
                           offset=np.tile(np.array([dy, dx] * 9)[:, None, None], (1, 4, 4)),
                           mask=np.full((9, 4, 4), 0.8))
    points, weights, starts = vo.trace_sampling_points([lower, upper], (64, 64), np.array([[40.0, 25.0]]))
    cell = cell_of((40.0, 25.0), 16, (4, 4))
    assert cell == (2, 1)
    np.testing.assert_array_equal(starts, [to_pixels(cell, 16)])
    want = []
    for p in window(upper, cell, dy, dx):  # on the (4, 4) map, stride 16
        below = cell_of(to_pixels(p, 16), 8, (8, 8))  # lower's output grid: (8, 8), stride 8
        want += [to_pixels(q, 8) for q in window(lower, below, dy, dx)]
    np.testing.assert_allclose(points[0], want, rtol=0, atol=1e-9)
    np.testing.assert_allclose(weights, np.full((1, 81), 0.4))  # the masks' product along each path


def test_main_writes_the_picture(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DCN_PLUGIN_CACHE", str(tmp_path / "cache"))
    checkpoint = tmp_path / "model.pth"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    rng = np.random.default_rng(0)
    image = np.full((72, 96, 3), 200, np.uint8)  # (h, w): resized to (96, 128) by the pipeline
    image[10:40, 20:60] = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    image_path = tmp_path / "image.png"
    cv2.imwrite(str(image_path), image)

    out = tmp_path / "offsets.png"
    # Original pixels -> network input (scale 4/3, pixel centres): (63.5, 29.75) -> about
    # (84.8, 39.8), in cell (2, 1) of layer4.1's grid like (85.0, 40.0); (10, 47.55) -> about
    # (13.5, 63.57), cell (0, 2) (just past the boundary at 63.5: scaling without the centre
    # rule would give cell (0, 1)); (60, 30) shares cell (2, 1) with the first and is dropped.
    result = vo.main([CONFIG, str(checkpoint), str(image_path), "--out", str(out), "--levels", "1",
                      "--points", "63.5,29.75; 10,47.55; 60,30"])
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert str(out) in capsys.readouterr().out
    assert result["layers"] == ["backbone.layer4.1.conv1"]
    # Locations and points in original pixels: the network-input expectation scaled back by 3/4.
    cells = np.array([[79.5, 47.5], [15.5, 79.5]])  # centres of cells (2, 1) and (0, 2), stride 32
    np.testing.assert_allclose(result["locations"], (cells + 0.5) * 0.75 - 0.5)
    for i, start in enumerate([(85.0, 40.0), (13.5, 63.57)]):
        want = (np.array(expected_points(model, start, 1)) + 0.5) * 0.75 - 0.5
        np.testing.assert_allclose(result["deformable"][i], want, rtol=0, atol=1e-9)

    # Default locations (the top detections, or the image centre), three levels.
    out2 = tmp_path / "default.png"
    result = vo.main([CONFIG, str(checkpoint), str(image_path), "--out", str(out2)])
    assert out2.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["deformable"].shape[1:] == (729, 2) and 1 <= len(result["locations"]) <= 3
    assert not (tmp_path / "cache").exists()


def test_levels_follow_the_forward_order_not_the_registration_order():
    layers = [(name, LAYERS["DCN"](2, 2, 3, padding=1)) for name in ("first", "second", "third")]
    with torch.no_grad(), vo.record_inputs(layers) as records:
        for index, size in ((2, 5), (0, 5), (1, 5), (2, 7)):  # "third" runs twice: the first input is kept
            layers[index][1](torch.randn(1, 2, size, size))
    assert [lv.name for lv in vo.make_levels(layers, records, 2)] == ["first", "second"]
    levels = vo.make_levels(layers, records, 5)
    assert [lv.name for lv in levels] == ["third", "first", "second"]
    assert levels[0].in_size == levels[0].out_size == (5, 5)
    assert all(not layer._forward_pre_hooks for _, layer in layers)  # the hooks are removed


def test_parse_points():
    np.testing.assert_array_equal(vo.parse_points("1,2; 3.5,4;"), [[1, 2], [3.5, 4]])
    with pytest.raises(ValueError, match="--points"):
        vo.parse_points("1,2,3")
