"""Show what a detector's deformable layers learned: their sampling points traced back to the image.

    python tools/visualize_offsets.py CONFIG CHECKPOINT IMAGE --out FILE.png
        [--points "x,y;x,y"] [--levels 3] [--topk 3] [--cfg-options k=v ...]
    python tools/visualize_offsets.py CONFIG CHECKPOINT IMAGE --out FILE.png --roi
        [--topk 3] [--cfg-options k=v ...]

The picture of Dai et al. 2017 ("Deformable Convolutional Networks", Fig. 5-6): for a few chosen
locations of the image (one row each), the sampling points of the last ``--levels`` deformable
layers of the backbone, traced back to image pixels (K^levels points, 729 for three 3x3 layers),
on the right, beside the regular grid that plain convolutions of the same geometry would sample,
on the left.

The image goes through the config's test pipeline (without ``LoadAnnotations``) and the model's
data preprocessor, as in ``tools/test.py``. The locations are ``--points`` in pixels of the
original image, or by default the centres of the model's ``--topk`` highest-scoring detections
(the image centre when there are none).

Tracing. A deformable layer with kernel ``(kh, kw)`` (K points, row-major), ``stride``,
``padding`` and ``dilation`` samples, for its output location ``p``, its input at
``p * stride - padding + k * dilation + offset_k`` (offset group 0; ``(dy, dx)`` per kernel
point). Positions on a map of size ``(h, w)`` convert to pixels of the network input ``(H, W)``
through that map's own stride ``s = (W / w, H / h)`` with pixel centres, ``(x + 0.5) * s - 0.5``.
Starting from the chosen location on the last layer's output grid, each sampling position is
rounded to the nearest output location of the deformable layer before it (through image
coordinates, clamped into its grid), whose own K sampling positions are taken in turn, down to
the first traced layer. The same tracing with zero offsets gives the regular grid.

Coordinates here are ``(x, y)`` pairs of pixel indices (pixel ``i`` covers ``[i - 0.5, i + 0.5]``);
original-image and network-input pixels convert through the pipeline's ``scale_factor``
``(w_scale, h_scale)`` with the same centre rule.

Deformable RoI pooling (``--roi``; the paper's Fig. 7). For the ``--topk`` highest-scoring
detections of the image (one row each), the ``k x k`` bins the layer divides the box into (left),
beside the same bins moved by their learned offsets (right; for modulated pooling a bin's alpha
grows with its mask). The detection boxes, in network-input pixels, are pooled again as RoIs
(not the proposals they were refined from). When no detection passes ``test_cfg.rcnn.score_thr``
(an untrained model), the tool says so and uses the RPN's ``--topk`` best proposals instead, with
the RoI head's best object class. The layers:

- Faster R-CNN: ``roi_head.bbox_roi_extractor.roi_layers`` of ``DeformRoIPoolPack`` or
  ``ModulatedDeformRoIPoolPack``, the one of the level ``map_roi_levels`` picks for the box. Bin
  ``(i, j)`` of a box with corner ``(x1, y1)`` and size ``(w, h)`` spans ``x1 + [j, j + 1] * w / k``
  and ``y1 + [i, i + 1] * h / k``, moved by ``gamma * offset[:, i, j] * (w, h)``.
- R-FCN: ``PSRoIBBoxHead`` with ``no_trans=False``, the class-score pooling's offsets of the
  detected class, the bins moved by ``trans_std * offset * (w, h)``. As ``deform_psroi_pool``
  does, the box is first rounded: corners to whole pixels (half away from zero), the end pixel
  included, ``[round(x1), round(x2) + 1]``, at least 0.1 feature pixel wide.

Boxes and bins are ``(x1, y1, x2, y2)`` in the detector's box convention (pixel ``i`` covers
``[i, i + 1]``, as ``pred_instances.bboxes``); network-input boxes are original-image boxes times
``scale_factor``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

__all__ = [
    "DeformLevel", "deformable_layers", "detection_centres", "draw", "grid_to_image", "image_to_grid",
    "input_to_original", "load_model", "main", "make_levels", "nearest_location", "original_to_input",
    "parse_points", "prepare_inputs", "record_inputs", "sampling_positions", "trace_sampling_points",
    "RoIOffsets", "deformable_roi_pooling", "draw_rois", "psroi_boxes", "roi_bins", "roi_offsets", "run_roi",
    "top_rois",
]


# --------------------------------------------------------------------------------------------------
# Geometry (pure functions on numpy arrays)
# --------------------------------------------------------------------------------------------------


@dataclass
class DeformLevel:
    """One traced deformable layer (one image of the batch).

    Attributes:
        name: the layer's module name, e.g. ``'backbone.layer4.1.conv1'``.
        kernel_size, stride, padding, dilation: ``(h, w)`` pairs of ints (padding resolved from
            ``'same'``/``'valid'``).
        in_size: ``(H_in, W_in)`` of the layer's input map.
        offset: ``(2 * K, H_out, W_out)`` float, offset group 0: channel ``2k`` is ``dy`` and
            ``2k + 1`` is ``dx`` of kernel point ``k`` (row-major over the kernel).
        mask: ``(K, H_out, W_out)`` float (the activated mask of group 0), or None (unmodulated).
    """

    name: str
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    in_size: tuple[int, int]
    offset: np.ndarray
    mask: Optional[np.ndarray] = None

    @property
    def out_size(self) -> tuple[int, int]:
        """``(H_out, W_out)``, the grid the offset lives on."""
        return tuple(self.offset.shape[-2:])

    @property
    def num_points(self) -> int:
        """K, the kernel's number of points."""
        return self.kernel_size[0] * self.kernel_size[1]


def _map_stride(grid_size: Sequence[int], image_size: Sequence[int]) -> np.ndarray:
    """``(s_x, s_y)`` of a map ``(h, w)`` in an image ``(H, W)``: ``(W / w, H / h)``."""
    return np.array([image_size[1] / grid_size[1], image_size[0] / grid_size[0]], dtype=np.float64)


def grid_to_image(xy: np.ndarray, grid_size: Sequence[int], image_size: Sequence[int]) -> np.ndarray:
    """Positions ``(..., 2)`` ``(x, y)`` on a map of ``grid_size (h, w)`` -> pixels of an image of
    ``image_size (H, W)``: ``(xy + 0.5) * s - 0.5`` with ``s = (W / w, H / h)``."""
    return (np.asarray(xy, dtype=np.float64) + 0.5) * _map_stride(grid_size, image_size) - 0.5


def image_to_grid(xy: np.ndarray, grid_size: Sequence[int], image_size: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`grid_to_image`: pixels ``(..., 2)`` ``(x, y)`` -> positions on the map."""
    return (np.asarray(xy, dtype=np.float64) + 0.5) / _map_stride(grid_size, image_size) - 0.5


def nearest_location(xy: np.ndarray, grid_size: Sequence[int]) -> np.ndarray:
    """Positions ``(..., 2)`` ``(x, y)`` on a map of ``grid_size (h, w)`` -> the nearest grid
    location, int64 ``(..., 2)``, rounded half up and clamped into the grid."""
    loc = np.floor(np.asarray(xy, dtype=np.float64) + 0.5).astype(np.int64)
    loc[..., 0] = loc[..., 0].clip(0, grid_size[1] - 1)
    loc[..., 1] = loc[..., 1].clip(0, grid_size[0] - 1)
    return loc


def original_to_input(xy: np.ndarray, scale_factor: Sequence[float]) -> np.ndarray:
    """Original-image pixels ``(..., 2)`` ``(x, y)`` -> network-input pixels, with the pipeline's
    ``scale_factor (w_scale, h_scale)``: ``(xy + 0.5) * scale_factor - 0.5``."""
    return (np.asarray(xy, dtype=np.float64) + 0.5) * np.asarray(scale_factor, dtype=np.float64) - 0.5


def input_to_original(xy: np.ndarray, scale_factor: Sequence[float]) -> np.ndarray:
    """Inverse of :func:`original_to_input`."""
    return (np.asarray(xy, dtype=np.float64) + 0.5) / np.asarray(scale_factor, dtype=np.float64) - 0.5


def sampling_positions(level: DeformLevel, locations: np.ndarray,
                       with_offsets: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Where ``level`` samples its input for the output ``locations``.

    Args:
        level: the layer.
        locations: int ``(N, 2)`` ``(x, y)`` on the layer's output grid.
        with_offsets: add the learned offsets; False gives the plain convolution's grid.

    Returns:
        positions ``(N, K, 2)`` ``(x, y)`` on the layer's input map,
        ``p * stride - padding + k * dilation (+ offset)``, and weights ``(N, K)``: the mask at
        each point (ones when unmodulated or ``with_offsets`` is False).
    """
    locations = np.asarray(locations, dtype=np.int64).reshape(-1, 2)
    kh, kw = level.kernel_size
    ky, kx = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
    kernel = np.stack([kx.ravel() * level.dilation[1], ky.ravel() * level.dilation[0]], axis=-1)  # (K, 2)
    stride = np.array([level.stride[1], level.stride[0]])
    padding = np.array([level.padding[1], level.padding[0]])
    positions = (locations * stride - padding)[:, None, :] + kernel[None]  # (N, K, 2)
    positions = positions.astype(np.float64)
    weights = np.ones(positions.shape[:2], dtype=np.float64)
    if with_offsets:
        x, y = locations[:, 0], locations[:, 1]
        offset = np.asarray(level.offset, dtype=np.float64)[:, y, x].T  # (N, 2K)
        offset = offset.reshape(len(locations), level.num_points, 2)  # (dy, dx) per kernel point
        positions = positions + offset[..., ::-1]
        if level.mask is not None:
            weights = np.asarray(level.mask, dtype=np.float64)[:, y, x].T  # (N, K)
    return positions, weights


def trace_sampling_points(levels: Sequence[DeformLevel], image_size: Sequence[int], start_xy: np.ndarray,
                          with_offsets: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sampling points of a stack of deformable layers, traced back to image pixels (Dai et al.).

    Args:
        levels: the traced layers in forward order (``levels[-1]`` is the last one).
        image_size: ``(H, W)`` of the network input the maps' strides refer to.
        start_xy: ``(N, 2)`` ``(x, y)`` network-input pixels; each is moved to the nearest output
            location of the last layer.
        with_offsets: False traces the regular grid of plain convolutions.

    Returns:
        ``points (N, K^L, 2)`` ``(x, y)`` in network-input pixels, one per path (``K^L``: the
        product of the levels' kernel sizes; ordered by the last layer's kernel point, then the
        layer before's, and so on; paths may end on the same point), ``weights (N, K^L)`` (the
        product of the masks along each path, ones without masks), and ``starts (N, 2)``: the
        chosen output locations of the last layer, in network-input pixels.
    """
    if not levels:
        raise ValueError("trace_sampling_points: no deformable layers to trace")
    start_xy = np.asarray(start_xy, dtype=np.float64).reshape(-1, 2)
    n = len(start_xy)
    top = levels[-1]
    loc = nearest_location(image_to_grid(start_xy, top.out_size, image_size), top.out_size)
    starts = grid_to_image(loc, top.out_size, image_size)
    positions, weights = sampling_positions(top, loc, with_offsets)  # (N, K, 2), (N, K)
    above = top
    for level in reversed(levels[:-1]):
        pixels = grid_to_image(positions, above.in_size, image_size)
        loc = nearest_location(image_to_grid(pixels, level.out_size, image_size), level.out_size)
        m = loc.shape[1]
        positions, w = sampling_positions(level, loc.reshape(-1, 2), with_offsets)  # (N*M, K, 2)
        positions = positions.reshape(n, m * level.num_points, 2)
        weights = (weights[..., None] * w.reshape(n, m, level.num_points)).reshape(n, -1)
        above = level
    return grid_to_image(positions, above.in_size, image_size), weights, starts


def parse_points(text: str) -> np.ndarray:
    """``"x,y;x,y"`` -> float ``(N, 2)`` ``(x, y)``."""
    points = []
    for part in text.split(";"):
        if not part.strip():
            continue
        values = part.split(",")
        try:
            if len(values) != 2:
                raise ValueError
            points.append([float(v) for v in values])
        except ValueError:
            raise ValueError(f"--points: expected 'x,y;x,y', got {text!r} (bad item {part!r})") from None
    if not points:
        raise ValueError(f"--points: no point in {text!r}")
    return np.asarray(points, dtype=np.float64)


def roi_bins(boxes: np.ndarray, bins_hw: Sequence[int], offset: Optional[np.ndarray] = None,
             scale=0.0) -> np.ndarray:
    """The bins RoI pooling divides boxes into, optionally moved by deformable offsets.

    Args:
        boxes: ``(R, 4)`` x1, y1, x2, y2.
        bins_hw: ``(kh, kw)`` bins per side.
        offset: ``(R, 2, kh, kw)`` normalised offsets (x, then y) or None (the regular bins).
        scale: ``gamma`` or ``trans_std``, a float or ``(R,)``: bin ``(i, j)`` moves by
            ``scale * offset[:, :, i, j] * (w, h)``.

    Returns:
        ``(R, kh, kw, 4)`` bin boxes x1, y1, x2, y2; bin ``(i, j)`` of the regular grid is
        ``[x1 + j * w / kw, y1 + i * h / kh, x1 + (j + 1) * w / kw, y1 + (i + 1) * h / kh]``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    kh, kw = bins_hw
    size = boxes[:, 2:] - boxes[:, :2]  # (R, 2) (w, h)
    i, j = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
    start = np.stack([j, i], axis=-1) * (size / [kw, kh])[:, None, None]  # (R, kh, kw, 2)
    start = boxes[:, None, None, :2] + start
    if offset is not None:
        shift = np.asarray(offset, dtype=np.float64).transpose(0, 2, 3, 1)  # (R, kh, kw, 2) (x, y)
        scale = np.asarray(scale, dtype=np.float64).reshape(-1, 1, 1, 1)
        start = start + scale * shift * size[:, None, None]
    return np.concatenate([start, start + (size / [kw, kh])[:, None, None]], axis=-1)


def psroi_boxes(boxes: np.ndarray, spatial_scale: float) -> np.ndarray:
    """Boxes ``(R, 4)`` -> the boxes ``deform_psroi_pool`` divides into bins: corners rounded half
    away from zero, the end pixel included (``[round(x1), round(x2) + 1]``), at least
    ``0.1 / spatial_scale`` wide and high."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    rounded = np.sign(boxes) * np.floor(np.abs(boxes) + 0.5)
    size = np.maximum(rounded[:, 2:] + 1 - rounded[:, :2], 0.1 / spatial_scale)
    return np.concatenate([rounded[:, :2], rounded[:, :2] + size], axis=-1)


# --------------------------------------------------------------------------------------------------
# Model side
# --------------------------------------------------------------------------------------------------


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _resolve_padding(layer: nn.Module) -> tuple[int, int]:
    """The layer's padding as a ``(h, w)`` pair; ``'valid'`` is 0 and ``'same'`` is PyTorch's left
    padding ``dilation * (k - 1) // 2``."""
    padding = layer.padding
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(_pair(layer.dilation), _pair(layer.kernel_size)))
    return _pair(padding)


def deformable_layers(model: nn.Module, under: Optional[str] = "backbone") -> list[tuple[str, nn.Module]]:
    """The 2d deformable convolutions of ``model`` (``(name, layer)``, registration order): the
    instances of ``dcn_plugin.layers.LAYERS`` with a 2d kernel, not transposed, whose name is in the
    submodule ``under`` (all of the model when ``under`` is None or the model has no such child)."""
    from dcn_plugin.layers import LAYERS

    classes = tuple(LAYERS.values())
    prefix = f"{under}." if under and hasattr(model, under) else ""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, classes) and name.startswith(prefix) and len(m.kernel_size) == 2
            and not getattr(m, "transposed", False)]


@contextlib.contextmanager
def record_inputs(named_layers: Sequence[tuple[str, nn.Module]]) -> Iterator[dict]:
    """Within the block, records each layer's input: yields a dict ``name -> (B, C, H, W)`` tensor,
    filled in the order the layers run (a layer that runs twice keeps its first input)."""
    records: dict = {}
    handles = []
    for name, layer in named_layers:
        def hook(module, args, name=name):
            records.setdefault(name, args[0].detach())
        handles.append(layer.register_forward_pre_hook(hook))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def make_levels(named_layers: Sequence[tuple[str, nn.Module]], records: dict, levels: int,
                index: int = 0) -> list[DeformLevel]:
    """The last ``levels`` recorded layers in forward order, as :class:`DeformLevel` of batch
    element ``index``: each layer's ``offset_mask(input)`` on its recorded input."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    modules = dict(named_layers)
    names = [name for name in records if name in modules][-levels:]
    if not names:
        raise ValueError("no deformable layer ran in the forward pass: nothing to trace (is the model "
                         "deformable, e.g. a dcn=dict(type='DCN') backbone?)")
    out = []
    for name in names:
        layer, x = modules[name], records[name]
        offset, mask = layer.offset_mask(x)
        k = math.prod(layer.kernel_size)
        out.append(DeformLevel(
            name=name, kernel_size=_pair(layer.kernel_size), stride=_pair(layer.stride),
            padding=_resolve_padding(layer), dilation=_pair(layer.dilation), in_size=tuple(x.shape[-2:]),
            offset=offset[index, : 2 * k].float().cpu().numpy(),
            mask=None if mask is None else mask[index, :k].float().cpu().numpy(),
        ))
    return out


def load_model(config: str, checkpoint: str, cfg_options: Optional[dict] = None):
    """``(model, cfg)``: the config's model, built through ``dcn_plugin.registry.MODELS``, with the
    checkpoint loaded (strictly, as a missing ``conv_offset`` would draw a regular grid), in eval mode."""
    from mmengine.config import Config
    from mmengine.runner import load_checkpoint

    import dcn_plugin.models  # noqa: F401  (registers the detector's models)
    from dcn_plugin.engine import mmengine_safe_loading
    from dcn_plugin.layers import register_dcn_upgrade_hook
    from dcn_plugin.registry import MODELS

    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    model = MODELS.build(copy.deepcopy(cfg.model))
    handle = register_dcn_upgrade_hook(model)  # mmcv's version-1 DCN keys load too
    with mmengine_safe_loading():
        load_checkpoint(model, checkpoint, map_location="cpu", strict=True)
    handle.remove()
    return model.eval(), cfg


def prepare_inputs(cfg, image_path: str) -> dict:
    """One image through the config's test pipeline (``cfg.test_dataloader.dataset.pipeline``) less
    ``LoadAnnotations``: ``dict(inputs=[(3, h, w) uint8], data_samples=[DetDataSample])``, ready for
    the model's data preprocessor."""
    import dcn_plugin.datasets  # noqa: F401  (registers the transforms)
    from dcn_plugin.registry import TRANSFORMS

    results = dict(img_path=image_path, img_id=0)
    for step in cfg.test_dataloader.dataset.pipeline:
        if str(step["type"]).split(".")[-1] == "LoadAnnotations":
            continue
        results = TRANSFORMS.build(copy.deepcopy(step))(results)
        if results is None:
            raise ValueError(f"the test pipeline dropped the image {image_path!r} at {step['type']}")
    return dict(inputs=[results["inputs"]], data_samples=[results["data_samples"]])


def detection_centres(sample, topk: int = 3) -> np.ndarray:
    """Centres ``(n, 2)`` ``(x, y)`` (original-image pixel indices) of the ``topk`` highest-scoring
    predictions of a data sample (``pred_instances.bboxes`` ``(M, 4)`` x1, y1, x2, y2 in original
    pixels, edges at integers); ``n = min(topk, M)``."""
    pred = sample.pred_instances
    if len(pred) == 0 or topk < 1:
        return np.zeros((0, 2))
    order = torch.argsort(pred.scores, descending=True)[:topk]
    boxes = pred.bboxes[order].float().cpu().numpy().reshape(-1, 4)
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=-1) - 0.5


@dataclass
class RoIOffsets:
    """The learned bin offsets of deformable RoI pooling for R RoIs of one image.

    Attributes:
        boxes: ``(R, 4)`` x1, y1, x2, y2: the boxes the layer divides into bins, network-input pixels.
        offset: ``(R, 2, kh, kw)`` the layer's normalised offsets per bin, x then y.
        scale: ``(R,)`` ``gamma`` or ``trans_std`` of the layer that pools each RoI.
        mask: ``(R, kh, kw)`` the bins' weights (modulated pooling), or None.
        layers: R module names, the layer whose offsets each RoI has.
    """

    boxes: np.ndarray
    offset: np.ndarray
    scale: np.ndarray
    mask: Optional[np.ndarray]
    layers: list[str]

    def bins(self, with_offsets: bool = True) -> np.ndarray:
        """``(R, kh, kw, 4)``: the bins moved by the offsets, or the regular ones (:func:`roi_bins`)."""
        offset = self.offset if with_offsets else None
        return roi_bins(self.boxes, self.offset.shape[-2:], offset, self.scale)


def deformable_roi_pooling(model: nn.Module) -> nn.Module:
    """The part of a two-stage detector whose deformable RoI pooling is drawn: Faster R-CNN's
    ``roi_head.bbox_roi_extractor`` when its ``roi_layers`` are ``DeformRoIPoolPack`` (or the
    modulated one), or R-FCN's ``roi_head.bbox_head`` with ``conv_cls_offset`` (``no_trans=False``).
    Raises ValueError when the model has neither."""
    from dcn_plugin.ops import DeformRoIPoolPack

    head = getattr(model, "roi_head", None)
    extractor = getattr(head, "bbox_roi_extractor", None)
    layers = list(getattr(extractor, "roi_layers", ()))
    if layers and all(isinstance(layer, DeformRoIPoolPack) for layer in layers):
        return extractor
    bbox_head = getattr(head, "bbox_head", None)
    if hasattr(bbox_head, "conv_cls_offset") and not getattr(bbox_head, "no_trans", True):
        return bbox_head
    raise ValueError(
        f"{type(model).__name__} has no deformable RoI pooling to draw: --roi needs a two-stage detector "
        "whose roi_head.bbox_roi_extractor.roi_layer is DeformRoIPoolPack or ModulatedDeformRoIPoolPack "
        "(Faster R-CNN) or whose roi_head.bbox_head is a PSRoIBBoxHead with no_trans=False (R-FCN)")


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().cpu().numpy()


def _extractor_offsets(extractor: nn.Module, feats: Sequence[torch.Tensor], rois: torch.Tensor,
                       name: str) -> RoIOffsets:
    """Faster R-CNN: each RoI's offsets (and mask) from the layer of its level (``offset_and_mask``)."""
    feats = feats[:len(extractor.featmap_strides)]
    n, (kh, kw) = len(rois), extractor.output_size
    levels = extractor.map_roi_levels(rois) if len(feats) > 1 else rois.new_zeros(len(rois), dtype=torch.long)
    offset, scale, mask, names = np.zeros((n, 2, kh, kw)), np.zeros(n), None, [""] * n
    for level in levels.unique().tolist():
        index = (levels == level).nonzero().flatten().cpu().numpy()
        layer = extractor.roi_layers[level]
        level_offset, level_mask = layer.offset_and_mask(feats[level], rois[index])
        offset[index] = _numpy(level_offset)
        scale[index] = layer.gamma
        if level_mask is not None:
            mask = np.ones((n, kh, kw)) if mask is None else mask
            mask[index] = _numpy(level_mask).reshape(-1, kh, kw)
        for i in index:
            names[i] = f"{name}.roi_layers.{level}"
    return RoIOffsets(_numpy(rois[:, 1:]), offset, scale, mask, names)


def _psroi_offsets(head: nn.Module, feat: torch.Tensor, rois: torch.Tensor, labels: np.ndarray,
                   name: str) -> RoIOffsets:
    """R-FCN: the class-score pooling's offsets of each RoI's class (``PSRoIBBoxHead.part_offsets``),
    on the rounded box."""
    import torch.nn.functional as F

    k, n = head.group_size, len(rois)
    offset, _ = head.part_offsets(F.relu(head.conv_new(feat)), rois)  # (R, 2 * (C + 1), k, k)
    offset = _numpy(offset).reshape(n, -1, 2, k, k)[np.arange(n), np.asarray(labels, dtype=np.int64)]
    boxes = psroi_boxes(_numpy(rois[:, 1:]), head.spatial_scale)
    return RoIOffsets(boxes, offset, np.full(n, head.trans_std), None, [f"{name}.conv_cls_offset"] * n)


@torch.no_grad()
def roi_offsets(model: nn.Module, feats: Sequence[torch.Tensor], boxes: np.ndarray,
                labels: np.ndarray) -> RoIOffsets:
    """The learned offsets of the model's deformable RoI pooling (:func:`deformable_roi_pooling`)
    for boxes of the first image.

    Args:
        model: a two-stage detector.
        feats: its ``extract_feat`` output, per level ``(B, C, H, W)``.
        boxes: ``(R, 4)`` x1, y1, x2, y2 in network-input pixels.
        labels: ``(R,)`` object classes (R-FCN's offsets are per class; Faster R-CNN ignores them).
    """
    part = deformable_roi_pooling(model)
    name = next(n for n, m in model.named_modules() if m is part)
    feat = feats[0]
    boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), device=feat.device)
    rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], 1).to(feat.dtype)
    if hasattr(part, "roi_layers"):
        return _extractor_offsets(part, feats, rois, name)
    return _psroi_offsets(part, feats[-1], rois, labels, name)


@torch.no_grad()
def top_rois(model: nn.Module, feats: Sequence[torch.Tensor], sample,
             topk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """The RoIs to draw: ``boxes (n, 4)`` in network-input pixels, ``labels (n,)``, ``scores (n,)``
    and where they come from: ``'detection'``, the ``topk`` best of ``sample.pred_instances``
    (original-image boxes times ``scale_factor``), or, when there is none, ``'proposal'``: the RPN's
    ``topk`` best proposals (objectness scores), each with the RoI head's best object class."""
    pred = sample.pred_instances
    if len(pred):
        order = torch.argsort(pred.scores, descending=True)[:topk]
        scale = np.tile(np.asarray(sample.metainfo.get("scale_factor", (1.0, 1.0)), dtype=np.float64)[:2], 2)
        return (_numpy(pred.bboxes[order]) * scale, pred.labels[order].cpu().numpy(),
                _numpy(pred.scores[order]), "detection")
    proposals = model.rpn_head.predict(model.rpn_feats(feats), [sample])[0][:topk]
    cls_score, _ = model.roi_head(feats, [proposals])
    labels = cls_score[:, :-1].argmax(1)  # the last class is the background
    return _numpy(proposals.bboxes), labels.cpu().numpy(), _numpy(proposals.scores), "proposal"


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------


def draw(image_rgb: np.ndarray, locations: np.ndarray, regular: np.ndarray, deformable: np.ndarray,
         weights: np.ndarray, layer_names: Sequence[str], out: str) -> None:
    """Two panels on the image per location, one row each (the traced points of one location
    cover much of a small image, so locations are not overlaid): the plain convolution's regular
    grid (left) and the learned sampling points (right).

    Args:
        image_rgb: ``(H, W, 3)`` uint8.
        locations: ``(N, 2)`` ``(x, y)`` the chosen locations (green markers).
        regular, deformable: ``(N, P, 2)`` ``(x, y)`` the sampling points (red dots), in the
            image's pixels.
        weights: ``(N, P)`` non-negative, of the deformable points; their alpha is
            ``0.15 + 0.85 * weight / max`` (per location).
        layer_names: the traced layers, first to last (named in the title).
        out: the PNG (or any format matplotlib writes) to save.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h, w = image_rgb.shape[:2]
    n, p = deformable.shape[:2]
    fig = Figure(figsize=(10, 4.6 * n + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 2, squeeze=False)
    # The image, widened where a marker snapped onto the padding the data preprocessor adds.
    lo = np.min([[-0.5, -0.5], *(locations - 2)], axis=0)
    hi = np.max([[w - 0.5, h - 0.5], *(locations + 2)], axis=0)
    titles = ("plain convolution (regular grid)", "deformable (learned offsets)")
    for i in range(n):
        top = weights[i].max(initial=0.0)
        alpha = 0.15 + 0.85 * (weights[i] / top if top > 0 else np.ones(p))
        panels = zip(axes[i], (regular[i], deformable[i]), titles, (np.full(p, 0.6), alpha))
        for ax, points, title, a in panels:
            ax.imshow(image_rgb, interpolation="nearest")
            colors = np.zeros((p, 4))
            colors[:, 0] = 1.0
            colors[:, 3] = a
            ax.scatter(points[:, 0], points[:, 1], s=12, c=colors, edgecolors="none")
            ax.scatter(locations[i, 0], locations[i, 1], s=90, c="lime", marker="o", edgecolors="black",
                       linewidths=1.0, zorder=3)
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(hi[1], lo[1])
            ax.set_title(f"{title}: ({locations[i, 0]:.0f}, {locations[i, 1]:.0f}), {p} points", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("sampling points traced through " + " \u2192 ".join(layer_names), fontsize=9)
    fig.tight_layout()
    fig.savefig(out)


def _rectangles(ax, bins: np.ndarray, color: str, alpha: np.ndarray, **kwargs) -> None:
    """Bins ``(P, 4)`` (box convention) as rectangles on an image axis (pixel ``i`` centred at ``i``)."""
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Rectangle

    patches = [Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1) for x1, y1, x2, y2 in bins]
    colors = np.tile(to_rgba(color), (len(bins), 1))
    colors[:, 3] = alpha
    ax.add_collection(PatchCollection(patches, facecolors="none", edgecolors=colors, **kwargs))


def draw_rois(image_rgb: np.ndarray, rois: np.ndarray, regular: np.ndarray, deformable: np.ndarray,
              weights: np.ndarray, titles: Sequence[str], out: str) -> None:
    """Two panels on the image per RoI, one row each: the regular bins (left) and the bins moved by
    their learned offsets (right), as rectangles, with the RoI's box (green, dashed).

    Args:
        image_rgb: ``(H, W, 3)`` uint8.
        rois: ``(N, 4)`` x1, y1, x2, y2, box convention, in the image's pixels.
        regular, deformable: ``(N, kh, kw, 4)`` the bins, likewise.
        weights: ``(N, kh, kw)`` non-negative, of the moved bins; their alpha is
            ``0.15 + 0.85 * weight / max`` (per RoI).
        titles: N row titles (of the left panels).
        out: the PNG (or any format matplotlib writes) to save.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h, w = image_rgb.shape[:2]
    n = len(rois)
    fig = Figure(figsize=(10, 4.6 * n + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 2, squeeze=False)
    corners = np.concatenate([regular.reshape(-1, 2), deformable.reshape(-1, 2), rois.reshape(-1, 2)]) - 0.5
    lo = np.minimum([-0.5, -0.5], corners.min(axis=0) - 2)
    hi = np.maximum([w - 0.5, h - 0.5], corners.max(axis=0) + 2)
    for i in range(n):
        bins = (regular[i].reshape(-1, 4), deformable[i].reshape(-1, 4))
        top = weights[i].max(initial=0.0)
        alpha = 0.15 + 0.85 * (weights[i].ravel() / top if top > 0 else np.ones(len(bins[1])))
        kinds = (f"{titles[i]}\nregular bins", "bins moved by the learned offsets\n")
        panels = zip(axes[i], bins, kinds, ("yellow", "orangered"), (np.full(len(bins[0]), 0.9), alpha))
        for ax, panel, kind, color, a in panels:
            ax.imshow(image_rgb, interpolation="nearest")
            _rectangles(ax, panel, color, a, linewidths=0.9)
            _rectangles(ax, rois[i:i + 1], "lime", np.ones(1), linewidths=1.2, linestyles="--")
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(hi[1], lo[1])
            ax.set_title(kind, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("deformable RoI pooling: regular bins (left), learned offsets (right)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(
        description="Draw the sampling points of a detector's last deformable layers traced back to "
                    "image pixels, beside a plain convolution's regular grid (Dai et al. 2017, Fig. 5-6); "
                    "with --roi, the bins of its deformable RoI pooling before and after their offsets "
                    "(Fig. 7)")
    parser.add_argument("config", help="model config file")
    parser.add_argument("checkpoint", help="checkpoint file")
    parser.add_argument("image", help="image file (e.g. a val image)")
    parser.add_argument("--out", required=True, help="the picture to write, e.g. offsets.png")
    parser.add_argument("--roi", action="store_true",
                        help="draw the bins of the deformable RoI pooling of a two-stage detector (Fig. 7) "
                             "for the top-scoring detections, instead of the convolutions' sampling points")
    parser.add_argument("--points", help="locations 'x,y;x,y' in original-image pixels (default: the "
                                         "centres of the top-scoring detections); not with --roi")
    parser.add_argument("--levels", type=int, default=3,
                        help="deformable layers to trace back (default 3); not used with --roi")
    parser.add_argument("--topk", type=int, default=3,
                        help="detections to use without --points, RoIs to draw with --roi (default 3)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override config settings, e.g. model.backbone.init_cfg=None")
    return parser.parse_args(argv)


def run_roi(args: argparse.Namespace, model: nn.Module, cfg, image_bgr: np.ndarray) -> dict:
    """``--roi``: returns ``dict(out, source, layers (R names), rois (R, 4), labels (R,), scores (R,),
    boxes (R, 4), regular (R, kh, kw, 4), deformable (R, kh, kw, 4), weights (R, kh, kw))``:
    ``source`` is ``'detection'`` or ``'proposal'`` (see :func:`top_rois`), ``rois`` the drawn
    detections, ``boxes`` the boxes the layer divides into bins (R-FCN rounds them), the bins'
    ``weights`` their masks (ones without); boxes ``(x1, y1, x2, y2)`` in original-image pixels."""
    import cv2

    if args.points is not None:
        raise ValueError("--points does not apply to --roi, which draws the top-scoring detections")
    if args.topk < 1:
        raise ValueError(f"--topk must be >= 1, got {args.topk}")
    deformable_roi_pooling(model)  # a clear error before the forward pass
    data = prepare_inputs(cfg, args.image)
    with torch.no_grad():
        data = model.data_preprocessor(data, False)
        samples = model(**data, mode="predict")
        feats = model.extract_feat(data["inputs"])
    boxes, labels, scores, source = top_rois(model, feats, samples[0], args.topk)
    if len(boxes) == 0:
        raise ValueError(f"{args.image}: the model gives no detection and no proposal: no RoI to draw")
    if source == "proposal":
        print(f"no detection above test_cfg.rcnn.score_thr: drawing the RPN's {len(boxes)} best proposals")
    offsets = roi_offsets(model, feats, boxes, labels)
    scale = np.tile(np.asarray(samples[0].metainfo.get("scale_factor", (1.0, 1.0)), dtype=np.float64)[:2], 2)
    weights = offsets.mask if offsets.mask is not None else np.ones(offsets.offset[:, 0].shape)
    result = dict(
        out=args.out, source=source, layers=offsets.layers, rois=boxes / scale, labels=labels, scores=scores,
        boxes=offsets.boxes / scale, regular=offsets.bins(False) / scale, deformable=offsets.bins() / scale,
        weights=weights,
    )
    titles = [f"{source} {i + 1}: class {labels[i]}, score {scores[i]:.2f}, {offsets.layers[i]}"
              for i in range(len(boxes))]
    draw_rois(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB), result["rois"], result["regular"],
              result["deformable"], weights, titles, args.out)
    kh, kw = offsets.offset.shape[-2:]
    print(f"{args.out}: {len(boxes)} {source}(s) x {kh}x{kw} bins of deformable RoI pooling: "
          f"{', '.join(sorted(set(offsets.layers)))}")
    return result


def main(argv=None) -> dict:
    """Runs the tool; returns ``dict(out, layers, locations (N, 2), regular (N, P, 2),
    deformable (N, P, 2), weights (N, P))``, coordinates ``(x, y)`` in original-image pixels; with
    ``--roi``, :func:`run_roi`'s dict."""
    import cv2

    args = parse_args(argv)
    if args.levels < 1:
        raise ValueError(f"--levels must be >= 1, got {args.levels}")
    image_bgr = cv2.imread(args.image, cv2.IMREAD_COLOR)
    if image_bgr is None:
        raise FileNotFoundError(f"cannot read the image {args.image!r}")
    model, cfg = load_model(args.config, args.checkpoint, args.cfg_options)
    if args.roi:
        return run_roi(args, model, cfg, image_bgr)
    layers = deformable_layers(model)
    if not layers:
        raise ValueError(f"{args.config}: the model's backbone has no 2d deformable layer to trace (for "
                         "deformable RoI pooling, pass --roi)")

    data = prepare_inputs(cfg, args.image)
    with torch.no_grad(), record_inputs(layers) as records:
        data = model.data_preprocessor(data, False)
        samples = model(**data, mode="predict")
    levels = make_levels(layers, records, args.levels)
    image_size = tuple(data["inputs"].shape[-2:])
    scale_factor = samples[0].metainfo.get("scale_factor", (1.0, 1.0))

    if args.points is not None:
        points = parse_points(args.points)
    else:
        points = detection_centres(samples[0], args.topk)
        if len(points) == 0:
            h, w = image_bgr.shape[:2]
            points = np.array([[(w - 1) / 2, (h - 1) / 2]])
    start = original_to_input(points, scale_factor)
    # Points in the same output cell of the last layer trace the same sampling points: keep one.
    top = levels[-1]
    cells = nearest_location(image_to_grid(start, top.out_size, image_size), top.out_size)
    start = start[np.sort(np.unique(cells, axis=0, return_index=True)[1])]
    deformable, weights, starts = trace_sampling_points(levels, image_size, start, with_offsets=True)
    regular, _, _ = trace_sampling_points(levels, image_size, start, with_offsets=False)
    result = dict(
        out=args.out, layers=[level.name for level in levels],
        locations=input_to_original(starts, scale_factor),
        regular=input_to_original(regular, scale_factor),
        deformable=input_to_original(deformable, scale_factor), weights=weights,
    )
    draw(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB), result["locations"], result["regular"],
         result["deformable"], weights, result["layers"], args.out)
    n, p = deformable.shape[:2]
    print(f"{args.out}: {n} location(s) x {p} sampling points = {n * p} points, traced through "
          f"{len(levels)} deformable layer(s): {', '.join(result['layers'])}")
    return result


if __name__ == "__main__":
    main()
