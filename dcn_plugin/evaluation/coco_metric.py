"""``CocoMetric``: COCO box AP with pycocotools, as an mmengine metric (``METRICS``, scope
``dcn_plugin``).

Ground truth. ``CocoMetric(ann_file=...)`` evaluates against that COCO JSON. Without
``ann_file`` it uses ``dataset_meta['ann_file']``: mmengine's validation / test loops set
``metric.dataset_meta = dataset.metainfo``, and ``CocoDataset`` (so ``ShapesDataset``) puts the
absolute path of its annotation file there. So ``val_evaluator = dict(type='CocoMetric')`` works
for the bundled dataset, whose folder the config does not know, and COCO can name its file:
``dict(type='CocoMetric', ann_file='data/coco/annotations/instances_val2017.json')``.

Labels to categories, as ``CocoDataset``: where ``dataset_meta['classes']`` are all category
names of the ground truth, label ``i`` is the category named ``classes[i]``; otherwise (or
without ``dataset_meta``) label ``i`` is the ``i``-th category id in ascending order.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
from mmengine.evaluator import BaseMetric
from mmengine.fileio import get_local_path
from mmengine.logging import print_log

from ..registry import METRICS
from ..structures import label_categories

__all__ = ["CocoMetric"]

_SUMMARY_KEYS = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l")


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


@METRICS.register_module()
class CocoMetric(BaseMetric):
    """COCO bbox mAP of ``pred_instances`` (boxes in original-image pixels).

    Args:
        ann_file: COCO JSON of the ground truth; ``None``: ``dataset_meta['ann_file']`` (see the
            module docstring).
        metric: ``'bbox'`` (the only one supported).
        classwise: also log a per-class AP table and return ``bbox_{class}_precision`` (the AP
            of that class, -1.0 where the evaluated images hold none of it); on by default, so
            that a class that never learns shows in the log.
        format_only: only write the detections to ``{outfile_prefix}.bbox.json`` (e.g. for a
            test server) and return ``{}``.
        outfile_prefix: where to write the detections (also when evaluating); required with
            ``format_only``.
        collect_device, prefix: as ``mmengine.evaluator.BaseMetric`` (keys are ``coco/...``).
        backend_args: mmengine file backend arguments for reading ``ann_file``.

    Returns ``bbox_mAP``, ``bbox_mAP_50``, ``bbox_mAP_75``, ``bbox_mAP_s``, ``bbox_mAP_m`` and
    ``bbox_mAP_l`` (COCOeval's stats, rounded to 4 decimals; -1.0 where there is no ground truth
    in an area range). Only the processed images are evaluated (duplicates, e.g. padding of a
    distributed sampler, count once); an image without detections counts as such.
    """

    default_prefix: Optional[str] = "coco"

    def __init__(
        self,
        ann_file: Optional[str] = None,
        metric: str | Sequence[str] = "bbox",
        classwise: bool = True,
        format_only: bool = False,
        outfile_prefix: Optional[str] = None,
        collect_device: str = "cpu",
        prefix: Optional[str] = None,
        backend_args: Optional[dict] = None,
    ) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        metrics = [metric] if isinstance(metric, str) else list(metric)
        if metrics != ["bbox"]:
            raise ValueError(f"metric must be 'bbox' (the only one supported), got {metric!r}")
        if ann_file is not None and not isinstance(ann_file, (str, os.PathLike)):
            raise ValueError(f"ann_file must be a path or None, got {ann_file!r}")
        if format_only and not outfile_prefix:
            raise ValueError("format_only=True needs outfile_prefix: the detections are written to "
                             "{outfile_prefix}.bbox.json")
        self.ann_file = None if ann_file is None else os.fspath(ann_file)
        self.metric = "bbox"
        self.classwise = bool(classwise)
        self.format_only = bool(format_only)
        self.outfile_prefix = outfile_prefix
        self.backend_args = backend_args
        self._coco_cache: tuple[Optional[str], Any] = (None, None)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(ann_file={self.ann_file!r}, metric={self.metric!r}, "
                f"classwise={self.classwise}, format_only={self.format_only}, "
                f"outfile_prefix={self.outfile_prefix!r}, prefix={self.prefix!r})")

    # ---------------------------------------------------------------------------------------
    # Ground truth and categories.

    def _gt_file(self) -> str:
        if self.ann_file is not None:
            return self.ann_file
        meta_file = (self.dataset_meta or {}).get("ann_file")
        if not meta_file:
            raise ValueError(
                "CocoMetric has no ground truth: pass ann_file=..., or evaluate a dataset whose metainfo "
                "has 'ann_file' (CocoDataset and ShapesDataset put it there; mmengine's loops hand it "
                "over as metric.dataset_meta)"
            )
        return meta_file

    def _coco_gt(self) -> Any:
        from pycocotools.coco import COCO

        path = self._gt_file()
        if self._coco_cache[0] != path:
            with get_local_path(path, backend_args=self.backend_args) as local, \
                    contextlib.redirect_stdout(io.StringIO()):
                coco = COCO(local)
            self._coco_cache = (path, coco)
        return self._coco_cache[1]

    def _categories(self, coco: Any) -> tuple[list[int], list[str]]:
        """The category id and the name of each label."""
        categories = coco.loadCats(coco.getCatIds())
        classes = list((self.dataset_meta or {}).get("classes") or ())
        cat_ids, names, matched = label_categories(categories, classes)
        if not matched and classes and len(classes) != len(categories):
            print_log(
                f"CocoMetric: dataset_meta has {len(classes)} classes that are not the {len(categories)} "
                f"categories of {self._gt_file()}; mapping labels to the categories in id order",
                logger="current", level=logging.WARNING,
            )
        return cat_ids, names

    # ---------------------------------------------------------------------------------------
    # mmengine's metric interface.

    def process(self, data_batch: Any, data_samples: Sequence[Any]) -> None:
        for sample in data_samples:
            if not isinstance(sample, dict):
                sample = sample.to_dict()
            pred = sample["pred_instances"]
            if not isinstance(pred, dict):
                pred = pred.to_dict()
            bboxes = _to_numpy(pred["bboxes"]).astype(np.float64).reshape(-1, 4)
            self.results.append(dict(
                img_id=int(sample["img_id"]),
                bboxes=bboxes,
                scores=_to_numpy(pred["scores"]).astype(np.float64).reshape(-1),
                labels=_to_numpy(pred["labels"]).astype(np.int64).reshape(-1),
            ))

    def _detections(self, results: list[dict], cat_ids: list[int]) -> list[dict]:
        dets = []
        for res in results:
            labels = res["labels"]
            if labels.size and (labels.min() < 0 or labels.max() >= len(cat_ids)):
                raise ValueError(f"image {res['img_id']}: predicted labels {np.unique(labels).tolist()} "
                                 f"outside [0, {len(cat_ids)}), the classes of the ground truth")
            for (x1, y1, x2, y2), score, label in zip(res["bboxes"], res["scores"], labels):
                dets.append(dict(
                    image_id=res["img_id"],
                    bbox=[float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                    score=float(score),
                    category_id=int(cat_ids[label]),
                ))
        return dets

    def compute_metrics(self, results: list) -> dict[str, float]:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        unique: dict[int, dict] = {}
        for res in results:
            unique.setdefault(res["img_id"], res)
        results = list(unique.values())

        coco_gt = self._coco_gt()
        cat_ids, names = self._categories(coco_gt)
        dets = self._detections(results, cat_ids)

        if self.outfile_prefix:
            path = f"{self.outfile_prefix}.bbox.json"
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                json.dump(dets, f)
            print_log(f"CocoMetric: detections written to {path}", logger="current")
        if self.format_only:
            return {}

        img_ids = sorted(unique)
        missing = sorted(set(img_ids) - set(coco_gt.getImgIds()))
        if missing:
            raise ValueError(
                f"CocoMetric: image ids {missing[:10]} are not in the ground truth {self._gt_file()}"
            )
        if not img_ids:
            print_log("CocoMetric: no image was processed; returning -1.0", logger="current",
                      level=logging.WARNING)
            return {key: -1.0 for key in _SUMMARY_KEYS}

        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            if dets:
                coco_dt = coco_gt.loadRes(dets)
            else:  # loadRes fails on an empty list: an empty result set by hand
                coco_dt = COCO()
                coco_dt.dataset = dict(
                    images=coco_gt.dataset["images"], categories=coco_gt.dataset["categories"], annotations=[]
                )
                coco_dt.createIndex()
            coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
            coco_eval.params.catIds = cat_ids
            coco_eval.params.imgIds = img_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        lines = log.getvalue().splitlines()
        summary = "\n".join(line for line in lines if line.lstrip().startswith("Average"))
        print_log(f"CocoMetric (bbox, {len(img_ids)} images, {len(dets)} detections):\n{summary}",
                  logger="current")

        metrics = {key: round(float(v), 4) for key, v in zip(_SUMMARY_KEYS, coco_eval.stats[:6])}
        if self.classwise:
            metrics.update(self._classwise(coco_eval, names))
        return metrics

    @staticmethod
    def _classwise(coco_eval: Any, names: list[str]) -> dict[str, float]:
        # precision: [iou thresholds, recall thresholds, categories, area ranges, max dets]; the
        # categories in the order of params.catIds, i.e. of the labels.
        precision = coco_eval.eval["precision"]
        out, rows = {}, []
        for k, name in enumerate(names):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            ap = round(float(p.mean()), 4) if p.size else -1.0
            out[f"bbox_{name}_precision"] = ap
            rows.append((name, ap))
        width = max([len("category")] + [len(n) for n in names])
        lines = [f"{'category':<{width}}  AP", f"{'-' * width}  ------"]
        lines += [f"{name:<{width}}  {ap:.4f}" if ap >= 0 else f"{name:<{width}}  n/a" for name, ap in rows]
        print_log("CocoMetric per-class bbox AP:\n" + "\n".join(lines), logger="current")
        return out
