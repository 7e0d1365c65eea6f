"""The detector as an ONNX model, and mmengine models that run one in onnxruntime or OpenVINO.

Exporting and running need the ``deploy`` extra (onnx, onnxscript, onnxruntime) on top of the
detector's ``mmlab`` extra; this module imports them only when used.

The exported graph is the whole detector after the data preprocessor: backbone, neck, head and
:meth:`~dcn_plugin.models.dense_heads.FCOSHead.detect` (decoding, clipping, rescaling, and NMS as
ONNX's standard ``NonMaxSuppression``):

- inputs: ``inputs`` (B, 3, H, W) float32, the data preprocessor's output (normalised, padded);
  ``img_shapes`` (B, 2) float32, each image's ``(h, w)`` inside the padding; ``scale_factors``
  (B, 2) float32, each image's ``(w_scale, h_scale)`` from its original;
- outputs: ``boxes`` (B, D, 4) in original-image pixels, ``scores`` (B, D), ``labels`` (B, D)
  int64, by decreasing score, with ``D = max_per_img``; rows past an image's detections have label
  -1 (``dcn_plugin.structures.instances_from_batch`` drops them).

The PyTorch model computes its predictions with the same ``detect``, so the two differ only by
the numerics of the network and of the NMS.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
from mmengine.model import BaseModel
from torch import Tensor, nn

from ..registry import MODELS
from ..structures import batch_geometry, instances_from_batch

__all__ = ["INPUT_NAMES", "OUTPUT_NAMES", "DetectorExport", "ExportedDetector", "ONNXRuntimeDetector",
           "OpenVINODetector", "export_detector", "nms_translation_table"]

INPUT_NAMES = ("inputs", "img_shapes", "scale_factors")
OUTPUT_NAMES = ("boxes", "scores", "labels")


class DetectorExport(nn.Module):
    """What the ONNX model computes: ``detector``'s features, head and ``bbox_head.detect``.

    ``forward(inputs (B, 3, H, W), img_shapes (B, 2), scale_factors (B, 2))`` returns ``boxes``
    (B, D, 4), ``scores`` (B, D), ``labels`` (B, D) as described in the module docstring.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        if not hasattr(getattr(detector, "bbox_head", None), "detect"):
            raise TypeError(f"DetectorExport: detector must have a bbox_head with a detect() method, got "
                            f"{type(detector).__name__}")
        self.detector = detector

    def forward(self, inputs: Tensor, img_shapes: Tensor,
                scale_factors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        head_outputs = self.detector(inputs, mode="tensor")
        return self.detector.bbox_head.detect(*head_outputs, img_shapes, scale_factors)


def nms_translation_table(opset_version: int) -> dict:
    """``{torch.ops.dcn_plugin.multiclass_nms.default: NonMaxSuppression}`` for ``torch.onnx.export``."""
    from ..export import onnxscript_opset

    op = onnxscript_opset(opset_version)

    def dcn_plugin_multiclass_nms(boxes, scores, max_per_class, iou_threshold, score_threshold):
        """boxes (B, N, 4), scores (B, C, N) -> (K, 3) int64 rows (image, class, box)."""
        return op.NonMaxSuppression(boxes, scores, op.Constant(value_ints=[int(max_per_class)]),
                                    op.Constant(value_floats=[float(iou_threshold)]),
                                    op.Constant(value_floats=[float(score_threshold)]), center_point_box=0)

    return {torch.ops.dcn_plugin.multiclass_nms.default: dcn_plugin_multiclass_nms}


def _dynamic_shapes(dynamic_batch: bool, dynamic_shape: bool):
    if not (dynamic_batch or dynamic_shape):
        return None
    batch = {0: torch.export.Dim("batch", min=1, max=1024)}
    image = dict(batch)
    if dynamic_shape:
        image.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
    return (image, batch, batch)


def export_detector(detector: nn.Module, inputs: Tensor, img_shapes: Tensor, scale_factors: Tensor,
                    path: str | None = None, *, opset_version: int | None = None, dynamic_batch: bool = False,
                    dynamic_shape: bool = False, external_data: bool = False):
    """Exports ``DetectorExport(detector)`` to ONNX; returns the ``torch.onnx.ONNXProgram``.

    Args:
        detector: a single-stage detector whose head has ``detect`` (put in eval mode here).
        inputs, img_shapes, scale_factors: example inputs, shapes as in the module docstring. With
            ``dynamic_batch`` the batch size must be at least 2 (torch.export specialises 1).
        path: where to save the model (None: only return the program).
        opset_version: ONNX opset (default: ``dcn_plugin.export.DEFAULT_OPSET``).
        dynamic_batch: any batch size; dynamic_shape: any batch size and input size too.
        external_data: write the weights to ``path + '.data'`` (needed past protobuf's 2 GB) instead
            of into the one file.
    """
    from ..export import DEFAULT_OPSET, export_onnx

    opset_version = DEFAULT_OPSET if opset_version is None else opset_version
    if (dynamic_batch or dynamic_shape) and inputs.shape[0] < 2:
        raise ValueError(f"export_detector: a dynamic batch needs an example batch of at least 2 images, got "
                         f"inputs of shape {tuple(inputs.shape)}")
    wrapper = DetectorExport(detector).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The three inputs share the batch axis; the exporter notes that it names it once.
        warnings.filterwarnings("ignore", message=r".*axis name: batch will not be used.*")
        return export_onnx(wrapper, (inputs, img_shapes, scale_factors), path, opset_version=opset_version,
                           custom_translation_table=nms_translation_table(opset_version),
                           dynamic_shapes=_dynamic_shapes(dynamic_batch, dynamic_shape),
                           input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                           external_data=external_data)


class ExportedDetector(BaseModel):
    """An exported detector run by a runtime behind mmengine's model interface, so that
    ``tools/test.py CONFIG MODEL.onnx`` evaluates it exactly as it evaluates the PyTorch model.

    ``forward(inputs, data_samples, mode='predict')`` sets ``pred_instances`` on the samples.
    A model exported with a fixed batch size is run on chunks of that size; the last chunk is
    padded to it with copies of its last image, whose detections are dropped. Subclasses load the
    file (setting ``input_names`` and ``input_shape``, ints where static) and run one chunk.
    """

    input_names: tuple
    input_shape: list

    def __init__(self, onnx_file: str, data_preprocessor: dict | nn.Module | None = None,
                 init_cfg=None) -> None:
        if isinstance(data_preprocessor, dict):
            data_preprocessor = MODELS.build(copy.deepcopy(data_preprocessor))
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.onnx_file = onnx_file

    def _check_inputs(self) -> None:
        if tuple(self.input_names) != INPUT_NAMES:
            raise ValueError(f"{type(self).__name__}: {self.onnx_file!r} has inputs "
                             f"{tuple(self.input_names)}, expected {INPUT_NAMES} (a model written by "
                             "tools/deploy/export_onnx.py)")

    def _run_chunk(self, feed: dict) -> list:
        """The outputs (numpy arrays, in OUTPUT_NAMES order) for one chunk of numpy inputs."""
        raise NotImplementedError

    def forward(self, inputs: Tensor, data_samples: Sequence | None = None, mode: str = "predict"):
        if mode != "predict" or data_samples is None:
            raise ValueError(f"{type(self).__name__}.forward: only mode='predict' with data_samples is "
                             f"supported, got mode={mode!r}")
        img_shapes, scale_factors = batch_geometry([s.metainfo for s in data_samples])
        detections = self.run(inputs, img_shapes, scale_factors)
        for sample, instances in zip(data_samples, instances_from_batch(*detections), strict=True):
            sample.pred_instances = instances
        return data_samples

    def run(self, inputs: Tensor, img_shapes: Tensor, scale_factors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The graph's ``boxes``, ``scores``, ``labels`` for a batch (shapes as in the module docstring)."""
        self._check_size(inputs)
        batch = self.input_shape[0] if isinstance(self.input_shape[0], int) else inputs.shape[0]
        chunks = []
        for start in range(0, inputs.shape[0], max(batch, 1)):
            chunk = [t[start:start + batch].detach().cpu().float()
                     for t in (inputs, img_shapes, scale_factors)]
            count = chunk[0].shape[0]
            if count < batch:  # the last chunk for a fixed-batch model: padded with its last image
                chunk = [torch.cat([t, t[-1:].expand(batch - count, *t.shape[1:])]) for t in chunk]
            feed = {name: t.numpy() for name, t in zip(INPUT_NAMES, chunk, strict=True)}
            chunks.append([torch.from_numpy(a)[:count] for a in self._run_chunk(feed)])
        return tuple(torch.cat(parts) for parts in zip(*chunks, strict=True))

    def _check_size(self, inputs: Tensor) -> None:
        for dim, name in ((2, "height"), (3, "width")):
            want = self.input_shape[dim]
            if isinstance(want, int) and inputs.shape[dim] != want:
                raise ValueError(f"{type(self).__name__}: {self.onnx_file!r} was exported for inputs of "
                                 f"{name} {want}, got a batch of shape {tuple(inputs.shape)}; export with "
                                 "--dynamic-shape for inputs of any size")


@MODELS.register_module()
class ONNXRuntimeDetector(ExportedDetector):
    """An exported detector run by onnxruntime (see :class:`ExportedDetector`).

    Args:
        onnx_file: the model written by :func:`export_detector` (``tools/deploy/export_onnx.py``).
        data_preprocessor: the config's data preprocessor (the graph starts after it).
        num_threads: onnxruntime's intra-op threads (None: its default).
    """

    def __init__(self, onnx_file: str, data_preprocessor: dict | nn.Module | None = None,
                 num_threads: int | None = None, init_cfg=None) -> None:
        super().__init__(onnx_file, data_preprocessor, init_cfg)
        from ..export import inference_session

        self.session = inference_session(onnx_file, num_threads)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self._check_inputs()
        self.input_shape = self.session.get_inputs()[0].shape  # ints where static

    def _run_chunk(self, feed: dict) -> list:
        return self.session.run(list(OUTPUT_NAMES), feed)


@MODELS.register_module()
class OpenVINODetector(ExportedDetector):
    """An exported detector run by OpenVINO on the CPU, in float32, its ``DeformConv`` nodes as
    OpenVINO's ``DeformableConvolution`` (:mod:`dcn_plugin.export.openvino`): the same ``.onnx``
    file as for onnxruntime.

    Args:
        onnx_file: the model written by :func:`export_detector` (``tools/deploy/export_onnx.py``).
        data_preprocessor: the config's data preprocessor (the graph starts after it).
        num_threads: OpenVINO's inference threads (None: its default).
    """

    def __init__(self, onnx_file: str, data_preprocessor: dict | nn.Module | None = None,
                 num_threads: int | None = None, init_cfg=None) -> None:
        super().__init__(onnx_file, data_preprocessor, init_cfg)
        from ..export.openvino import compile_model

        self.compiled = compile_model(onnx_file, num_threads)
        self.input_names = tuple(port.get_any_name() for port in self.compiled.inputs)
        self._check_inputs()
        self.input_shape = [dim.get_length() if dim.is_static else None
                            for dim in self.compiled.inputs[0].get_partial_shape()]
        self._outputs = [self.compiled.output(name) for name in OUTPUT_NAMES]

    def _run_chunk(self, feed: dict) -> list:
        result = self.compiled(feed)
        return [result[port] for port in self._outputs]
