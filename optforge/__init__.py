"""optforge: a compiler-style optimization toolchain for generative models.

Importing optforge stays light (no torch): heavy modules load when a command needs them.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "build", "load_recipe", "Recipe"]


def build(recipe, **kwargs):
    """Build a recipe (a `Recipe`, a dict, or a YAML path); see `optforge.pipeline.build`."""
    from optforge.pipeline import build as _build

    return _build(recipe, **kwargs)


def __getattr__(name: str):
    if name in ("Recipe", "load_recipe"):
        from optforge import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module 'optforge' has no attribute {name!r}")
