"""Pruning passes: unstructured and 2:4 (magnitude, Wanda, SparseGPT) and structured (MLP width, heads, depth)."""

from optforge.passes.prune import structured, unstructured  # noqa: F401
