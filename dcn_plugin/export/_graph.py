"""Small ONNX graph helpers shared by the translation and the decomposition.

``op`` is an onnxscript opset (``onnxscript.opset18`` .. ``opset23``) called while the exporter traces
a translation; tensors are the symbolic values it passes.
"""

from __future__ import annotations

__all__ = ["ints", "zeros", "repeat_groups"]


def ints(op, *values: int):
    """A 1-D int64 constant."""
    return op.Constant(value_ints=list(values))


def zeros(op, like, shape):
    """Zeros of ``like``'s dtype and the 1-D int64 ``shape``."""
    return op.Expand(op.CastLike(op.Constant(value_float=0.0), like), shape)


def repeat_groups(op, t, groups: int, target: int):
    """``(B, groups * X, *grid) -> (B, target * X, *grid)``, each group repeated ``target / groups``
    times in place (channel ``c`` of the result belongs to group ``c // (X * target / groups)``)."""
    if groups == target:
        return t
    grouped = op.Reshape(t, ints(op, 0, groups, 1, -1))
    repeated = op.Expand(grouped, ints(op, 1, 1, target // groups, 1))
    return op.Reshape(repeated, op.Concat(op.Shape(t, end=1), ints(op, -1), op.Shape(t, start=2), axis=0))
