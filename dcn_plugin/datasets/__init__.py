"""Detection datasets and transforms (mmengine ``DATASETS`` / ``TRANSFORMS``, ``dcn_plugin`` scope).

- ``CocoDataset``: any COCO-format JSON; ``ShapesDataset``: the bundled synthetic dataset of
  deformed shapes, generated on first use (``generate_shapes``, ``shapes_root``).
- Transforms: ``LoadImageFromFile``, ``LoadAnnotations``, ``Resize``, ``RandomFlip``,
  ``PackDetInputs``.

Needs the ``mmlab`` extra (mmcv, OpenCV, pycocotools).
"""

from .._extras import DETECTOR_MODULES, require

require("dcn_plugin.datasets", DETECTOR_MODULES, extra="mmlab")

from .coco import COCO_CLASSES, CocoDataset  # noqa: E402
from .shapes import ShapesDataset, generate_shapes, make_image, object_mask, shapes_root  # noqa: E402
from .transforms import LoadAnnotations, LoadImageFromFile, PackDetInputs, RandomFlip, Resize  # noqa: E402

__all__ = [
    "COCO_CLASSES",
    "CocoDataset",
    "ShapesDataset",
    "generate_shapes",
    "make_image",
    "object_mask",
    "shapes_root",
    "LoadAnnotations",
    "LoadImageFromFile",
    "PackDetInputs",
    "RandomFlip",
    "Resize",
]
