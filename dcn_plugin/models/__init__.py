"""OpenMMLab-facing models of dcn_plugin (needs mmengine; ``dcn_plugin.ops`` does not)."""

from .layers import *  # noqa: F401,F403
from .layers import __all__ as _layers_all

__all__ = list(_layers_all)
