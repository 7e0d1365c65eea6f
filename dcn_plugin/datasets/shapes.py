"""The bundled detection dataset: deformed shapes on cluttered backgrounds, generated on first use.

Each image holds 1 to 5 objects of six classes (``CLASSES``). Every object is a densely sampled
outline under a random scale, anisotropic stretch, rotation and a smooth non-rigid warp that bends
its edges, filled with a random colour (independent of the class) and an intensity ramp. The
background is a smooth random colour field with texture, noise, and clutter (lines, arcs and
blobs that are not objects). That is the geometry deformable convolution exists for: what tells
the classes apart is the shape under deformation, not its colour or its size.

Everything is deterministic in ``seed``: image ``i`` of split ``s`` is drawn from
``np.random.default_rng([seed, s, i])`` alone (``make_image``), so the images do not depend on
the order in which they are generated, and the annotation JSON is byte-identical from one
generation to the next.

Layout (COCO format)::

    root/
      .complete                         # marker: the generation parameters (JSON)
      train/000000.png ...
      val/000000.png ...
      annotations/instances_train.json  # image ids and annotation ids start at 1 in each split
      annotations/instances_val.json    # category ids 1..6 in the order of CLASSES

A box is the tight box, in COCO pixel coordinates, of the pixels the object covers at least half
(its anti-aliased mask >= 128), so it is clipped to the image by construction; the object is
painted inside its box only (the faint anti-aliasing fringe beyond it is dropped). ``area`` is the box
area ``w * h`` (a detection-only dataset has no masks), so COCO's small / medium / large split of
the metric uses the same measure for ground truth and detections.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import cv2
import numpy as np

from ..registry import DATASETS
from .coco import CocoDataset

__all__ = [
    "CLASSES",
    "PALETTE",
    "ShapesDataset",
    "generate_shapes",
    "make_image",
    "object_mask",
    "shapes_root",
]

#: Class names; category id ``i + 1`` is ``CLASSES[i]``, and so is label ``i``.
CLASSES = ("triangle", "square", "star", "cross", "ring", "heart")
#: One colour per class (RGB), for visualisation only: the images do not use it.
PALETTE = [(220, 20, 60), (0, 130, 200), (255, 179, 0), (60, 180, 75), (145, 30, 180), (245, 130, 48)]

FORMAT_VERSION = 1
DEFAULT_NUM_TRAIN = 2000
DEFAULT_NUM_VAL = 300
DEFAULT_IMAGE_SIZE = 128
_SPLITS = ("train", "val")
_MARKER = ".complete"
_SHIFT = 4  # cv2 fixed-point bits: outlines are drawn with 1/16 pixel precision

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------
# Shapes: unit outlines, roughly inside [-1, 1]^2 and centred on the origin.


def _densify(vertices: np.ndarray, step: float = 0.05) -> np.ndarray:
    """A closed polygon resampled along its edges (every ``step`` units), vertices kept, so that
    a warp bends the edges instead of only moving the corners."""
    out = []
    for a, b in zip(vertices, np.roll(vertices, -1, axis=0)):
        n = max(1, int(np.ceil(np.linalg.norm(b - a) / step)))
        t = np.arange(n)[:, None] / n
        out.append(a + t * (b - a))
    return np.concatenate(out, axis=0)


def _circle(radius: float, n: int = 96) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _unit_outlines() -> dict[str, list[np.ndarray]]:
    angles = np.deg2rad(90.0 + 120.0 * np.arange(3))
    triangle = np.stack([np.cos(angles), -np.sin(angles)], axis=1)
    triangle[:, 1] += 0.25  # centre the box, not the centroid
    square = np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]])
    star_angles = np.deg2rad(-90.0 + 36.0 * np.arange(10))
    star_radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    star = np.stack([star_radii * np.cos(star_angles), star_radii * np.sin(star_angles)], axis=1)
    star[:, 1] += 0.1
    a, w = 0.95, 0.3
    cross = np.array(
        [[-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w], [w, a], [-w, a], [-w, w], [-a, w], [-a, -w],
         [-w, -w]]
    )
    t = np.linspace(0.0, 2.0 * np.pi, 120, endpoint=False)
    heart = np.stack(
        [16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))],
        axis=1,
    )
    heart = (heart - np.array([0.0, 2.5])) / 16.5
    return {
        "triangle": [_densify(triangle)],
        "square": [_densify(square)],
        "star": [_densify(star, 0.04)],
        "cross": [_densify(cross, 0.04)],
        # Two contours: cv2.fillPoly leaves the inner one as a hole.
        "ring": [_circle(1.0), _circle(0.55, 72)[::-1]],
        "heart": [heart],
    }


_OUTLINES = _unit_outlines()


def _sample_warp(rng: np.random.Generator) -> np.ndarray:
    """Parameters of a smooth random displacement field: per axis, two sinusoids of the point,
    each a row ``(freq_x, freq_y, amplitude, phase)``; shape ``(2, 2, 4)``."""
    phi = rng.uniform(0.0, 2.0 * np.pi, size=(2, 2))
    freq = rng.uniform(1.0, 3.0, size=(2, 2))
    amp = rng.uniform(0.03, 0.12, size=(2, 2))
    phase = rng.uniform(0.0, 2.0 * np.pi, size=(2, 2))
    return np.stack([freq * np.cos(phi), freq * np.sin(phi), amp, phase], axis=-1)


def _apply_warp(points: np.ndarray, params: np.ndarray) -> np.ndarray:
    out = points.copy()
    for axis in range(2):
        for fx, fy, amp, phase in params[axis]:
            out[:, axis] += amp * np.sin(points[:, 0] * fx + points[:, 1] * fy + phase)
    return out


def object_mask(contours: list[np.ndarray], image_size: int) -> np.ndarray:
    """The anti-aliased coverage (uint8, 0..255, ``(image_size, image_size)``) of an object whose
    outline is ``contours`` (float ``(K, 2)`` arrays of ``x, y`` in COCO pixel coordinates, where
    pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``). This is what ``make_image`` paints."""
    mask = np.zeros((image_size, image_size), np.uint8)
    # cv2 puts pixel centres on integer coordinates: COCO x = cv2 x + 0.5.
    pts = [np.round((c - 0.5) * (1 << _SHIFT)).astype(np.int32) for c in contours]
    cv2.fillPoly(mask, pts, 255, cv2.LINE_AA, shift=_SHIFT)
    return mask


def _mask_box(mask: np.ndarray) -> Optional[tuple[int, int, int, int]]:
    rows = np.flatnonzero((mask >= 128).any(axis=1))
    cols = np.flatnonzero((mask >= 128).any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _iou(a: tuple, b: tuple) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _sample_object(rng: np.random.Generator, image_size: int) -> tuple[int, list[np.ndarray]]:
    label = int(rng.integers(len(CLASSES)))
    # Diameter of the unit shape in pixels, log-uniform on a 128 image: boxes of ~8 to ~128 px,
    # about 54% small, 44% medium and 2% large in COCO's area ranges.
    size = np.exp(rng.uniform(np.log(12.0), np.log(140.0))) * image_size / 128.0
    aspect = np.exp(rng.uniform(np.log(0.6), np.log(1.6)))
    stretch = np.array([np.sqrt(aspect), 1.0 / np.sqrt(aspect)])
    theta = rng.uniform(0.0, 2.0 * np.pi)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    centre = rng.uniform(0.05, 0.95, size=2) * image_size
    warp = _sample_warp(rng)
    contours = [(_apply_warp(unit, warp) * stretch) @ rot.T * (size / 2.0) + centre
                for unit in _OUTLINES[CLASSES[label]]]
    return label, contours


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    base = rng.uniform(30.0, 225.0, size=3)
    coarse = rng.uniform(-1.0, 1.0, size=(4, 4, 3)) * rng.uniform(20.0, 70.0)
    fine = rng.uniform(-1.0, 1.0, size=(16, 16, 1)) * rng.uniform(5.0, 25.0)
    img = (
        base
        + cv2.resize(coarse, (n, n), interpolation=cv2.INTER_CUBIC)
        + cv2.resize(fine, (n, n), interpolation=cv2.INTER_LINEAR)[..., None]
    )
    return img.astype(np.float32)


def _clutter(img: np.ndarray, rng: np.random.Generator, count: int) -> None:
    """Lines, arcs and blobs drawn in place: distractors that are not objects."""
    n = img.shape[0]
    for _ in range(count):
        colour = tuple(float(c) for c in rng.uniform(0.0, 255.0, size=3))
        kind = rng.integers(3)
        if kind == 0:
            p0, p1 = rng.integers(-n // 4, n + n // 4, size=(2, 2))
            thickness = int(rng.integers(1, 3))
            cv2.line(img, tuple(map(int, p0)), tuple(map(int, p1)), colour, thickness, cv2.LINE_AA)
        elif kind == 1:
            c = tuple(map(int, rng.integers(0, n, size=2)))
            axes = tuple(map(int, rng.integers(4, max(5, n // 4), size=2)))
            start = float(rng.uniform(0, 360))
            cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), start, start + float(rng.uniform(40, 160)),
                        colour, 1, cv2.LINE_AA)
        else:
            c = tuple(map(int, rng.integers(0, n, size=2)))
            axes = tuple(map(int, rng.integers(1, max(2, n // 32), size=2)))
            cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), 0.0, 360.0, colour, -1, cv2.LINE_AA)


def make_image(
    seed: int, split_index: int, image_index: int, image_size: int = DEFAULT_IMAGE_SIZE
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw one image of the dataset from ``np.random.default_rng([seed, split_index, image_index])``.

    Returns the BGR uint8 image ``(image_size, image_size, 3)`` and its objects in drawing order,
    each a dict with ``label`` (index into ``CLASSES``), ``contours`` (the outline, see
    ``object_mask``), ``mask`` (``object_mask`` of it), ``bbox`` (``x1, y1, x2, y2`` ints, the
    extent of ``mask >= 128``) and ``visible`` (bool, the part of ``mask >= 128`` that later
    objects leave uncovered: at least 70% of it; the box is that of the whole shape).
    """
    rng = np.random.default_rng([seed, split_index, image_index])
    n = image_size
    img = _background(rng, n)
    _clutter(img, rng, int(rng.integers(2, 8)))

    objects: list[dict[str, Any]] = []
    num_objects = int(rng.integers(1, 6))
    attempts = 0
    while len(objects) < num_objects and attempts < 30 * num_objects:
        attempts += 1
        label, contours = _sample_object(rng, n)
        mask = object_mask(contours, n)
        box = _mask_box(mask)
        if box is None or box[2] - box[0] < 4 or box[3] - box[1] < 4:
            continue
        # At least 60% of the shape inside the image (compare with the unclipped outline box).
        pts = np.concatenate(contours)
        full = (pts[:, 0].max() - pts[:, 0].min()) * (pts[:, 1].max() - pts[:, 1].min())
        if (box[2] - box[0]) * (box[3] - box[1]) < 0.6 * full:
            continue
        if any(_iou(box, o["bbox"]) > 0.3 for o in objects):
            continue
        # Drawn on top, the new object must leave at least 70% of every earlier one visible.
        solid = mask >= 128
        if any(np.count_nonzero(o["visible"] & ~solid) < 0.7 * np.count_nonzero(o["mask"] >= 128)
               for o in objects):
            continue
        for o in objects:
            o["visible"] &= ~solid
        objects.append(dict(label=label, contours=contours, mask=mask, bbox=box, visible=solid))

    for obj in objects:
        x1, y1, x2, y2 = obj["bbox"]
        bg_mean = img[y1:y2, x1:x2].reshape(-1, 3).mean(axis=0)
        for _ in range(10):  # a colour that stands out from the background under the object
            colour = rng.uniform(0.0, 255.0, size=3)
            if np.abs(colour - bg_mean).max() >= 60.0:
                break
        # A linear intensity ramp across the object.
        yy, xx = np.mgrid[y1:y2, x1:x2].astype(np.float32)
        direction = rng.normal(size=2)
        direction /= np.linalg.norm(direction) + 1e-6
        ramp = ((xx - (x1 + x2) / 2) * direction[0] + (yy - (y1 + y2) / 2) * direction[1]) / max(
            x2 - x1, y2 - y1
        )
        shade = 1.0 + rng.uniform(-0.5, 0.5) * ramp
        alpha = obj["mask"][y1:y2, x1:x2, None].astype(np.float32) / 255.0
        fill = colour.astype(np.float32) * shade[..., None]
        img[y1:y2, x1:x2] = img[y1:y2, x1:x2] * (1.0 - alpha) + fill * alpha

    if rng.random() < 0.3:
        _clutter(img, rng, 1)
    img += rng.normal(0.0, rng.uniform(2.0, 10.0), size=img.shape).astype(np.float32)
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (3, 3), 0)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), objects


# --------------------------------------------------------------------------------------------
# The dataset on disk.


def _check_params(seed: int, num_train: int, num_val: int, image_size: int) -> dict[str, Any]:
    for name, value, low in (("seed", seed, 0), ("num_train", num_train, 0), ("num_val", num_val, 0),
                             ("image_size", image_size, 32)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return dict(format="dcn_plugin-shapes", version=FORMAT_VERSION, seed=int(seed), num_train=int(num_train),
                num_val=int(num_val), image_size=int(image_size))


def shapes_root(
    seed: int = 0,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> str:
    """The default folder of the shapes dataset: ``$DCN_PLUGIN_CACHE/shapes-v1-seed{seed}``, where
    ``DCN_PLUGIN_CACHE`` defaults to ``~/.cache/dcn_plugin``. Sizes other than the defaults get a
    folder of their own (suffix ``-{num_train}-{num_val}-{image_size}px``), so that they never
    collide with the default dataset."""
    _check_params(seed, num_train, num_val, image_size)
    cache = os.environ.get("DCN_PLUGIN_CACHE") or os.path.join("~", ".cache", "dcn_plugin")
    name = f"shapes-v{FORMAT_VERSION}-seed{seed}"
    if (num_train, num_val, image_size) != (DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL, DEFAULT_IMAGE_SIZE):
        name += f"-{num_train}-{num_val}-{image_size}px"
    return os.path.join(os.path.expanduser(cache), name)


def _is_complete(root: Path, params: dict[str, Any]) -> bool:
    """True where ``root`` holds the dataset of ``params``; False where there is nothing (or an
    empty folder); raises where it holds something else."""
    marker = root / _MARKER
    if marker.is_file():
        try:
            found = json.loads(marker.read_text())
        except ValueError:
            found = None
        if found != params:
            raise ValueError(
                f"{root} holds a shapes dataset generated with {found}, not the requested {params}: "
                "delete that folder, or pick another data_root (or other parameters)"
            )
        return True
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(
            f"{root} exists but is not a complete shapes dataset (no {_MARKER} marker): delete it, or pick "
            "another data_root"
        )
    return False


def _write_split(folder: Path, split: str, split_index: int, count: int, params: dict[str, Any]) -> None:
    (folder / split).mkdir()
    images, annotations = [], []
    for index in range(count):
        img, objects = make_image(params["seed"], split_index, index, params["image_size"])
        file_name = f"{index:06d}.png"
        ok, png = cv2.imencode(".png", img)
        if not ok:
            raise RuntimeError(f"cv2 could not encode {split}/{file_name}")
        (folder / split / file_name).write_bytes(png.tobytes())
        image_id = index + 1
        images.append(dict(id=image_id, file_name=file_name, height=img.shape[0], width=img.shape[1]))
        for obj in objects:
            x1, y1, x2, y2 = obj["bbox"]
            annotations.append(dict(
                id=len(annotations) + 1, image_id=image_id, category_id=obj["label"] + 1,
                bbox=[float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                area=float((x2 - x1) * (y2 - y1)), iscrowd=0,
            ))
    coco = dict(
        info=dict(description=f"dcn_plugin shapes dataset, {split} split", **params),
        licenses=[],
        images=images,
        annotations=annotations,
        categories=[dict(id=i + 1, name=name, supercategory="shape") for i, name in enumerate(CLASSES)],
    )
    (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco, separators=(",", ":")))


def generate_shapes(
    root: PathLike,
    *,
    seed: int = 0,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> None:
    """Write the shapes dataset into ``root`` (layout in the module docstring) unless it is there.

    Safe to call from several processes at once (e.g. every rank of a ``torchrun``): each one
    generates into a temporary sibling folder and renames it into place atomically; a process that
    finds ``root`` already taken removes its own copy. A complete dataset carries the marker file
    ``root/.complete`` with the generation parameters; a ``root`` generated with other parameters,
    or holding anything else, raises ``ValueError`` (delete it or pick another root).
    """
    params = _check_params(seed, num_train, num_val, image_size)
    root = Path(root).expanduser().absolute()
    if _is_complete(root, params):
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset is not
        (tmp / "annotations").mkdir()
        for split_index, (split, count) in enumerate(zip(_SPLITS, (num_train, num_val))):
            _write_split(tmp, split, split_index, count, params)
        (tmp / _MARKER).write_text(json.dumps(params, sort_keys=True))
        try:
            os.rename(tmp, root)  # atomic; replaces an empty folder, fails on a non-empty one
        except OSError:
            if not (root / _MARKER).is_file():  # not another process's dataset: a real problem
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if not _is_complete(root, params):  # another process won with other parameters: raises
        raise RuntimeError(f"generating the shapes dataset into {root} failed")


@DATASETS.register_module()
class ShapesDataset(CocoDataset):
    """The bundled shapes dataset (see the module docstring), generated on first use.

    Args:
        data_root: where the dataset lives; ``None``: ``shapes_root(seed, ...)``, i.e.
            ``$DCN_PLUGIN_CACHE`` (default ``~/.cache/dcn_plugin``) ``/shapes-v1-seed{seed}``.
        split: ``'train'`` or ``'val'``; gives ``ann_file`` and ``data_prefix``.
        seed, num_train, num_val, image_size: the generation parameters (``generate_shapes``).
        **kwargs: the other arguments of ``CocoDataset`` / ``BaseDataset`` (``pipeline``,
            ``test_mode``, ``filter_cfg``, ``serialize_data``, ``lazy_init``, ``indices``, ...).

    Labels are the indices of ``CLASSES`` (category id minus one). Like every ``CocoDataset``, its
    ``metainfo`` carries ``ann_file`` (the absolute path of the split's COCO JSON), which is where
    ``CocoMetric()`` without an ``ann_file`` finds its ground truth.
    """

    METAINFO = dict(classes=CLASSES, palette=PALETTE)

    def __init__(
        self,
        data_root: Optional[PathLike] = None,
        split: str = "train",
        seed: int = 0,
        num_train: int = DEFAULT_NUM_TRAIN,
        num_val: int = DEFAULT_NUM_VAL,
        image_size: int = DEFAULT_IMAGE_SIZE,
        **kwargs: Any,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        for key in ("ann_file", "data_prefix"):
            if key in kwargs:
                raise ValueError(f"ShapesDataset derives {key} from split; do not pass {key}")
        if data_root is None:
            data_root = shapes_root(seed, num_train, num_val, image_size)
        data_root = os.path.abspath(os.path.expanduser(os.fspath(data_root)))
        generate_shapes(data_root, seed=seed, num_train=num_train, num_val=num_val, image_size=image_size)
        self.split = split
        self.seed = seed
        super().__init__(
            ann_file=f"annotations/instances_{split}.json",
            data_root=data_root,
            data_prefix=dict(img=f"{split}/"),
            **kwargs,
        )
