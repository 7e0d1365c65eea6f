"""Importing this module runs :func:`dcn_plugin.compat.mmcv.install`: ``mmcv.ops``' deformable
convolution and RoI pooling names then serve dcn_plugin's (CPU and GPU, nothing compiled). For a
config's ``custom_imports=dict(imports=['dcn_plugin.compat.mmcv_ops'])``, e.g. to run mmdetection's
own ``dpool``/``mdpool`` configs on the CPU."""

from .mmcv import install

REPLACED = install()
