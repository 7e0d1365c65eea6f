"""mmengine registries of the ``dcn_plugin`` scope, children of mmengine's root registries.

``type='dcn_plugin.DCN'`` resolves from any OpenMMLab project's config, even without
``custom_imports``: on seeing the scope prefix, mmengine imports ``dcn_plugin.registry`` (this
module), which attaches these registries to the root ones, and the ``locations`` below are
imported on first use, which registers the layers.

This module needs mmengine; ``dcn_plugin`` and ``dcn_plugin.ops`` do not import it.
"""

from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import TRANSFORMS as MMENGINE_TRANSFORMS
from mmengine.registry import Registry

__all__ = ["MODELS", "DATASETS", "TRANSFORMS", "METRICS"]

MODELS = Registry("model", parent=MMENGINE_MODELS, scope="dcn_plugin", locations=["dcn_plugin.models"])
# Add the datasets / transforms / evaluation packages to ``locations`` when they exist: mmengine
# imports every location on first use and fails on a missing one.
DATASETS = Registry("dataset", parent=MMENGINE_DATASETS, scope="dcn_plugin", locations=[])
TRANSFORMS = Registry("transform", parent=MMENGINE_TRANSFORMS, scope="dcn_plugin", locations=[])
METRICS = Registry("metric", parent=MMENGINE_METRICS, scope="dcn_plugin", locations=[])
