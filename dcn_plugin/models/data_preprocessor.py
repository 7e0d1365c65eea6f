"""Batches a detector's inputs: normalise, BGR->RGB, pad to a multiple of the network stride."""

from __future__ import annotations

from mmengine.model import ImgDataPreprocessor

from ..registry import MODELS

__all__ = ["DetDataPreprocessor"]


@MODELS.register_module()
class DetDataPreprocessor(ImgDataPreprocessor):
    """mmengine's image preprocessor that also records the batch geometry in the data samples.

    Input: ``dict(inputs=[(3, H_i, W_i) uint8 tensors], data_samples=[DetDataSample])``.
    Output: ``dict(inputs=(B, 3, H, W) float tensor, data_samples=...)`` where H, W are the largest
    image size rounded up to ``pad_size_divisor``; each sample gets ``batch_input_shape`` (H, W)
    and ``pad_shape``.
    """

    def forward(self, data: dict, training: bool = False) -> dict:
        data = super().forward(data, training)
        inputs, samples = data["inputs"], data["data_samples"]
        if samples is not None:
            batch_input_shape = tuple(inputs.shape[-2:])
            for sample in samples:
                sample.set_metainfo(dict(batch_input_shape=batch_input_shape, pad_shape=batch_input_shape))
        return data
