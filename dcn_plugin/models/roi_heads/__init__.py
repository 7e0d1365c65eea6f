"""Second stages of two-stage detectors: RoI extractors, box heads, RoI heads."""

from .bbox_heads import BBoxHead, PSRoIBBoxHead, Shared2FCBBoxHead
from .roi_extractors import RoIAlign, SingleRoIExtractor, build_roi_layer
from .standard_roi_head import RFCNRoIHead, StandardRoIHead, bbox2roi

__all__ = ["BBoxHead", "PSRoIBBoxHead", "Shared2FCBBoxHead", "RoIAlign", "SingleRoIExtractor",
           "build_roi_layer", "RFCNRoIHead", "StandardRoIHead", "bbox2roi"]
