"""Packing passes: write weights in the layout a native runtime's kernels read directly (an engine)."""

from optforge.passes.pack import cpu  # noqa: F401
