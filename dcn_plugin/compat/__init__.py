"""Drop-in replacements for other libraries' deformable layers, built on ``dcn_plugin.ops``.

- ``dcn_plugin.compat.mmcv``: ``mmcv.ops``' deformable convolution and RoI pooling (mmcv-full 2.x
  signatures, state_dict keys and outputs);
- ``dcn_plugin.compat.detectron2``: ``detectron2.layers``' ``DeformConv`` and
  ``ModulatedDeformConv``, and ``install()`` to put them into an installed detectron2.

Code written for those libraries changes one import line. Both need torch only, and run where the
originals do not (CPU backward, bfloat16, nothing to compile).
"""
