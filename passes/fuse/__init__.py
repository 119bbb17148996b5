"""Fusion passes: graph-level on the ONNX export (`fuse.onnx_graph`) and module-level for our runtime."""

from optforge.passes.fuse import linears  # noqa: F401
from optforge.passes.fuse import onnx_graph  # noqa: F401
