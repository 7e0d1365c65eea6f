"""Batches a detector's inputs: normalise, BGR->RGB, pad to a multiple of the network stride."""

from __future__ import annotations

import math

from mmengine.model import ImgDataPreprocessor

from ..registry import MODELS

__all__ = ["DetDataPreprocessor"]


@MODELS.register_module()
class DetDataPreprocessor(ImgDataPreprocessor):
    """mmengine's image preprocessor that also records the batch geometry in the data samples.

    Input: ``dict(inputs=[(3, H_i, W_i) uint8 tensors], data_samples=[DetDataSample])``.
    Output: ``dict(inputs=(B, 3, H, W) float tensor, data_samples=...)`` where H, W are the largest
    image size rounded up to ``pad_size_divisor``. Each sample gets ``batch_input_shape`` (H, W) and,
    as mmdet's, ``pad_shape``: its own image's size rounded up to ``pad_size_divisor`` (the RPN's
    anchors beyond it are not trained).
    """

    def _pad_shapes(self, inputs) -> list[tuple[int, int]]:
        def rounded(size: int) -> int:
            return math.ceil(size / self.pad_size_divisor) * self.pad_size_divisor

        shapes = [tuple(image.shape[-2:]) for image in inputs]  # a list of images or a (B, 3, H, W) tensor
        return [(rounded(h), rounded(w)) for h, w in shapes]

    def forward(self, data: dict, training: bool = False) -> dict:
        pad_shapes = self._pad_shapes(data["inputs"])
        data = super().forward(data, training)
        inputs, samples = data["inputs"], data["data_samples"]
        if samples is not None:
            batch_input_shape = tuple(inputs.shape[-2:])
            for sample, pad_shape in zip(samples, pad_shapes, strict=True):
                sample.set_metainfo(dict(batch_input_shape=batch_input_shape, pad_shape=pad_shape))
        return data
