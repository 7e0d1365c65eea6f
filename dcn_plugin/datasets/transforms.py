"""Detection data transforms with mmcv / mmdet's results-dict conventions, in ``TRANSFORMS``.

A transform is a callable on the results dict (``transform(results)``, also ``__call__``); they
need neither mmcv nor mmdet, and mix with mmcv's transforms (same keys: ``img`` BGR uint8 HWC,
``img_shape`` / ``ori_shape`` ``(h, w)``, ``gt_bboxes`` float32 ``(N, 4)`` ``x1, y1, x2, y2``,
``gt_bboxes_labels`` int64, ``gt_ignore_flags`` bool, ``scale_factor`` ``(w_scale, h_scale)``).

Config names in the ``dcn_plugin`` scope: ``LoadImageFromFile``, ``LoadAnnotations``, ``Resize``,
``RandomFlip``, ``PackDetInputs`` (``dcn_plugin.Resize`` etc. from another scope).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import cv2
import numpy as np
import torch
from mmengine.fileio import get
from mmengine.structures import InstanceData

from ..registry import TRANSFORMS
from ..structures import DetDataSample

__all__ = ["LoadAnnotations", "LoadImageFromFile", "PackDetInputs", "RandomFlip", "Resize"]


class _Transform:
    """Base: ``__call__`` runs ``transform``; ``__repr__`` lists ``_repr_args``."""

    _repr_args: tuple[str, ...] = ()

    def transform(self, results: dict) -> Optional[dict]:
        raise NotImplementedError

    def __call__(self, results: dict) -> Optional[dict]:
        return self.transform(results)

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._repr_args)
        return f"{type(self).__name__}({args})"


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return bool(value)


@TRANSFORMS.register_module()
class LoadImageFromFile(_Transform):
    """Read ``results['img_path']`` into ``img`` (BGR uint8 HWC; HW for ``color_type='grayscale'``),
    and set ``img_shape`` and ``ori_shape`` ``(h, w)``.

    Args:
        to_float32: convert the image to float32.
        color_type: ``'color'`` (3 channels BGR), ``'grayscale'`` or ``'unchanged'``.
        ignore_empty: return ``None`` (mmengine then picks another image) for a missing file
            instead of raising.
        backend_args: mmengine file backend arguments.
    """

    _repr_args = ("to_float32", "color_type", "ignore_empty", "backend_args")
    _FLAGS = {"color": cv2.IMREAD_COLOR, "grayscale": cv2.IMREAD_GRAYSCALE, "unchanged": cv2.IMREAD_UNCHANGED}

    def __init__(
        self,
        to_float32: bool = False,
        color_type: str = "color",
        ignore_empty: bool = False,
        backend_args: Optional[dict] = None,
    ) -> None:
        self.to_float32 = _check_bool("to_float32", to_float32)
        if color_type not in self._FLAGS:
            raise ValueError(f"color_type must be one of {sorted(self._FLAGS)}, got {color_type!r}")
        self.color_type = color_type
        self.ignore_empty = _check_bool("ignore_empty", ignore_empty)
        self.backend_args = None if backend_args is None else dict(backend_args)

    def transform(self, results: dict) -> Optional[dict]:
        if "img_path" not in results:
            raise KeyError("LoadImageFromFile needs results['img_path']")
        path = results["img_path"]
        try:
            data = get(path, backend_args=self.backend_args)
        except FileNotFoundError:
            if self.ignore_empty:
                return None
            raise FileNotFoundError(f"image file not found: {path}") from None
        img = cv2.imdecode(np.frombuffer(data, np.uint8), self._FLAGS[self.color_type])
        if img is None:
            if self.ignore_empty:
                return None
            raise OSError(f"cannot decode the image file {path} ({len(data)} bytes)")
        if self.to_float32:
            img = img.astype(np.float32)
        results["img"] = img
        results["img_shape"] = img.shape[:2]
        results["ori_shape"] = img.shape[:2]
        return results


@TRANSFORMS.register_module()
class LoadAnnotations(_Transform):
    """Turn ``results['instances']`` (dicts with ``bbox`` ``[x1, y1, x2, y2]``, ``bbox_label``,
    ``ignore_flag``) into ``gt_bboxes`` float32 ``(N, 4)``, ``gt_ignore_flags`` bool ``(N,)`` (with
    ``with_bbox``) and ``gt_bboxes_labels`` int64 ``(N,)`` (with ``with_label``)."""

    _repr_args = ("with_bbox", "with_label")

    def __init__(self, with_bbox: bool = True, with_label: bool = True) -> None:
        self.with_bbox = _check_bool("with_bbox", with_bbox)
        self.with_label = _check_bool("with_label", with_label)

    def transform(self, results: dict) -> dict:
        if "instances" not in results:
            raise KeyError("LoadAnnotations needs results['instances'] (the dataset's parsed annotations)")
        instances = results["instances"]
        if self.with_bbox:
            boxes = np.asarray([inst["bbox"] for inst in instances], dtype=np.float32).reshape(-1, 4)
            results["gt_bboxes"] = boxes
            results["gt_ignore_flags"] = np.asarray(
                [bool(inst.get("ignore_flag", 0)) for inst in instances], dtype=bool
            ).reshape(-1)
        if self.with_label:
            results["gt_bboxes_labels"] = np.asarray(
                [inst["bbox_label"] for inst in instances], dtype=np.int64
            ).reshape(-1)
        return results


_INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@TRANSFORMS.register_module()
class Resize(_Transform):
    """Resize ``img`` and ``gt_bboxes``, as mmdet's ``Resize``.

    Args:
        scale: ``(w, h)``, or an int for ``(s, s)``. With ``keep_ratio``, the image is rescaled
            by ``min(long / max(h, w), short / min(h, w))`` where ``long``/``short`` are the
            larger/smaller of ``scale`` (mmcv's ``rescale_size``: it fits in the scale, either
            orientation), the new size rounded half up; otherwise it is resized to ``(w, h)``.
            ``0`` or ``None``: set later (mmcv's ``RandomResize`` / ``RandomChoiceResize`` build
            their ``Resize`` with ``scale=0`` and assign ``resize.scale``), or use
            ``scale_factor``.
        scale_factor: without ``scale``, the target is the image size times this (a float, or
            ``(w_factor, h_factor)``), rounded half up; ``keep_ratio`` applies to that target.
        keep_ratio: see ``scale``.
        clip_object_border: clip the boxes to the new image.
        interpolation: ``'nearest'``, ``'bilinear'``, ``'bicubic'``, ``'area'`` or ``'lanczos'``.

    Sets ``img``, ``img_shape``, ``scale`` (the target ``(w, h)``), ``scale_factor``
    ``(new_w / w, new_h / h)`` (floats), ``keep_ratio``, and scales ``gt_bboxes`` by it.
    """

    _repr_args = ("scale", "scale_factor", "keep_ratio", "clip_object_border", "interpolation")

    def __init__(
        self,
        scale: Union[int, Sequence[int], None] = None,
        scale_factor: Union[float, Sequence[float], None] = None,
        keep_ratio: bool = False,
        clip_object_border: bool = True,
        interpolation: str = "bilinear",
    ) -> None:
        self.scale = scale
        if scale_factor is not None:
            factors = scale_factor if isinstance(scale_factor, Sequence) else (scale_factor, scale_factor)
            if len(factors) != 2 or not all(
                isinstance(f, (int, float, np.number)) and not isinstance(f, bool) and f > 0 for f in factors
            ):
                raise ValueError(f"scale_factor must be a positive number or a (w, h) pair of them, "
                                 f"got {scale_factor!r}")
            scale_factor = (float(factors[0]), float(factors[1]))
        if scale is None and scale_factor is None:
            raise ValueError("Resize needs scale (or scale_factor), got neither")
        self.scale_factor = scale_factor
        self.keep_ratio = _check_bool("keep_ratio", keep_ratio)
        self.clip_object_border = _check_bool("clip_object_border", clip_object_border)
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}")
        self.interpolation = interpolation

    @property
    def scale(self) -> Optional[tuple[int, int]]:
        return self._scale

    @scale.setter
    def scale(self, value: Union[int, Sequence[int], None]) -> None:
        if value is None or (_is_int(value) and value == 0):
            self._scale = None
        elif _is_int(value) and value > 0:
            self._scale = (int(value), int(value))
        elif isinstance(value, Sequence) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value):
            self._scale = (int(value[0]), int(value[1]))
        else:
            raise ValueError(f"scale must be a positive int or a (w, h) pair of positive ints, got {value!r}")

    def _new_size(self, w: int, h: int) -> tuple[tuple[int, int], tuple[int, int]]:
        if self.scale is not None:
            target = self.scale
        elif self.scale_factor is not None:
            target = (int(w * self.scale_factor[0] + 0.5), int(h * self.scale_factor[1] + 0.5))
        else:
            raise ValueError("Resize has no scale: set resize.scale, or build it with scale or scale_factor")
        if not self.keep_ratio:
            return target, target
        factor = min(max(target) / max(h, w), min(target) / min(h, w))
        return target, (int(w * factor + 0.5), int(h * factor + 0.5))

    def transform(self, results: dict) -> dict:
        img = results["img"]
        h, w = img.shape[:2]
        target, (new_w, new_h) = self._new_size(w, h)
        if (new_w, new_h) != (w, h):
            img = cv2.resize(img, (new_w, new_h), interpolation=_INTERPOLATIONS[self.interpolation])
        results["img"] = img
        results["img_shape"] = (new_h, new_w)
        results["scale"] = target
        w_scale, h_scale = new_w / w, new_h / h
        results["scale_factor"] = (float(w_scale), float(h_scale))
        results["keep_ratio"] = self.keep_ratio
        boxes = results.get("gt_bboxes")
        if boxes is not None:
            boxes = np.asarray(boxes, dtype=np.float32) * np.array([w_scale, h_scale] * 2, np.float32)
            if self.clip_object_border:
                boxes[:, 0::2] = boxes[:, 0::2].clip(0, new_w)
                boxes[:, 1::2] = boxes[:, 1::2].clip(0, new_h)
            results["gt_bboxes"] = boxes
        return results


_DIRECTIONS = ("horizontal", "vertical", "diagonal")


@TRANSFORMS.register_module()
class RandomFlip(_Transform):
    """Flip ``img`` and ``gt_bboxes`` with probability ``prob``.

    Args:
        prob: the flip probability, in ``[0, 1]``.
        direction: ``'horizontal'`` (``x1' = w - x2``, ``x2' = w - x1``), ``'vertical'`` or
            ``'diagonal'`` (both).

    Sets ``flip`` (bool) and ``flip_direction`` (the direction, or ``None`` without a flip). The
    draw uses numpy's global generator, which mmengine seeds (per dataloader worker too).
    """

    _repr_args = ("prob", "direction")

    def __init__(self, prob: float = 0.5, direction: str = "horizontal") -> None:
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be a number in [0, 1], got {prob!r}")
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
        self.prob = float(prob)
        self.direction = direction

    @staticmethod
    def flip_boxes(boxes: np.ndarray, img_shape: tuple[int, int], direction: str) -> np.ndarray:
        """``boxes`` ``(N, 4)`` ``x1, y1, x2, y2`` flipped in an image of ``img_shape`` ``(h, w)``."""
        h, w = img_shape[:2]
        out = boxes.copy()
        if direction in ("horizontal", "diagonal"):
            out[:, 0] = w - boxes[:, 2]
            out[:, 2] = w - boxes[:, 0]
        if direction in ("vertical", "diagonal"):
            out[:, 1] = h - boxes[:, 3]
            out[:, 3] = h - boxes[:, 1]
        return out

    def transform(self, results: dict) -> dict:
        flip = self.prob > 0 and np.random.random() < self.prob
        results["flip"] = bool(flip)
        results["flip_direction"] = self.direction if flip else None
        if not flip:
            return results
        img = results["img"]
        if self.direction == "horizontal":
            img = img[:, ::-1]
        elif self.direction == "vertical":
            img = img[::-1]
        else:
            img = img[::-1, ::-1]
        results["img"] = np.ascontiguousarray(img)
        if results.get("gt_bboxes") is not None:
            boxes = np.asarray(results["gt_bboxes"])
            results["gt_bboxes"] = self.flip_boxes(boxes, img.shape, self.direction)
        return results


@TRANSFORMS.register_module()
class PackDetInputs(_Transform):
    """Pack the results into ``dict(inputs=..., data_samples=...)`` for the detector.

    ``inputs``: the image as a contiguous torch tensor ``(C, H, W)`` of its dtype (uint8 BGR as
    loaded). ``data_samples``: a ``DetDataSample`` with ``gt_instances`` (``bboxes`` float32,
    ``labels`` int64: the boxes whose ``gt_ignore_flags`` is False) and ``ignored_instances`` (the
    others); both empty ``InstanceData`` where no annotations were loaded. Its metainfo: the
    ``meta_keys`` present in ``results``.
    """

    _repr_args = ("meta_keys",)

    def __init__(
        self,
        meta_keys: Sequence[str] = (
            "img_id", "img_path", "ori_shape", "img_shape", "scale_factor", "flip", "flip_direction",
        ),
    ) -> None:  # fmt: skip
        if isinstance(meta_keys, str) or not all(isinstance(k, str) for k in meta_keys):
            raise ValueError(f"meta_keys must be a sequence of str, got {meta_keys!r}")
        self.meta_keys = tuple(meta_keys)

    def transform(self, results: dict) -> dict:
        packed: dict[str, Any] = {}
        if "img" in results:
            img = results["img"]
            if img.ndim == 2:
                img = img[..., None]
            packed["inputs"] = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))

        sample = DetDataSample()
        gt, ignored = InstanceData(), InstanceData()
        if "gt_bboxes" in results:
            boxes = np.asarray(results["gt_bboxes"], dtype=np.float32).reshape(-1, 4)
            flags = results.get("gt_ignore_flags")
            flags = np.zeros(len(boxes), bool) if flags is None else np.asarray(flags, bool)
            labels = results.get("gt_bboxes_labels")
            for data, keep in ((gt, ~flags), (ignored, flags)):
                data.bboxes = torch.from_numpy(np.ascontiguousarray(boxes[keep]))
                if labels is not None:
                    data.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)[keep])
        sample.gt_instances = gt
        sample.ignored_instances = ignored
        sample.set_metainfo({k: results[k] for k in self.meta_keys if k in results})
        packed["data_samples"] = sample
        return packed
