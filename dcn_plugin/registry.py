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

from mmengine import registry as _root  # noqa: E402
from mmengine.registry import Registry  # noqa: E402

__all__ = [
    "RUNNERS", "RUNNER_CONSTRUCTORS", "LOOPS", "HOOKS", "STRATEGIES", "DATASETS", "DATA_SAMPLERS",
    "TRANSFORMS", "MODELS", "MODEL_WRAPPERS", "WEIGHT_INITIALIZERS", "OPTIMIZERS", "OPTIM_WRAPPERS",
    "OPTIM_WRAPPER_CONSTRUCTORS", "PARAM_SCHEDULERS", "METRICS", "EVALUATOR", "TASK_UTILS",
    "VISUALIZERS", "VISBACKENDS", "LOG_PROCESSORS", "INFERENCERS", "FUNCTIONS",
]

# The detector's models need the mmlab extra; without it the scope still serves the layers (mmengine
# would fail on a location it cannot import).
_MODEL_LOCATIONS = ["dcn_plugin.layers"]
if all(installed(m) for m in DETECTOR_MODULES):
    _MODEL_LOCATIONS.append("dcn_plugin.models")


def _child(name: str, root: Registry, locations=()) -> Registry:
    return Registry(name, parent=root, scope="dcn_plugin", locations=list(locations))


# One child of each of mmengine's root registries, as mmdetection's registry module has: with
# ``default_scope='dcn_plugin'`` the runner looks each of them up in this scope, and finds mmengine's
# hooks, loops, optimizers... through the parent.
RUNNERS = _child("runner", _root.RUNNERS)
RUNNER_CONSTRUCTORS = _child("runner constructor", _root.RUNNER_CONSTRUCTORS)
LOOPS = _child("loop", _root.LOOPS)
HOOKS = _child("hook", _root.HOOKS)
STRATEGIES = _child("strategy", _root.STRATEGIES)
DATASETS = _child("dataset", _root.DATASETS, ["dcn_plugin.datasets"])
DATA_SAMPLERS = _child("data sampler", _root.DATA_SAMPLERS)
TRANSFORMS = _child("transform", _root.TRANSFORMS, ["dcn_plugin.datasets"])  # transforms live there
MODELS = _child("model", _root.MODELS, _MODEL_LOCATIONS)
MODEL_WRAPPERS = _child("model_wrapper", _root.MODEL_WRAPPERS)
WEIGHT_INITIALIZERS = _child("weight initializer", _root.WEIGHT_INITIALIZERS)
OPTIMIZERS = _child("optimizer", _root.OPTIMIZERS)
OPTIM_WRAPPERS = _child("optim_wrapper", _root.OPTIM_WRAPPERS)
OPTIM_WRAPPER_CONSTRUCTORS = _child("optimizer wrapper constructor", _root.OPTIM_WRAPPER_CONSTRUCTORS,
                                    ["dcn_plugin.layers"])
PARAM_SCHEDULERS = _child("parameter scheduler", _root.PARAM_SCHEDULERS)
METRICS = _child("metric", _root.METRICS, ["dcn_plugin.evaluation"])
EVALUATOR = _child("evaluator", _root.EVALUATOR)
TASK_UTILS = _child("task util", _root.TASK_UTILS)
VISUALIZERS = _child("visualizer", _root.VISUALIZERS)
VISBACKENDS = _child("vis_backend", _root.VISBACKENDS)
LOG_PROCESSORS = _child("log_processor", _root.LOG_PROCESSORS)
INFERENCERS = _child("inferencer", _root.INFERENCERS)
FUNCTIONS = _child("function", _root.FUNCTIONS)
