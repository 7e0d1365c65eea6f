"""Datasets and transforms: the generated shapes dataset, CocoDataset, the detection transforms."""

from __future__ import annotations

import json
import os
import threading

import cv2
import numpy as np
import pytest
import torch
from extras import require_detector  # noqa: E402

require_detector()

from mmengine.registry import DATASETS as ROOT_DATASETS  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from dcn_plugin.datasets import (  # noqa: E402
    CocoDataset,
    LoadAnnotations,
    LoadImageFromFile,
    PackDetInputs,
    RandomFlip,
    Resize,
    ShapesDataset,
    generate_shapes,
    make_image,
    object_mask,
    shapes_root,
)
from dcn_plugin.datasets.shapes import CLASSES  # noqa: E402
from dcn_plugin.registry import DATASETS, TRANSFORMS  # noqa: E402
from dcn_plugin.structures import DetDataSample  # noqa: E402

TINY = dict(seed=0, num_train=6, num_val=4, image_size=64)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "tiny"
    generate_shapes(root, **TINY)
    return root


def _load_json(root, split):
    with open(root / "annotations" / f"instances_{split}.json") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# generate_shapes


def test_generate_layout_and_valid_coco(tiny_root):
    assert (tiny_root / ".complete").is_file()
    for split, count in (("train", TINY["num_train"]), ("val", TINY["num_val"])):
        assert len(list((tiny_root / split).glob("*.png"))) == count
        coco = COCO(str(tiny_root / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == count
        assert [c["name"] for c in coco.loadCats(sorted(coco.getCatIds()))] == list(CLASSES)
        assert sorted(coco.getCatIds()) == list(range(1, len(CLASSES) + 1))
        for img in coco.loadImgs(coco.getImgIds()):
            assert (img["height"], img["width"]) == (64, 64)
            pixels = cv2.imread(str(tiny_root / split / img["file_name"]))
            assert pixels.shape == (64, 64, 3)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            assert 1 <= len(anns) <= 5
            for ann in anns:
                x, y, w, h = ann["bbox"]
                assert x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
                assert w >= 1 and h >= 1
                assert ann["area"] == pytest.approx(w * h)
                assert ann["iscrowd"] == 0
                assert ann["category_id"] in range(1, len(CLASSES) + 1)


def test_many_classes_and_sizes():
    labels, areas = [], []
    for index in range(40):
        _, objects = make_image(3, 0, index, 128)
        for obj in objects:
            x1, y1, x2, y2 = obj["bbox"]
            labels.append(obj["label"])
            areas.append((x2 - x1) * (y2 - y1))
    assert len(set(labels)) == len(CLASSES)
    areas = np.array(areas)
    assert (areas < 32**2).any() and ((areas >= 32**2) & (areas < 96**2)).any()


def test_generation_is_deterministic(tmp_path):
    generate_shapes(tmp_path / "a", **TINY)
    generate_shapes(tmp_path / "b", **TINY)
    generate_shapes(tmp_path / "c", **{**TINY, "seed": 1})
    for split in ("train", "val"):
        name = f"annotations/instances_{split}.json"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
        for png in sorted((tmp_path / "a" / split).glob("*.png")):
            a = cv2.imread(str(png))
            b = cv2.imread(str(tmp_path / "b" / split / png.name))
            c = cv2.imread(str(tmp_path / "c" / split / png.name))
            np.testing.assert_array_equal(a, b)
            assert not np.array_equal(a, c)


def test_images_on_disk_are_make_image(tiny_root):
    """Each image depends on (seed, split, index) only, not on what was generated before."""
    coco = _load_json(tiny_root, "val")
    for index in (3, 0):  # out of order on purpose
        img, objects = make_image(TINY["seed"], 1, index, TINY["image_size"])
        np.testing.assert_array_equal(cv2.imread(str(tiny_root / "val" / f"{index:06d}.png")), img)
        anns = [a for a in coco["annotations"] if a["image_id"] == index + 1]
        assert [a["category_id"] - 1 for a in anns] == [o["label"] for o in objects]
        for ann, obj in zip(anns, objects):
            x1, y1, x2, y2 = obj["bbox"]
            assert ann["bbox"] == [x1, y1, x2 - x1, y2 - y1]


def test_boxes_are_tight_around_the_drawn_shape():
    size = 96
    for index in range(12):
        img, objects = make_image(7, 0, index, size)
        for obj in objects:
            x1, y1, x2, y2 = obj["bbox"]
            # The drawn pixels: the mask rendered again from the outline, independently of the box.
            ys, xs = np.nonzero(object_mask(obj["contours"], size) >= 128)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)
            # Any painted pixel at all (anti-aliasing fringe included) is at most 1 px outside.
            ys, xs = np.nonzero(object_mask(obj["contours"], size))
            assert xs.min() >= x1 - 1 and ys.min() >= y1 - 1
            assert xs.max() + 1 <= x2 + 1 and ys.max() + 1 <= y2 + 1
            # The continuous outline agrees within 1.5 px: cv2's anti-aliased fill paints about
            # 0.7 px beyond the outline on each side (see test_object_mask_of_a_square).
            pts = np.concatenate(obj["contours"])
            lo = np.clip(pts.min(axis=0), 0, size)
            hi = np.clip(pts.max(axis=0), 0, size)
            np.testing.assert_allclose([x1, y1, x2, y2], [*lo, *hi], atol=1.5)
            # At least 70% of the shape stays visible, and the visible part is in the image.
            visible = obj["visible"]
            assert visible.sum() >= 0.7 * (obj["mask"] >= 128).sum()
            ys, xs = np.nonzero(visible)
            assert xs.min() >= x1 and xs.max() < x2 and ys.min() >= y1 and ys.max() < y2


def test_object_mask_of_a_square():
    # COCO pixel coordinates: a square from 10 to 20 covers pixels 10..19 fully; cv2's
    # anti-aliased fill paints a little more (up to a pixel) around it.
    square = np.array([[10.0, 10.0], [20.0, 10.0], [20.0, 20.0], [10.0, 20.0]])
    mask = object_mask([square], 32)
    assert (mask[10:20, 10:20] == 255).all()
    ys, xs = np.nonzero(mask >= 128)
    for got, want in zip((xs.min(), xs.max() + 1, ys.min(), ys.max() + 1), (10, 20, 10, 20)):
        assert abs(got - want) <= 1
    assert not mask[:8].any() and not mask[22:].any() and not mask[:, :8].any() and not mask[:, 22:].any()
    # Shifted by half a pixel, the fill stays put relative to the outline.
    np.testing.assert_array_equal(object_mask([square + 1.0], 32)[1:, 1:], mask[:-1, :-1])


def test_second_call_is_a_no_op_and_concurrent_calls_are_safe(tmp_path):
    root = tmp_path / "shared"
    errors = []

    def worker():
        try:
            generate_shapes(root, **TINY)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]  # no temporary folder left
    marker = root / ".complete"
    mtime = marker.stat().st_mtime_ns
    generate_shapes(root, **TINY)
    assert marker.stat().st_mtime_ns == mtime
    assert len(list((root / "train").glob("*.png"))) == TINY["num_train"]


def test_other_parameters_on_an_existing_root_raise(tiny_root, tmp_path):
    with pytest.raises(ValueError, match="delete"):
        generate_shapes(tiny_root, **{**TINY, "num_train": 7})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "something.txt").write_text("x")
    with pytest.raises(ValueError, match="not a complete shapes dataset"):
        generate_shapes(foreign, **TINY)
    # An empty folder is fine: it is replaced.
    (tmp_path / "empty").mkdir()
    generate_shapes(tmp_path / "empty", **{**TINY, "num_train": 1, "num_val": 1})
    assert (tmp_path / "empty" / ".complete").is_file()


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(num_train=-1), "num_train"), (dict(image_size=8), "image_size"), (dict(seed=1.5), "seed")],
)
def test_generate_bad_args(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        generate_shapes(tmp_path / "x", **kwargs)


def test_cache_env_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("DCN_PLUGIN_CACHE", str(tmp_path / "cache"))
    assert shapes_root() == str(tmp_path / "cache" / "shapes-v1-seed0")
    assert shapes_root(seed=3) == str(tmp_path / "cache" / "shapes-v1-seed3")
    small = dict(num_train=3, num_val=2, image_size=64)
    expected = tmp_path / "cache" / "shapes-v1-seed0-3-2-64px"
    assert shapes_root(**small) == str(expected)
    ds = ShapesDataset(split="val", **small)
    assert len(ds) == 2
    assert (expected / ".complete").is_file()
    assert ds.metainfo["ann_file"] == str(expected / "annotations" / "instances_val.json")
    monkeypatch.delenv("DCN_PLUGIN_CACHE")
    assert shapes_root() == os.path.expanduser(os.path.join("~", ".cache", "dcn_plugin", "shapes-v1-seed0"))


# ---------------------------------------------------------------------------------------------
# ShapesDataset


def test_shapes_dataset_pipeline(tiny_root):
    pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations"),
        dict(type="Resize", scale=(128, 128), keep_ratio=True),
        dict(type="RandomFlip", prob=1.0),
        dict(type="PackDetInputs"),
    ]
    ds = ShapesDataset(data_root=str(tiny_root), split="train", pipeline=pipeline, **TINY)
    assert len(ds) == TINY["num_train"]
    assert ds.metainfo["classes"] == CLASSES
    assert len(ds.metainfo["palette"]) == len(CLASSES)
    assert ds.cat_ids == list(range(1, len(CLASSES) + 1))
    coco = _load_json(tiny_root, "train")
    for idx in (0, 3):
        out = ds[idx]
        inputs, sample = out["inputs"], out["data_samples"]
        assert isinstance(sample, DetDataSample)
        assert inputs.shape == (3, 128, 128) and inputs.dtype == torch.uint8 and inputs.is_contiguous()
        img_id = sample.img_id
        assert sample.ori_shape == (64, 64) and sample.img_shape == (128, 128)
        assert sample.scale_factor == (2.0, 2.0)
        assert sample.flip is True and sample.flip_direction == "horizontal"
        # The image: resized, then mirrored.
        raw = cv2.imread(sample.img_path)
        expected = cv2.resize(raw, (128, 128), interpolation=cv2.INTER_LINEAR)[:, ::-1]
        np.testing.assert_array_equal(inputs.permute(1, 2, 0).numpy(), expected)
        # The boxes, from the JSON: scaled by 2, then x -> 128 - x.
        anns = [a for a in coco["annotations"] if a["image_id"] == img_id]
        boxes = np.array([[128 - 2 * (x + w), 2 * y, 128 - 2 * x, 2 * (y + h)] for x, y, w, h in
                          (a["bbox"] for a in anns)], np.float32)
        np.testing.assert_allclose(sample.gt_instances.bboxes.numpy(), boxes)
        assert sample.gt_instances.bboxes.dtype == torch.float32
        assert sample.gt_instances.labels.dtype == torch.int64
        assert sample.gt_instances.labels.tolist() == [a["category_id"] - 1 for a in anns]
        assert len(sample.ignored_instances.bboxes) == 0


def test_shapes_dataset_through_registries(tiny_root):
    cfg = dict(type="ShapesDataset", data_root=str(tiny_root), split="val", **TINY)
    assert len(DATASETS.build(cfg)) == TINY["num_val"]
    assert len(ROOT_DATASETS.build({**cfg, "type": "dcn_plugin.ShapesDataset"})) == TINY["num_val"]
    assert TRANSFORMS.get("PackDetInputs") is PackDetInputs
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(data_root=str(tiny_root), split="test", **TINY)
    with pytest.raises(ValueError, match="ann_file"):
        ShapesDataset(data_root=str(tiny_root), ann_file="x.json", **TINY)


# ---------------------------------------------------------------------------------------------
# Transforms


def _results(h=100, w=200, boxes=((10.0, 20.0, 60.0, 80.0), (150.0, 5.0, 200.0, 100.0))):
    return dict(
        img=np.random.default_rng(0).integers(0, 255, size=(h, w, 3), dtype=np.uint8),
        img_shape=(h, w),
        ori_shape=(h, w),
        gt_bboxes=np.array(boxes, np.float32).reshape(-1, 4),
        gt_bboxes_labels=np.arange(len(boxes), dtype=np.int64),
        gt_ignore_flags=np.zeros(len(boxes), bool),
    )


@pytest.mark.parametrize(
    "hw, scale, new_hw",
    [
        # factor min(1333 / 200, 800 / 100) = 6.665: w 1333, h int(666.5 + 0.5) = 667
        ((100, 200), (1333, 800), (667, 1333)),
        # factor min(1333 / 640, 800 / 480) = 5 / 3: w int(1066.67 + 0.5) = 1067, h 800
        ((480, 640), (1333, 800), (800, 1067)),
        # portrait image, same scale: factor min(1333 / 640, 800 / 480): h 1067, w 800
        ((640, 480), (1333, 800), (1067, 800)),
        # the scale as (short, long) is the same thing
        ((480, 640), (800, 1333), (800, 1067)),
        # shrinking: factor min(64 / 128, 64 / 96) = 0.5
        ((96, 128), (64, 64), (48, 64)),
    ],
)
def test_resize_keep_ratio(hw, scale, new_hw):
    h, w = hw
    results = Resize(scale=scale, keep_ratio=True)(_results(h, w, boxes=((0.0, 0.0, 10.0, 20.0),)))
    assert results["img"].shape[:2] == new_hw
    assert results["img_shape"] == new_hw
    assert results["keep_ratio"] is True
    w_scale, h_scale = new_hw[1] / w, new_hw[0] / h
    assert results["scale_factor"] == (w_scale, h_scale)
    assert all(isinstance(v, float) for v in results["scale_factor"])
    np.testing.assert_allclose(results["gt_bboxes"], [[0, 0, 10 * w_scale, 20 * h_scale]], rtol=1e-6)


def test_resize_fixed_size_and_clipping():
    results = Resize(scale=(50, 40))(_results(100, 200, boxes=((-10.0, 20.0, 60.0, 120.0),)))
    assert results["img"].shape == (40, 50, 3)
    assert results["scale_factor"] == (0.25, 0.4)
    np.testing.assert_allclose(results["gt_bboxes"], [[0.0, 8.0, 15.0, 40.0]])
    resize = Resize(scale=(50, 40), clip_object_border=False)
    unclipped = resize(_results(100, 200, boxes=((-10, 20, 60, 120),)))
    np.testing.assert_allclose(unclipped["gt_bboxes"], [[-2.5, 8.0, 15.0, 48.0]])


def test_resize_scale_factor_and_late_scale():
    results = Resize(scale_factor=0.5)(_results(100, 200))
    assert results["img"].shape[:2] == (50, 100) and results["scale"] == (100, 50)
    np.testing.assert_allclose(results["gt_bboxes"], [[5, 10, 30, 40], [75, 2.5, 100, 50]])
    # mmcv's RandomResize / RandomChoiceResize convention: built with scale=0, scale set later.
    resize = Resize(scale=0, keep_ratio=True)
    with pytest.raises(ValueError, match="scale"):
        resize(_results())
    resize.scale = (300, 300)
    assert resize(_results(100, 200))["img"].shape[:2] == (150, 300)
    with pytest.raises(ValueError, match="scale"):
        resize.scale = (300, "300")


def test_mmcv_random_resize_builds_our_resize():
    transforms = pytest.importorskip("mmcv.transforms", reason="needs mmcv.transforms: pip install mmcv-lite")
    from mmengine.registry import DefaultScope

    with DefaultScope.overwrite_default_scope("dcn_plugin"):
        random_resize = transforms.RandomResize(scale=[(150, 150), (300, 300)], keep_ratio=True)
    assert isinstance(random_resize.resize, Resize)
    np.random.seed(0)  # mmcv draws the scale from numpy's global generator
    for _ in range(5):
        results = random_resize(_results(100, 200))
        h, w = results["img"].shape[:2]
        assert 75 <= h <= 150 and abs(w - 2 * h) <= 1 and results["img_shape"] == (h, w)
        assert results["scale_factor"] == (w / 200, h / 100)


def test_flip_boxes_and_twice_is_identity():
    results = _results()
    img, boxes = results["img"].copy(), results["gt_bboxes"].copy()
    flipped = RandomFlip(prob=1.0)(dict(results))
    assert flipped["flip"] is True and flipped["flip_direction"] == "horizontal"
    np.testing.assert_array_equal(flipped["img"], img[:, ::-1])
    np.testing.assert_allclose(flipped["gt_bboxes"], [[140, 20, 190, 80], [0, 5, 50, 100]])
    vertical = RandomFlip(prob=1.0, direction="vertical")(_results())
    np.testing.assert_array_equal(vertical["img"], img[::-1])
    np.testing.assert_allclose(vertical["gt_bboxes"], [[10, 20, 60, 80], [150, 0, 200, 95]])
    for direction in ("horizontal", "vertical", "diagonal"):
        flip = RandomFlip(prob=1.0, direction=direction)
        twice = flip(flip(_results()))
        np.testing.assert_array_equal(twice["img"], img)
        np.testing.assert_allclose(twice["gt_bboxes"], boxes)
    kept = RandomFlip(prob=0.0)(_results())
    assert kept["flip"] is False and kept["flip_direction"] is None
    np.testing.assert_array_equal(kept["img"], img)


def test_load_and_pack_zero_instances(tmp_path):
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), np.full((30, 40, 3), 7, np.uint8))
    results = LoadImageFromFile()(dict(img_path=str(path), img_id=5, instances=[]))
    assert results["img"].shape == (30, 40, 3) and results["img"].dtype == np.uint8
    assert results["img_shape"] == (30, 40) and results["ori_shape"] == (30, 40)
    results = LoadAnnotations()(results)
    assert results["gt_bboxes"].shape == (0, 4) and results["gt_bboxes"].dtype == np.float32
    assert results["gt_bboxes_labels"].shape == (0,) and results["gt_bboxes_labels"].dtype == np.int64
    assert results["gt_ignore_flags"].shape == (0,) and results["gt_ignore_flags"].dtype == bool
    packed = PackDetInputs()(results)
    sample = packed["data_samples"]
    assert packed["inputs"].shape == (3, 30, 40)
    assert sample.gt_instances.bboxes.shape == (0, 4) and sample.gt_instances.labels.shape == (0,)
    assert sample.img_id == 5 and "flip" not in sample.metainfo


def test_pack_splits_ignored_boxes():
    results = LoadAnnotations()(dict(instances=[
        dict(bbox=[0, 0, 10, 10], bbox_label=2, ignore_flag=0),
        dict(bbox=[5, 5, 20, 20], bbox_label=1, ignore_flag=1),
        dict(bbox=[1, 2, 3, 4], bbox_label=0, ignore_flag=0),
    ]))
    results["img"] = np.zeros((32, 32, 3), np.uint8)
    sample = PackDetInputs(meta_keys=())(results)["data_samples"]
    assert sample.gt_instances.bboxes.tolist() == [[0, 0, 10, 10], [1, 2, 3, 4]]
    assert sample.gt_instances.labels.tolist() == [2, 0]
    assert sample.ignored_instances.bboxes.tolist() == [[5, 5, 20, 20]]
    assert sample.ignored_instances.labels.tolist() == [1]
    assert sample.metainfo == {}


def test_load_image_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match="missing.png"):
        LoadImageFromFile()(dict(img_path=str(missing)))
    assert LoadImageFromFile(ignore_empty=True)(dict(img_path=str(missing))) is None
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    with pytest.raises(OSError, match="garbage.png"):
        LoadImageFromFile()(dict(img_path=str(garbage)))


@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        (Resize, dict(), "scale"),
        (Resize, dict(scale=-3), "scale"),
        (Resize, dict(scale=(10.5, 10)), "scale"),
        (Resize, dict(scale_factor=0), "scale_factor"),
        (Resize, dict(scale_factor=(1.0, 2.0, 3.0)), "scale_factor"),
        (Resize, dict(scale=(10,)), "scale"),
        (Resize, dict(scale=(10, -1)), "scale"),
        (Resize, dict(scale=(10, 10), keep_ratio="yes"), "keep_ratio"),
        (Resize, dict(scale=(10, 10), interpolation="magic"), "interpolation"),
        (RandomFlip, dict(prob=1.5), "prob"),
        (RandomFlip, dict(prob="half"), "prob"),
        (RandomFlip, dict(direction="up"), "direction"),
        (LoadImageFromFile, dict(color_type="rgb"), "color_type"),
        (LoadImageFromFile, dict(to_float32=1), "to_float32"),
        (LoadAnnotations, dict(with_bbox=1), "with_bbox"),
        (LoadAnnotations, dict(with_label=None), "with_label"),
        (PackDetInputs, dict(meta_keys="img_id"), "meta_keys"),
    ],
)
def test_bad_transform_args(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


def test_transform_reprs():
    assert repr(Resize(scale=(1333, 800), keep_ratio=True)) == (
        "Resize(scale=(1333, 800), scale_factor=None, keep_ratio=True, clip_object_border=True, "
        "interpolation='bilinear')"
    )
    assert repr(RandomFlip(prob=0.5)) == "RandomFlip(prob=0.5, direction='horizontal')"
    assert repr(LoadAnnotations()) == "LoadAnnotations(with_bbox=True, with_label=True)"
    assert "color_type='color'" in repr(LoadImageFromFile())
    assert "'img_id'" in repr(PackDetInputs())


# ---------------------------------------------------------------------------------------------
# CocoDataset


@pytest.fixture
def tiny_coco(tmp_path):
    """Categories 7 'cat' and 3 'dog' (out of id order); image 1: a box of each, a crowd box and a
    degenerate box; 2: no annotation; 3: a crowd box only; 4: a box but smaller than 32 px."""
    images = [
        dict(id=1, file_name="a.png", height=100, width=120),
        dict(id=2, file_name="b.png", height=80, width=80),
        dict(id=3, file_name="c.png", height=64, width=64),
        dict(id=4, file_name="d.png", height=20, width=50),
    ]
    anns = [
        dict(id=1, image_id=1, category_id=7, bbox=[10, 20, 30, 40], area=1200, iscrowd=0),
        dict(id=2, image_id=1, category_id=3, bbox=[50, 50, 20, 10], area=200, iscrowd=0),
        dict(id=3, image_id=1, category_id=7, bbox=[0, 0, 100, 100], area=10000, iscrowd=1),
        dict(id=4, image_id=1, category_id=3, bbox=[5, 5, 0.5, 10], area=5, iscrowd=0),
        dict(id=5, image_id=3, category_id=3, bbox=[1, 1, 10, 10], area=100, iscrowd=1),
        dict(id=6, image_id=4, category_id=7, bbox=[1, 1, 10, 10], area=100, iscrowd=0),
    ]
    cats = [dict(id=7, name="cat"), dict(id=3, name="dog")]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "tiny.json").write_text(
        json.dumps(dict(images=images, annotations=anns, categories=cats))
    )
    return tmp_path


def test_coco_dataset_parsing(tiny_coco):
    ds = CocoDataset(
        ann_file="annotations/tiny.json", data_root=str(tiny_coco), data_prefix=dict(img="imgs/")
    )
    assert len(ds) == 4
    # Not the default classes: the JSON's categories by ascending id.
    assert ds.metainfo["classes"] == ("dog", "cat")
    assert ds.cat_ids == [3, 7] and ds.cat2label == {3: 0, 7: 1}
    assert ds.metainfo["ann_file"] == str(tiny_coco / "annotations" / "tiny.json")
    info = ds.get_data_info(0)
    assert info["img_path"] == os.path.join(str(tiny_coco), "imgs", "a.png")
    assert (info["img_id"], info["height"], info["width"]) == (1, 100, 120)
    assert info["instances"] == [
        dict(bbox=[10.0, 20.0, 40.0, 60.0], bbox_label=1, ignore_flag=0),
        dict(bbox=[50.0, 50.0, 70.0, 60.0], bbox_label=0, ignore_flag=0),
        dict(bbox=[0.0, 0.0, 100.0, 100.0], bbox_label=1, ignore_flag=1),  # crowd
        dict(bbox=[5.0, 5.0, 5.5, 15.0], bbox_label=0, ignore_flag=1),  # degenerate
    ]
    assert ds.get_data_info(1)["instances"] == []
    assert ds.get_cat_ids(0) == [7, 3, 7, 3]


def test_coco_dataset_filtering(tiny_coco):
    kwargs = dict(ann_file="annotations/tiny.json", data_root=str(tiny_coco))
    filtered = CocoDataset(filter_cfg=dict(filter_empty_gt=True, min_size=32), **kwargs)
    assert [filtered.get_data_info(i)["img_id"] for i in range(len(filtered))] == [1]
    only_empty = CocoDataset(filter_cfg=dict(filter_empty_gt=True), **kwargs)
    assert [only_empty.get_data_info(i)["img_id"] for i in range(len(only_empty))] == [1, 4]
    test = CocoDataset(filter_cfg=dict(filter_empty_gt=True, min_size=32), test_mode=True, **kwargs)
    assert len(test) == 4
    with pytest.raises(ValueError, match="filter_cfg"):
        CocoDataset(filter_cfg=dict(filter_empty=True), **kwargs)


def test_coco_dataset_lazy_init(tiny_coco):
    ds = CocoDataset(ann_file="annotations/tiny.json", data_root=str(tiny_coco), lazy_init=True)
    assert "ann_file" not in ds.metainfo  # known once the annotations are loaded
    ds.full_init()
    assert ds.metainfo["classes"] == ("dog", "cat") and "ann_file" in ds.metainfo
    assert len(ds) == 4


def test_coco_dataset_explicit_classes(tiny_coco):
    kwargs = dict(ann_file="annotations/tiny.json", data_root=str(tiny_coco))
    ds = CocoDataset(metainfo=dict(classes=("cat",)), **kwargs)
    assert ds.cat_ids == [7]
    instances = ds.get_data_info(0)["instances"]
    assert [(i["bbox_label"], i["ignore_flag"]) for i in instances] == [(0, 0), (-1, 1), (0, 1), (-1, 1)]
    with pytest.raises(ValueError, match="bird"):
        CocoDataset(metainfo=dict(classes=("cat", "bird")), **kwargs)
