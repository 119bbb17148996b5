"""Exported eval data: rows written by export_splits are served back unchanged by use_exported."""

from __future__ import annotations

import pytest

from optforge.errors import DataError
from optforge.evals import datasets
from optforge.recipe import PerplexitySpec


@pytest.fixture
def exported(tmp_path):
    path = tmp_path / "data.json.gz"
    size = datasets.export_splits(path, [("boolq", "validation"), ("arc_easy", "validation")])
    assert size == path.stat().st_size > 0
    yield path
    datasets.use_exported(None)


def test_exported_rows_match_the_package(exported):
    from_package = datasets.load_split("arc_easy", "validation")
    texts = datasets.load_texts(PerplexitySpec(rows=(0, 5)))
    assert datasets.use_exported(exported) == ["arc_easy/validation", "boolq/validation"]
    assert datasets.load_split("arc_easy", "validation") == from_package
    assert datasets.load_texts(PerplexitySpec(rows=(0, 5))) == texts


def test_a_split_missing_from_the_file_is_named(exported):
    datasets.use_exported(exported)
    with pytest.raises(DataError, match="hellaswag/validation.*not in the exported data file"):
        datasets.load_split("hellaswag", "validation")


def test_back_to_the_package_after_none(exported):
    datasets.use_exported(exported)
    datasets.use_exported(None)
    assert len(datasets.load_split("hellaswag", "validation")) == 10042


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        datasets.use_exported(tmp_path / "nope.json.gz")
