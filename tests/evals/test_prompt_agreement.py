"""Label-free agreement on the user's prompts (`data.eval.prompts`): the metric, the prompts file checks, the
cache of greedy outputs, and a gate that a damaging pass fails."""

from __future__ import annotations

import json

import pytest

from optforge.errors import DataError, GateFailed, RecipeError
from optforge.evals.agreement import agreement, prompt_tokens, read_prompts
from optforge.recipe import ModelSpec, PromptsSpec, load_recipe, parse_recipe

PROMPTS = ["The quick brown fox", "Paris is the capital of", "def add(a, b):", "Numbers like 12345", "Quantization stores weights", "Berlin is", "The lazy dog", "Pruning removes"]


def write_prompts(path, lines: list) -> str:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


def test_agreement_is_exact_match_and_tokens_before_divergence():
    exact, matched = agreement([[1, 2, 3], [1, 2, 3], [1, 2], [5]], [[1, 2, 3], [1, 3, 3], [1, 2, 9], [6, 7]])
    assert exact == [1, 0, 0, 0]
    assert matched == [3, 1, 2, 0]
    with pytest.raises(ValueError):
        agreement([[1]], [])


def test_read_prompts_accepts_prompts_and_messages_and_names_a_bad_line(tmp_path):
    good = write_prompts(tmp_path / "good.jsonl", [{"prompt": "hi"}, "", {"messages": [{"role": "user", "content": "hello"}]}])
    assert len(read_prompts(good)) == 2
    bad = [
        ('{"prompt": "a"}\n{"prompt": oops}\n', "line 2: not valid JSON"),
        ('{"prompt": "a"}\n\n{"text": "b"}\n', "line 3: expected an object"),
        ('{"prompt": ""}\n', "line 1: \"prompt\" must be a non-empty string"),
        ('{"messages": [{"role": "user"}]}\n', "line 1: \"messages\"[0]"),
        ('{"prompt": "a", "messages": []}\n', "line 1: expected an object"),
        ("\n\n", "holds no prompts"),
    ]
    for i, (text, message) in enumerate(bad):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(text)
        with pytest.raises(DataError, match=message.replace("[", r"\[").replace('"', '"')):
            read_prompts(path)


def _recipe(tiny_model_dir, tmp_path, prompts: dict | None, gate: dict | None = None, passes: list | None = None) -> dict:
    return {
        "model": {"source": str(tiny_model_dir)},
        "data": {"calibration": None, "eval": {"perplexity": None, **({"prompts": prompts} if prompts else {})}},
        "passes": passes if passes is not None else [{"name": "test.scramble", "gate": gate}],
        "output": str(tmp_path / "out"),
    }


def test_recipe_checks_the_prompts_file_and_fills_in_the_reference(tiny_model_dir, tmp_path):
    path = write_prompts(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    recipe = parse_recipe(_recipe(tiny_model_dir, tmp_path, {"path": path, "max_tokens": 8}, {"metric": "prompts.exact_match", "max_drop": 10}))
    assert recipe.data.eval.prompts.reference == ModelSpec(source=str(tiny_model_dir))
    with pytest.raises(RecipeError, match=r"data\.eval\.prompts\.path: .*does not exist"):
        parse_recipe(_recipe(tiny_model_dir, tmp_path, {"path": str(tmp_path / "missing.jsonl")}))
    bad = write_prompts(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"prompt": "fine"}, "{not json"])
    with pytest.raises(RecipeError, match="line 3: not valid JSON"):
        parse_recipe(_recipe(tiny_model_dir, tmp_path, {"path": bad}))
    with pytest.raises(RecipeError, match="data.eval.prompts is not set"):
        parse_recipe(_recipe(tiny_model_dir, tmp_path, None, {"metric": "prompts.exact_match", "max_drop": 10}))
    with pytest.raises(RecipeError, match="prompts.match_tokens is reported only"):
        parse_recipe(_recipe(tiny_model_dir, tmp_path, {"path": path}, {"metric": "prompts.match_tokens", "max_drop": 10}))


def test_relative_prompts_path_is_relative_to_the_recipe_file(tiny_model_dir, tmp_path):
    import yaml

    folder = tmp_path / "recipes"
    folder.mkdir()
    write_prompts(folder / "mine.jsonl", [{"prompt": "hi"}])
    (folder / "r.yaml").write_text(yaml.safe_dump(_recipe(tiny_model_dir, tmp_path, {"path": "mine.jsonl"}, passes=[])))
    recipe, _ = load_recipe(folder / "r.yaml")
    assert recipe.data.eval.prompts.path == str((folder / "mine.jsonl").resolve())


def test_chat_messages_use_the_chat_template(tiny_model_dir):
    from optforge.evals.lm import load_lm

    lm = load_lm(tiny_model_dir)
    lm.tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    ids = prompt_tokens(lm, {"messages": [{"role": "user", "content": "The quick brown fox"}]})
    assert lm.tokenizer.decode(ids) == "<user>The quick brown fox\n<assistant>"
    assert prompt_tokens(lm, {"prompt": "The quick"}) == lm._encode("The quick")


def test_the_source_agrees_with_itself_and_the_rerun_loads_nothing(tiny_model_dir, cache_dir, tmp_path, monkeypatch):
    from optforge.cache import Cache
    from optforge.evaluation import run_evals
    from optforge.recipe import EvalSpec
    from optforge.sources import resolve_source

    cache = Cache(cache_dir)
    source = ModelSpec(source=str(tiny_model_dir))
    artifact, _ = resolve_source(source, cache)
    path = write_prompts(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    spec = EvalSpec(perplexity=None, prompts=PromptsSpec(path=path, max_tokens=8, reference=source))
    first, cached = run_evals(artifact, spec, dtype="float32", cache=cache)
    assert not cached
    assert first["prompts.exact_match"]["value"] == 1.0 and first["prompts.exact_match"]["per_example"]["correct"] == [1] * len(PROMPTS)
    assert 0 < first["prompts.match_tokens"]["value"] <= 8

    import optforge.model_io as loader

    def no_load(*args, **kwargs):
        raise AssertionError("a cached evaluation must not load the model")

    monkeypatch.setattr(loader, "load_model", no_load)
    second, cached = run_evals(artifact, spec, dtype="float32", cache=cache)
    assert cached and second == first
    # Another budget is another reference.
    with pytest.raises(AssertionError, match="must not load"):
        run_evals(artifact, EvalSpec(perplexity=None, prompts=PromptsSpec(path=path, max_tokens=9, reference=source)), dtype="float32", cache=cache)


def test_a_scrambled_model_disagrees_and_fails_the_prompts_gate(tiny_model_dir, cache_dir, tmp_path):
    from optforge.pipeline import build

    path = write_prompts(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    recipe = _recipe(tiny_model_dir, tmp_path, {"path": path, "max_tokens": 12}, {"metric": "prompts.exact_match", "max_drop": 10})
    # A short perplexity beside the prompts: a build that skips evals listing no perplexity and no task
    # still measures this one.
    recipe["data"]["eval"]["perplexity"] = {"rows": [0, 2], "max_length": 16, "batch_size": 2}
    with pytest.raises(GateFailed) as info:
        build(recipe, cache_dir=cache_dir)
    gate = info.value.result
    assert gate["metric"] == "prompts.exact_match" and gate["baseline"] == 1.0
    assert gate["measured"] < 0.5 and gate["verdict"] == "fail"
