"""Every recipe in recipes/ validates (keys, types, pass names and pass configs, data disjointness)."""

from pathlib import Path

import pytest

from optforge.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates(path):
    recipe, text = load_recipe(path)
    assert recipe.passes, f"{path.name} names no pass"
    assert text.strip()
