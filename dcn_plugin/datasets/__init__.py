"""Detection datasets and transforms (mmengine ``DATASETS`` / ``TRANSFORMS``, ``dcn_plugin`` scope).

- ``CocoDataset``: any COCO-format JSON; ``ShapesDataset``: the bundled synthetic dataset of
  deformed shapes, generated on first use (``generate_shapes``, ``shapes_root``).
- Transforms: ``LoadImageFromFile``, ``LoadAnnotations``, ``Resize``, ``RandomFlip``,
  ``PackDetInputs``.

Needs mmengine and opencv-python (``cv2``).
"""

from .coco import COCO_CLASSES, CocoDataset
from .shapes import ShapesDataset, generate_shapes, make_image, object_mask, shapes_root
from .transforms import LoadAnnotations, LoadImageFromFile, PackDetInputs, RandomFlip, Resize

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
