"""mmengine registries of the ``dcn_plugin`` scope, children of mmengine's root registries.

``type='dcn_plugin.DCN'`` resolves from any OpenMMLab project's config, even without
``custom_imports``: on seeing the scope prefix, mmengine imports ``dcn_plugin.registry`` (this
module), which attaches these registries to the root ones, and the ``locations`` below are
imported on first use, which registers the layers (and, where the ``mmlab`` extra is installed,
the detector's models).

This module needs mmengine; ``dcn_plugin.ops`` does not import it.
"""

from ._extras import DETECTOR_MODULES, installed, require

require("dcn_plugin.registry", ["mmengine"])

from mmengine.registry import DATASETS as MMENGINE_DATASETS  # noqa: E402
from mmengine.registry import METRICS as MMENGINE_METRICS  # noqa: E402
from mmengine.registry import MODELS as MMENGINE_MODELS  # noqa: E402
from mmengine.registry import TRANSFORMS as MMENGINE_TRANSFORMS  # noqa: E402
from mmengine.registry import Registry  # noqa: E402

__all__ = ["MODELS", "DATASETS", "TRANSFORMS", "METRICS"]

# The detector's models need the mmlab extra; without it the scope still serves the layers (mmengine
# would fail on a location it cannot import).
_MODEL_LOCATIONS = ["dcn_plugin.layers"]
if all(installed(m) for m in DETECTOR_MODULES):
    _MODEL_LOCATIONS.append("dcn_plugin.models")

MODELS = Registry("model", parent=MMENGINE_MODELS, scope="dcn_plugin", locations=_MODEL_LOCATIONS)
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
