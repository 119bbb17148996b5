"""Evaluation tasks and metrics. Gates are evaluated by the core (`optforge.gate`), never by a pass."""
