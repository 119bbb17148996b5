"""Every recipe in recipes/ validates (keys, types, pass names and pass configs, data disjointness); a search
recipe's every candidate does too."""

from pathlib import Path

import pytest

from optforge.pass_ import plan_passes
from optforge.recipe import load_recipe
from optforge.search import Candidate, candidate_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates(path):
    recipe, text = load_recipe(path)
    assert recipe.passes or recipe.search, f"{path.name} names no pass and no search"
    assert text.strip()
    for passes in recipe.search.candidates() if recipe.search else []:
        assert plan_passes(candidate_recipe(recipe, Candidate(0, passes), sequential=True))  # each candidate's configs parse
