"""``CocoDataset``: a COCO-format detection dataset for mmengine's ``BaseDataset``.

Labels and categories. Label ``i`` is ``metainfo['classes'][i]`` and maps to the category of that
name in the JSON. Where the JSON's category names do not include the metainfo classes (a JSON of
other categories with the default COCO classes, e.g. the bundled shapes dataset), the classes are
the JSON's categories sorted by category id instead: label ``i`` is the ``i``-th category id in
ascending order. ``CocoMetric`` maps labels back to category ids by the same rule.

``metainfo`` carries, besides ``classes``, ``ann_file``: the absolute path (or URI) of the
annotation file, so that ``CocoMetric()`` without an ``ann_file`` of its own evaluates against
this dataset's ground truth (mmengine's loops set ``metric.dataset_meta = dataset.metainfo``).
Both are final once the annotations are loaded (``full_init``; at construction unless
``lazy_init=True``).
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Optional

from mmengine.dataset import BaseDataset
from mmengine.fileio import join_path, load
from mmengine.logging import print_log

from ..registry import DATASETS, TRANSFORMS
from ..structures import label_categories

__all__ = ["COCO_CLASSES", "CocoDataset"]

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


@DATASETS.register_module()
class CocoDataset(BaseDataset):
    """COCO-format detection dataset.

    Args:
        ann_file: the COCO JSON, relative to ``data_root`` unless absolute.
        metainfo: overrides of ``METAINFO``; ``classes`` given here must all be category names of
            the JSON (a subset selects those categories; the others become ignored boxes).
        data_root: root of ``ann_file`` and ``data_prefix``.
        data_prefix: ``dict(img='train2017/')``: folder of the images (``img_path`` is accepted
            as the key too).
        filter_cfg: ``dict(filter_empty_gt=True, min_size=32)``: outside ``test_mode``, drop the
            images without any non-ignored box and those whose shorter side is below
            ``min_size`` pixels.
        backend_args: mmengine file backend arguments for reading ``ann_file``.
        pipeline: transforms, or their configs: built from the ``dcn_plugin`` scope (bare names
            are this package's transforms, then mmcv's / mmengine's), unless a default scope is
            set (a Runner's ``default_scope``), which then rules as usual.
        Others as ``mmengine.dataset.BaseDataset``.

    Each data info: ``img_path``, ``img_id``, ``height``, ``width``, ``instances`` (dicts with
    ``bbox`` ``[x1, y1, x2, y2]`` float, ``bbox_label`` int and ``ignore_flag`` 0/1). A box is
    ignored (``ignore_flag=1``) if it is a crowd box, degenerate (``w < 1``, ``h < 1`` or
    ``area <= 0``), or of a category outside ``classes`` (then its ``bbox_label`` is -1).

    After loading: ``cat_ids`` (the category id of each label) and ``cat2label``.
    """

    METAINFO = dict(classes=COCO_CLASSES)

    def __init__(
        self,
        ann_file: str = "",
        metainfo: Optional[dict] = None,
        data_root: str = "",
        data_prefix: Optional[dict] = None,
        filter_cfg: Optional[dict] = None,
        indices: Any = None,
        serialize_data: bool = True,
        pipeline: Any = (),
        test_mode: bool = False,
        lazy_init: bool = False,
        max_refetch: int = 1000,
        backend_args: Optional[dict] = None,
    ) -> None:
        self.backend_args = backend_args
        self._user_classes = metainfo is not None and "classes" in metainfo
        self.cat_ids: list[int] = []
        self.cat2label: dict[int, int] = {}
        if filter_cfg is not None:
            unknown = set(filter_cfg) - {"filter_empty_gt", "min_size"}
            if unknown:
                raise ValueError(
                    f"filter_cfg has unknown keys {sorted(unknown)}; known: filter_empty_gt, min_size"
                )
        super().__init__(
            ann_file=ann_file,
            metainfo=metainfo,
            data_root=data_root,
            data_prefix=dict(img="") if data_prefix is None else data_prefix,
            filter_cfg=filter_cfg,
            indices=indices,
            serialize_data=serialize_data,
            pipeline=[TRANSFORMS.build(t) if isinstance(t, dict) else t for t in pipeline],
            test_mode=test_mode,
            lazy_init=lazy_init,
            max_refetch=max_refetch,
        )

    def _map_categories(self, categories: list[dict]) -> None:
        classes = tuple(self._metainfo.get("classes", ()))
        self.cat_ids, names, matched = label_categories(categories, classes)
        if not matched and self._user_classes:
            missing = [c for c in classes if c not in names]
            raise ValueError(f"metainfo classes {missing} are not categories of {self.ann_file}")
        if not matched:
            self._metainfo["classes"] = tuple(names)
            palette = self._metainfo.get("palette")
            if palette is not None and len(palette) != len(names):
                del self._metainfo["palette"]
            print_log(
                f"{type(self).__name__}: the categories of {self.ann_file} are not the default classes; "
                f"using them in category id order: {self._metainfo['classes']}",
                logger="current",
            )
        self.cat2label = {cat_id: label for label, cat_id in enumerate(self.cat_ids)}

    def load_data_list(self) -> list[dict]:
        coco = load(self.ann_file, file_format="json", backend_args=self.backend_args)
        for key in ("images", "annotations", "categories"):
            if key not in coco:
                raise ValueError(f"{self.ann_file} is not a COCO detection file: it has no '{key}'")
        self._map_categories(coco["categories"])
        is_uri = "://" in str(self.ann_file)
        self._metainfo["ann_file"] = str(self.ann_file) if is_uri else os.path.abspath(self.ann_file)

        anns_by_image: dict[Any, list[dict]] = defaultdict(list)
        for ann in coco["annotations"]:
            anns_by_image[ann["image_id"]].append(ann)
        return [
            self.parse_data_info(dict(raw_img_info=img, raw_ann_info=anns_by_image.get(img["id"], [])))
            for img in coco["images"]
        ]

    def parse_data_info(self, raw_data_info: dict) -> dict:
        img = raw_data_info["raw_img_info"]
        prefix = self.data_prefix.get("img", self.data_prefix.get("img_path", ""))
        instances = []
        for ann in raw_data_info["raw_ann_info"]:
            x, y, w, h = (float(v) for v in ann["bbox"])
            label = self.cat2label.get(ann["category_id"], -1)
            degenerate = w < 1 or h < 1 or float(ann.get("area", w * h)) <= 0
            ignore = bool(ann.get("iscrowd", 0)) or degenerate or label < 0
            instances.append(dict(bbox=[x, y, x + w, y + h], bbox_label=label, ignore_flag=int(ignore)))
        img_path = img["file_name"]
        if prefix:
            img_path = join_path(prefix, img_path, backend_args=self.backend_args)
        return dict(
            img_path=img_path,
            img_id=img["id"],
            height=img["height"],
            width=img["width"],
            instances=instances,
        )

    def filter_data(self) -> list[dict]:
        if self.test_mode or not self.filter_cfg:
            return self.data_list
        filter_empty_gt = self.filter_cfg.get("filter_empty_gt", False)
        min_size = self.filter_cfg.get("min_size", 0)
        return [
            info
            for info in self.data_list
            if min(info["width"], info["height"]) >= min_size
            and not (filter_empty_gt and all(inst["ignore_flag"] for inst in info["instances"]))
        ]

    def get_cat_ids(self, idx: int) -> list[int]:
        """The category ids of the (labelled) boxes of image ``idx``."""
        instances = self.get_data_info(idx)["instances"]
        return [self.cat_ids[i["bbox_label"]] for i in instances if i["bbox_label"] >= 0]
