"""manifest.json: where an artifact came from, what made it and what it measured."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from optforge.evaluation import metric_summaries
from optforge.hashing import file_table, sha256_text

SCHEMA_VERSION = 1


def environment(device: str) -> dict:
    import torch
    import transformers

    from optforge import __version__

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "optforge": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device if device != "cuda" else f"cuda ({torch.cuda.get_device_name()})",
    }


def make_manifest(path: Path, *, recipe, recipe_text: str, source, source_metrics: dict, records: list, device: str, evals, extra: dict | None = None) -> dict:
    """`evals`: the EvalSpec the build ran (pipeline.eval_plan); None when it measured nothing, which the
    manifest says with `"evaluated": false`, `data.eval: null` and empty metrics. `extra`: more top-level keys
    (a search's candidates), written before the file table."""
    from optforge import __version__

    manifest = {
        "schema_version": SCHEMA_VERSION,
        "optforge_version": __version__,
        "name": recipe.name,
        "evaluated": evals is not None,
        "source": {**source.to_dict(), "metrics": metric_summaries(source_metrics)},
        "recipe": {"sha256": sha256_text(recipe_text), "text": recipe_text},
        "data": {
            "calibration": recipe.data.calibration.model_dump(mode="json") if recipe.data.calibration else None,
            "eval": evals.model_dump(mode="json") if evals is not None else None,
        },
        "passes": [r.to_dict() for r in records],
        **(extra or {}),
        "environment": environment(device),
        "files": file_table(path),
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
