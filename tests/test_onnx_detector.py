"""The quick-start DCNv2 detector exported to ONNX and run in onnxruntime and OpenVINO.

- ``multiclass_nms`` (the op the detector's NMS goes through) against onnxruntime's
  ``NonMaxSuppression`` on a hand-built ONNX model: the standard op is the oracle;
- the exported detector (untrained, weights drawn so that it detects) against PyTorch on tiny
  images, and ``ONNXRuntimeDetector`` and ``OpenVINODetector`` against the model's own ``predict``
  (dynamic batch, and a fixed batch on a number of images that is not a multiple of it);
- ``tools/deploy/export_onnx.py --check`` and ``tools/test.py`` on the ``.onnx``: the same
  predictions and metrics as ``tools/test.py`` on the checkpoint.
"""

from __future__ import annotations

import os
import os.path as osp
import pickle
import re
import subprocess
import sys

import pytest
import torch
from extras import require_deploy, require_detector

require_detector()
require_deploy()

from mmengine.config import Config  # noqa: E402

import dcn_plugin.models  # noqa: E402,F401
from dcn_plugin.export import inference_session  # noqa: E402
from dcn_plugin.models.bbox import multiclass_nms  # noqa: E402
from dcn_plugin.models.deploy import (  # noqa: E402
    DetectorExport,
    ONNXRuntimeDetector,
    OpenVINODetector,
    export_detector,
)
from dcn_plugin.registry import MODELS  # noqa: E402
from dcn_plugin.structures import DetDataSample  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(ROOT, "configs", "quickstart", "fcos_r18-dcnv2-c3-c5_fpn_shapes.py")


def onnx_nms(boxes, scores, max_per_class, iou_threshold, score_threshold) -> set:
    """onnxruntime's NonMaxSuppression, on a model built by hand: rows (image, class, box)."""
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("boxes", "scores")]
    constants = [helper.make_tensor("max", TensorProto.INT64, [1], [max_per_class]),
                 helper.make_tensor("iou", TensorProto.FLOAT, [1], [iou_threshold]),
                 helper.make_tensor("score", TensorProto.FLOAT, [1], [score_threshold])]
    node = helper.make_node("NonMaxSuppression", ["boxes", "scores", "max", "iou", "score"], ["selected"])
    graph = helper.make_graph([node], "nms", inputs, [helper.make_tensor_value_info("selected",
                                                                                   TensorProto.INT64, None)],
                              initializer=constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    selected = inference_session(model.SerializeToString(), 1).run(
        None, {"boxes": boxes.numpy(), "scores": scores.numpy()})[0]
    return {tuple(row) for row in selected.tolist()}


@pytest.mark.parametrize("max_per_class", [3, 1000])
def test_multiclass_nms_is_onnx_non_max_suppression(max_per_class):
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(2, 60, 2, generator=g) * 40  # crowded: many overlaps
    sizes = torch.rand(2, 60, 2, generator=g) * 20 + 4
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], -1)
    scores = torch.rand(2, 3, 60, generator=g)
    kept = multiclass_nms(boxes, scores, max_per_class, 0.5, 0.3)
    rows = {tuple(row) for row in kept.tolist()}
    assert len(rows) == len(kept) >= min(2 * 3 * max_per_class, 30)
    assert rows == onnx_nms(boxes, scores, max_per_class, 0.5, 0.3)
    if max_per_class == 3:
        assert max(sum(1 for r in rows if r[:2] == key) for key in {r[:2] for r in rows}) == 3


def build_detector() -> torch.nn.Module:
    """The quick-start DCNv2 detector, untrained, with offsets of about a pixel and spread-out class
    scores, so that it makes a hundred well-separated detections per image."""
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(CONFIG).model)
    model.init_weights()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "conv_offset" in name:
                parameter.normal_(0.0, 0.02)
        model.bbox_head.conv_cls.weight.normal_(0.0, 0.2)
        model.bbox_head.conv_cls.bias.fill_(-1.0)
    return model.eval()


def example(batch: int, height: int = 64, width: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, 3, height, width, generator=g)
    img_shapes = torch.tensor([[height - 4.0 * i, width - 8.0 * i] for i in range(batch)])
    scale_factors = torch.tensor([[1.0 + 0.5 * i, 0.75 + 0.25 * i] for i in range(batch)])
    return inputs, img_shapes, scale_factors


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The detector exported with a dynamic batch for 64x64 inputs."""
    model = build_detector()
    path = str(tmp_path_factory.mktemp("onnx") / "detector.onnx")
    program = export_detector(model, *example(2), path, dynamic_batch=True)
    return model, path, [node.op_type for node in program.model_proto.graph.node]


def test_exported_detector_matches_pytorch(exported):
    model, path, op_types = exported
    assert op_types.count("DeformConv") == 12 and op_types.count("NonMaxSuppression") == 1
    session = inference_session(path, num_threads=1)
    inputs = example(3, seed=1)
    boxes, scores, labels = (torch.from_numpy(a) for a in session.run(
        None, {name: t.numpy() for name, t in zip(("inputs", "img_shapes", "scale_factors"), inputs)}))
    with torch.no_grad():
        want_boxes, want_scores, want_labels = DetectorExport(model)(*inputs)
    assert boxes.shape == (3, 100, 4) and scores.shape == labels.shape == (3, 100)
    assert (labels >= 0).all()  # a hundred detections per image
    assert torch.equal(labels, want_labels)
    assert (scores - want_scores).abs().max().item() <= 1e-5
    assert (boxes - want_boxes).abs().max().item() <= 1e-3  # pixels, boxes up to ~100 px


def samples_for(img_shapes, scale_factors):
    return [DetDataSample(metainfo=dict(img_shape=tuple(int(v) for v in shape), scale_factor=tuple(factor)))
            for shape, factor in zip(img_shapes.tolist(), scale_factors.tolist())]


@pytest.mark.parametrize("runtime", [ONNXRuntimeDetector, OpenVINODetector], ids=["onnxruntime", "openvino"])
@pytest.mark.parametrize("batch", [None, 2], ids=["dynamic-batch", "batch-2"])
def test_runtime_detector_predicts_like_the_model(exported, tmp_path, runtime, batch):
    """Both runtimes run the one exported file and detect as the model does: with a dynamic batch, and
    with a model exported for batches of 2 on 3 images (two chunks, the second padded, its padding
    dropped)."""
    model, path, _ = exported
    if batch is not None:
        path = str(tmp_path / "batch2.onnx")
        export_detector(model, *example(batch), path)
    detector = runtime(path, data_preprocessor=Config.fromfile(CONFIG).model.data_preprocessor, num_threads=1)
    static_batch = detector.input_shape[0] if isinstance(detector.input_shape[0], int) else None
    assert static_batch == batch
    inputs, img_shapes, scale_factors = example(3, seed=2)
    got = detector(inputs, samples_for(img_shapes, scale_factors))
    with torch.no_grad():
        want = model(inputs, samples_for(img_shapes, scale_factors), mode="predict")
    assert len(got) == 3
    for a, b in zip(got, want, strict=True):
        a, b = a.pred_instances, b.pred_instances
        assert len(a) == len(b) > 50 and torch.equal(a.labels, b.labels)
        torch.testing.assert_close(a.bboxes, b.bboxes, rtol=0, atol=1e-3)
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="exported for inputs of height 64, got a batch of shape"):
        detector(torch.zeros(1, 3, 96, 64), samples_for(img_shapes[:1], scale_factors[:1]))
    with pytest.raises(ValueError, match="only mode='predict'"):
        detector(inputs, None, mode="loss")


def test_dynamic_batch_needs_two_example_images():
    with pytest.raises(ValueError, match="at least 2 images"):
        export_detector(build_detector(), *example(1), dynamic_batch=True)


# --------------------------------------------------------------------------------------------------
# The tools, end to end on a tiny copy of the bundled data (64x64 images, resized to 128: boxes are
# rescaled by 0.5).

TINY = []
for _split in ("val_dataloader", "test_dataloader"):
    TINY += [f"{_split}.num_workers=0", f"{_split}.persistent_workers=False", f"{_split}.batch_size=2",
             f"{_split}.dataset.num_train=8", f"{_split}.dataset.num_val=6",
             f"{_split}.dataset.image_size=64"]


def run(args, tmp_path) -> str:
    env = dict(os.environ, DCN_PLUGIN_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def test_export_tool_check_and_test_py_on_the_onnx_model(tmp_path):
    checkpoint = tmp_path / "detector.pth"
    torch.save({"state_dict": build_detector().state_dict(), "meta": {}}, checkpoint)
    onnx_file = tmp_path / "detector.onnx"
    out = run(["tools/deploy/export_onnx.py", CONFIG, str(checkpoint), "--out", str(onnx_file),
               "--dynamic-shape", "--check", "--num-images", "4", "--batch-size", "2", "--threads", "1",
               "--cfg-options", *TINY], tmp_path)
    assert re.search(r"wrote .*detector\.onnx .*dynamic: batch, height, width\): DeformConv x12, Conv x\d+, "
                     r"NonMaxSuppression x1", out), out
    detections = re.search(r"check on 4 test images \((\d+) PyTorch detections\)", out)
    assert detections and int(detections[1]) >= 4 * 50, out
    for runtime in ("onnxruntime", "openvino"):
        check = re.search(rf"{runtime}: largest difference: boxes (\S+) px, scores (\S+); images with "
                          r"different detection counts: 0", out)
        assert check and float(check[1]) <= 1e-3 and float(check[2]) <= 1e-5, out
    assert re.search(r"latency per image: PyTorch eager [\d.]+ ms, onnxruntime [\d.]+ ms \([\d.]+x\), "
                     r"openvino [\d.]+ ms", out), out
    assert not osp.exists(f"{onnx_file}.data")  # one self-contained file

    metrics, predictions = {}, {}
    backends = ["pytorch", "onnxruntime", "openvino"]
    for name in backends:
        model = checkpoint if name == "pytorch" else onnx_file
        log = run(["tools/test.py", CONFIG, str(model), "--backend", name, "--work-dir", str(tmp_path / name),
                   "--out", str(tmp_path / f"{name}.pkl"), "--cfg-options", *TINY], tmp_path)
        metrics[name] = re.search(r"coco/bbox_mAP: (\S+)\s+coco/bbox_mAP_50: (\S+)", log).groups()
        with open(tmp_path / f"{name}.pkl", "rb") as f:
            predictions[name] = pickle.load(f)
    for name in backends[1:]:
        assert metrics[name] == metrics["pytorch"], name
        assert len(predictions[name]) == len(predictions["pytorch"]) == 6
        for a, b in zip(predictions["pytorch"], predictions[name], strict=True):
            a, b = a["pred_instances"], b["pred_instances"]
            assert a["bboxes"].max() <= 64  # in the pixels of the 64x64 originals
            assert torch.equal(a["labels"], b["labels"]) and len(a["labels"]) > 50, name
            torch.testing.assert_close(a["bboxes"], b["bboxes"], rtol=0, atol=1e-3, msg=name)
            torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-5, msg=name)
