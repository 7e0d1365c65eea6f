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

``label_categories`` is the one rule, shared by ``CocoDataset`` and ``CocoMetric``, that maps
labels to COCO categories.
"""

from __future__ import annotations

from collections.abc import Sequence

from mmengine.structures import BaseDataElement, InstanceData

__all__ = ["DetDataSample", "InstanceData", "label_categories"]


def label_categories(categories: Sequence[dict], classes: Sequence[str]) -> tuple[list[int], list[str], bool]:
    """The COCO category id and name of each label.

    Where ``classes`` are all category names, label ``i`` is the category named ``classes[i]``
    (the first by id, where names repeat) and ``matched`` is True. Otherwise label ``i`` is the
    ``i``-th category in ascending id order and ``matched`` is False.

    Returns:
        ``(cat_ids, names, matched)``.
    """
    ordered = sorted(categories, key=lambda c: c["id"])
    name2id: dict[str, int] = {}
    for cat in ordered:
        name2id.setdefault(cat["name"], cat["id"])
    if classes and all(c in name2id for c in classes):
        return [name2id[c] for c in classes], list(classes), True
    return [c["id"] for c in ordered], [c["name"] for c in ordered], False


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
