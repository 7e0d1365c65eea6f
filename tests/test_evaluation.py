"""CocoMetric against hand-written ground truth with known answers."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from extras import require_detector  # noqa: E402

require_detector()

from mmengine.evaluator import Evaluator  # noqa: E402

from dcn_plugin.evaluation import CocoMetric, coco_metric  # noqa: E402
from dcn_plugin.registry import METRICS  # noqa: E402
from dcn_plugin.structures import DetDataSample, InstanceData  # noqa: E402

# Three images (ids not contiguous), three categories (ids 1, 2, 4: label i <-> i-th id), boxes of
# every COCO area range: small (< 32^2), medium, large (> 96^2); the boxes are far apart.
CATEGORIES = [dict(id=1, name="a"), dict(id=2, name="b"), dict(id=4, name="c")]
GT = {
    1: [(1, [10, 10, 20, 20]), (2, [100, 100, 50, 40]), (4, [40, 200, 120, 100])],
    2: [(4, [5, 5, 16, 12]), (4, [150, 10, 60, 80]), (1, [20, 150, 110, 110])],
    5: [(2, [30, 30, 40, 60])],
}
SUMMARY = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l")
PER_CLASS = ("bbox_a_precision", "bbox_b_precision", "bbox_c_precision")
LABEL = {1: 0, 2: 1, 4: 2}


def _all(value):
    """Every key the metric returns by default (summary and per-class AP), all equal to ``value``."""
    return {f"coco/{k}": value for k in SUMMARY + PER_CLASS}


@pytest.fixture(scope="module")
def gt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("coco") / "gt.json"
    images = [dict(id=i, file_name=f"{i}.png", height=320, width=320) for i in GT]
    anns = []
    for img_id, boxes in GT.items():
        for cat, (x, y, w, h) in boxes:
            anns.append(dict(id=len(anns) + 1, image_id=img_id, category_id=cat, bbox=[x, y, w, h],
                             area=w * h, iscrowd=0))
    path.write_text(json.dumps(dict(images=images, annotations=anns, categories=CATEGORIES)))
    return str(path)


def _sample(img_id, boxes, labels, scores=None):
    """A prediction as mmengine's Evaluator hands it to the metric (``DetDataSample.to_dict()``)."""
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor(labels, dtype=torch.int64).reshape(-1)
    scores = torch.ones(len(labels)) if scores is None else torch.tensor(scores, dtype=torch.float32)
    pred = dict(bboxes=boxes, scores=scores, labels=labels)
    return dict(img_id=img_id, ori_shape=(320, 320), pred_instances=pred)


def _predictions(shift=0.0, relabel=lambda label: label, img_ids=tuple(GT)):
    """The ground truth as predictions, boxes moved right by ``shift`` times their width."""
    out = []
    for img_id in img_ids:
        boxes = [[x + shift * w, y, x + shift * w + w, y + h] for _, (x, y, w, h) in GT[img_id]]
        out.append(_sample(img_id, boxes, [relabel(LABEL[cat]) for cat, _ in GT[img_id]]))
    return out


def _evaluate(metric, samples, chunks=1):
    for chunk in np.array_split(np.arange(len(samples)), chunks):
        metric.process({}, [samples[i] for i in chunk])
    return metric.evaluate(len(samples))


def test_perfect_prediction_scores_one(gt_file):
    result = _evaluate(CocoMetric(ann_file=gt_file), _predictions())
    assert result == _all(1.0)


def test_empty_prediction_scores_zero(gt_file):
    samples = [_sample(img_id, [], []) for img_id in GT]
    assert _evaluate(CocoMetric(ann_file=gt_file), samples) == _all(0.0)


def test_wrong_labels_score_zero(gt_file):
    result = _evaluate(CocoMetric(ann_file=gt_file), _predictions(relabel=lambda label: (label + 1) % 3))
    assert result == _all(0.0)


def test_a_class_never_predicted_shows_in_the_per_class_ap(gt_file, monkeypatch):
    logged = []
    monkeypatch.setattr(coco_metric, "print_log", lambda msg, **kwargs: logged.append(msg))
    samples = _predictions()
    for sample in samples:  # drop every detection of class 'c' (label 2)
        pred = sample["pred_instances"]
        keep = pred["labels"] != 2
        sample["pred_instances"] = {k: v[keep] for k, v in pred.items()}
    result = _evaluate(CocoMetric(ann_file=gt_file), samples)
    assert (result["coco/bbox_a_precision"], result["coco/bbox_b_precision"]) == (1.0, 1.0)
    assert result["coco/bbox_c_precision"] == 0.0
    log = "\n".join(logged)
    assert "per-class bbox AP" in log and re.search(r"\bc\s+0\.0000", log), log
    assert set(_evaluate(CocoMetric(ann_file=gt_file, classwise=False), _predictions())) == {
        f"coco/{k}" for k in SUMMARY}


def test_shifted_boxes(gt_file):
    # Moving a w x h box right by 0.2 w: IoU = 0.8 w h / (1.2 w h) = 2/3, a match at the IoU
    # thresholds 0.5, 0.55, 0.6 and 0.65 and not at 0.7 .. 0.95: AP50 1, AP75 0, mAP 4 / 10.
    result = _evaluate(CocoMetric(ann_file=gt_file, prefix="x"), _predictions(shift=0.2))
    assert result["x/bbox_mAP_50"] == 1.0
    assert result["x/bbox_mAP_75"] == 0.0
    assert result["x/bbox_mAP"] == 0.4


def test_same_result_over_several_process_calls(gt_file):
    samples = _predictions(shift=0.2) + _predictions(relabel=lambda label: 2 - label)[:1]
    samples[-1]["img_id"] = 1  # a duplicate of image 1 (as a padding sampler makes): counted once
    one = _evaluate(CocoMetric(ann_file=gt_file), samples[:3])
    assert _evaluate(CocoMetric(ann_file=gt_file), samples[:3], chunks=3) == one
    assert _evaluate(CocoMetric(ann_file=gt_file), samples, chunks=2) == one


def test_only_processed_images_are_evaluated(gt_file):
    # Image 5 (one medium box) is not processed: it does not count as a miss.
    result = _evaluate(CocoMetric(ann_file=gt_file), _predictions(img_ids=(1, 2)))
    assert result["coco/bbox_mAP"] == 1.0
    # Processed without detections, it does.
    samples = _predictions(img_ids=(1, 2)) + [_sample(5, [], [])]
    assert _evaluate(CocoMetric(ann_file=gt_file), samples)["coco/bbox_mAP"] < 1.0


def test_area_range_without_ground_truth_is_minus_one(gt_file):
    result = _evaluate(CocoMetric(ann_file=gt_file), _predictions(img_ids=(5,)))
    assert result["coco/bbox_mAP_m"] == 1.0
    assert result["coco/bbox_mAP_s"] == -1.0 and result["coco/bbox_mAP_l"] == -1.0


def test_through_mmengine_evaluator_with_data_samples(gt_file):
    evaluator = Evaluator([dict(type="dcn_plugin.CocoMetric", ann_file=gt_file, classwise=True)])
    samples = []
    for pred in _predictions():
        sample = DetDataSample(metainfo=dict(img_id=pred["img_id"], ori_shape=(320, 320)))
        sample.pred_instances = InstanceData(**pred["pred_instances"])
        samples.append(sample)
    evaluator.process(samples[:2])
    evaluator.process(samples[2:])
    result = evaluator.evaluate(len(samples))
    assert result["coco/bbox_mAP"] == 1.0
    for name in ("a", "b", "c"):
        assert result[f"coco/bbox_{name}_precision"] == 1.0


def test_ground_truth_and_classes_from_dataset_meta(gt_file):
    with pytest.raises(ValueError, match="ann_file"):
        _evaluate(METRICS.build(dict(type="CocoMetric")), _predictions())
    # Classes named in dataset_meta map by name: label 0 is 'c' (category 4), and so on.
    metric = METRICS.build(dict(type="CocoMetric"))
    order = ("c", "a", "b")
    metric.dataset_meta = dict(classes=order, ann_file=gt_file)
    name_of = {1: "a", 2: "b", 4: "c"}

    def relabel(label):
        return order.index(name_of[[1, 2, 4][label]])

    assert _evaluate(metric, _predictions(relabel=relabel))["coco/bbox_mAP"] == 1.0
    assert _evaluate(metric, _predictions())["coco/bbox_mAP"] == 0.0


def test_format_only_writes_json(gt_file, tmp_path):
    prefix = str(tmp_path / "out" / "results")
    metric = CocoMetric(ann_file=gt_file, format_only=True, outfile_prefix=prefix)
    samples = _predictions(shift=0.2)
    samples[0]["pred_instances"]["scores"] = torch.tensor([0.5, 0.25, 0.125])
    assert _evaluate(metric, samples) == {}
    with open(prefix + ".bbox.json") as f:
        dets = json.load(f)
    assert len(dets) == sum(len(v) for v in GT.values())
    first = dets[0]
    assert first == dict(image_id=1, bbox=[14.0, 10.0, 20.0, 20.0], score=0.5, category_id=1)
    assert {d["category_id"] for d in dets} == {1, 2, 4}
    from pycocotools.coco import COCO

    assert len(COCO(gt_file).loadRes(prefix + ".bbox.json").getAnnIds()) == len(dets)


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(metric="segm"), "metric"), (dict(metric=["bbox", "proposal"]), "metric"),
     (dict(format_only=True), "outfile_prefix"), (dict(ann_file=3), "ann_file")],
)
def test_bad_args(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CocoMetric(**kwargs)


def test_bad_predictions_raise(gt_file):
    with pytest.raises(ValueError, match="not in the ground truth"):
        _evaluate(CocoMetric(ann_file=gt_file), [_sample(99, [[0, 0, 1, 1]], [0])])
    with pytest.raises(ValueError, match="outside"):
        _evaluate(CocoMetric(ann_file=gt_file), [_sample(1, [[0, 0, 1, 1]], [3])])


def test_shapes_dataset_ground_truth_end_to_end(tmp_path):
    """``CocoMetric()`` finds the bundled dataset's ground truth through its metainfo."""
    from dcn_plugin.datasets import ShapesDataset

    ds = ShapesDataset(data_root=str(tmp_path / "shapes"), split="val", num_train=1, num_val=5, image_size=64)
    evaluator = Evaluator([dict(type="dcn_plugin.CocoMetric")])
    evaluator.dataset_meta = ds.metainfo
    samples = []
    for idx in range(len(ds)):
        info = ds.get_data_info(idx)
        sample = DetDataSample(metainfo=dict(img_id=info["img_id"], ori_shape=(64, 64)))
        sample.pred_instances = InstanceData(
            bboxes=torch.tensor([i["bbox"] for i in info["instances"]]),
            scores=torch.ones(len(info["instances"])),
            labels=torch.tensor([i["bbox_label"] for i in info["instances"]]),
        )
        samples.append(sample)
    evaluator.process(samples)
    result = evaluator.evaluate(len(samples))
    assert result["coco/bbox_mAP"] == 1.0 and result["coco/bbox_mAP_50"] == 1.0


def test_runner_val_loop_hands_the_ground_truth_over(tmp_path):
    """``val_evaluator=dict(type='CocoMetric')`` in mmengine's Runner: the ValLoop sets the metric's
    ``dataset_meta`` from the dataset, which names the annotation file."""
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Oracle(BaseModel):
        """Predicts the ground truth, mapped back to the original image."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, inputs, data_samples=None, mode="tensor"):
            for sample in data_samples:
                w_scale, h_scale = sample.scale_factor
                boxes = sample.gt_instances.bboxes / torch.tensor([w_scale, h_scale, w_scale, h_scale])
                sample.pred_instances = InstanceData(
                    bboxes=boxes, scores=torch.ones(len(boxes)), labels=sample.gt_instances.labels
                )
            return data_samples

    pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations"),
        dict(type="Resize", scale=(100, 100), keep_ratio=True),
        dict(type="PackDetInputs"),
    ]
    dataset = dict(
        type="ShapesDataset", data_root=str(tmp_path / "shapes"), split="val", num_train=1, num_val=6,
        image_size=64, pipeline=pipeline, test_mode=True,
    )
    runner = Runner(
        model=Oracle(),
        work_dir=str(tmp_path / "work"),
        default_scope="dcn_plugin",
        val_dataloader=dict(
            batch_size=4, num_workers=0, dataset=dataset, collate_fn=dict(type="pseudo_collate"),
            sampler=dict(type="DefaultSampler", shuffle=False),
        ),
        val_cfg=dict(),
        val_evaluator=dict(type="CocoMetric"),
    )
    result = runner.val()
    assert result["coco/bbox_mAP"] == 1.0
