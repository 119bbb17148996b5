"""Distillation passes: train a student (pruned or otherwise changed) against its teacher."""

from optforge.passes.distill import kd  # noqa: F401
