"""ONNX export of dcn_plugin's deformable convolution (needs the ``deploy`` extra).

``torch.onnx.export(..., dynamo=True)`` does not know the op ``dcn_plugin::deform_conv``; this
package provides its translation to standard ONNX ops, so that onnxruntime and TensorRT run the
exported model without plugins:

>>> from dcn_plugin.export import export_onnx, onnx_translation_table
>>> export_onnx(model, (x,), "model.onnx")                       # torch.onnx.export with the table
>>> torch.onnx.export(model, (x,), "model.onnx", dynamo=True,    # or pass the table yourself
...                   custom_translation_table=onnx_translation_table())

See :mod:`dcn_plugin.export.onnx` for what each case of the op becomes. Importing this package needs
onnx and onnxscript (``pip install 'dcn_plugin[deploy]'``); :func:`inference_session` needs
onnxruntime too. ``import dcn_plugin`` never imports it.
"""

from .._extras import DEPLOY_MODULES, require

require("dcn_plugin.export", DEPLOY_MODULES, extra="deploy")

from .onnx import (  # noqa: E402
    DEFAULT_OPSET,
    SUPPORTED,
    DeformConvExportError,
    export_onnx,
    inference_session,
    onnx_translation_table,
    onnxscript_opset,
)

__all__ = [
    "DEFAULT_OPSET",
    "SUPPORTED",
    "DeformConvExportError",
    "export_onnx",
    "inference_session",
    "onnx_translation_table",
    "onnxscript_opset",
]
