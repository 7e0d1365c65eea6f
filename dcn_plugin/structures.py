"""Per-image data records passed between the dataset, the detector and the metric (mmdet's layout).

A ``DetDataSample`` carries one image's metainfo and up to three ``InstanceData`` fields:

- ``gt_instances``: ``bboxes`` (N, 4) float32 ``x1, y1, x2, y2`` in the pixels of the network
  input (after resize/flip), ``labels`` (N,) int64 in ``[0, num_classes)``;
- ``ignored_instances``: same fields, crowd / ignored boxes;
- ``pred_instances``: ``bboxes`` (M, 4) in the pixels of the *original* image, ``scores`` (M,),
  ``labels`` (M,).

Metainfo keys: ``img_id``, ``img_path``, ``ori_shape`` (h, w), ``img_shape`` (h, w) after resize,
``scale_factor`` (w_scale, h_scale), ``flip``, ``flip_direction``, and, set by the data
preprocessor, ``pad_shape`` and ``batch_input_shape`` (h, w).
"""

from __future__ import annotations

from mmengine.structures import BaseDataElement, InstanceData

__all__ = ["DetDataSample", "InstanceData"]


class DetDataSample(BaseDataElement):
    """One image's metainfo, ground truth and predictions."""

    @property
    def gt_instances(self) -> InstanceData:
        return self._gt_instances

    @gt_instances.setter
    def gt_instances(self, value: InstanceData) -> None:
        self.set_field(value, "_gt_instances", dtype=InstanceData)

    @gt_instances.deleter
    def gt_instances(self) -> None:
        del self._gt_instances

    @property
    def ignored_instances(self) -> InstanceData:
        return self._ignored_instances

    @ignored_instances.setter
    def ignored_instances(self, value: InstanceData) -> None:
        self.set_field(value, "_ignored_instances", dtype=InstanceData)

    @ignored_instances.deleter
    def ignored_instances(self) -> None:
        del self._ignored_instances

    @property
    def pred_instances(self) -> InstanceData:
        return self._pred_instances

    @pred_instances.setter
    def pred_instances(self, value: InstanceData) -> None:
        self.set_field(value, "_pred_instances", dtype=InstanceData)

    @pred_instances.deleter
    def pred_instances(self) -> None:
        del self._pred_instances
