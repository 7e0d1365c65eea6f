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
# Transforms live in the datasets package.
DATASETS = Registry(
    "dataset", parent=MMENGINE_DATASETS, scope="dcn_plugin", locations=["dcn_plugin.datasets"]
)
TRANSFORMS = Registry(
    "transform", parent=MMENGINE_TRANSFORMS, scope="dcn_plugin", locations=["dcn_plugin.datasets"]
)
METRICS = Registry(
    "metric", parent=MMENGINE_METRICS, scope="dcn_plugin", locations=["dcn_plugin.evaluation"]
)
