"""Generation tasks (triviaqa, nq_open, basic_arithmetic): lm-eval's prompts and exact-match normalization,
stop sequences in HFLM, and the eval cache and gate metric names through run_evals."""

from __future__ import annotations

import pytest

from optforge.errors import DataError
from optforge.evals.generation_tasks import GENERATION_TASKS, MAX_GEN_TOKS, NQ_ARTICLES, STOP_SEQUENCES, cut_at_stop, exact_match, normalize
from optforge.evals.tasks import evaluate_task, get_task, task_docs


def test_normalization_is_lm_evals_case_and_punctuation():
    # exact_match_hf_evaluate with ignore_case and ignore_punctuation: lowercase, string.punctuation deleted.
    assert normalize("Sunset Blvd.") == "sunset blvd"
    assert normalize("U.S.A.") == "usa"
    assert normalize("Campbell-Bannerman") == "campbellbannerman"
    assert normalize("O'Neill, Eugene!") == "oneill eugene"
    # Inner whitespace is compared as it is; the output alone is stripped (the remove_whitespace filter).
    assert normalize("New  York") != normalize("New York")
    assert exact_match("  New York \n", ["new york"]) == 1


def test_articles_are_removed_only_where_the_task_lists_them():
    # nq_open's regexes_to_ignore drops articles (before lowercasing); triviaqa keeps them.
    assert normalize("The Beatles", (NQ_ARTICLES,)) == "beatles"
    assert normalize("a dog and an apple", (NQ_ARTICLES,)) == "dog and apple"
    assert exact_match("the Beatles", ["Beatles"], (NQ_ARTICLES,)) == 1
    assert exact_match("the Beatles", ["Beatles"]) == 0
    assert GENERATION_TASKS["nq_open"].regexes_to_ignore == (NQ_ARTICLES,)
    assert GENERATION_TASKS["triviaqa"].regexes_to_ignore == ()


def test_exact_match_against_any_alias():
    golds = ["Sunset Blvd", "West Sunset Boulevard", "Sunset Boulevard"]
    assert exact_match(" Sunset Boulevard", golds) == 1
    assert exact_match("SUNSET BLVD", golds) == 1
    assert exact_match("Sunset", golds) == 0
    assert exact_match("", golds) == 0


def test_stop_sequences_cut_at_the_first_one():
    assert cut_at_stop(" Paris. It is the capital", STOP_SEQUENCES) == " Paris"
    assert cut_at_stop(" 1,000 people\nmore", STOP_SEQUENCES) == " 1"
    assert cut_at_stop(" no stop here", STOP_SEQUENCES) == " no stop here"


def test_prompts_and_golds_follow_lm_eval():
    task = get_task("triviaqa")
    (doc,), _ = task_docs(task, limit=1)
    assert task.prompt(doc) == "Question: Which Lloyd Webber musical premiered in the US on 10th December 1993??\nAnswer:"
    assert "Sunset Boulevard" in task.golds(doc) and task.stop == ("\n", ".", ",") and task.max_new_tokens == MAX_GEN_TOKS == 256
    task = get_task("nq_open")
    (doc,), _ = task_docs(task, limit=1)
    assert task.prompt(doc) == "Answer these questions:\n\nQ: when was the last time anyone was on the moon?\nA:"
    assert task.golds(doc) == ["14 December 1972 UTC", "December 1972"]
    task = get_task("basic_arithmetic")
    (doc,), _ = task_docs(task, limit=1)
    assert task.prompt(doc) == "Question: Calculate 5 + 91 =\nAnswer:" and task.golds(doc) == ["96"]


class ScriptedLM:
    """Answers each prompt from a table (then runs on past a stop sequence, as a model would)."""

    last_tokens = 0

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.requests = []

    def loglikelihood(self, requests):
        raise AssertionError("generation tasks do not score log-likelihoods")

    def generate(self, requests):
        self.requests += list(requests)
        return [self.answers.get(r.prompt, " I don't know") + ". And then some more text" for r in requests]


def test_evaluate_task_scores_exact_match_per_document():
    task = get_task("triviaqa")
    docs, _ = task_docs(task, limit=4)
    lm = ScriptedLM({task.prompt(docs[0]): " sunset boulevard", task.prompt(docs[2]): " " + task.golds(docs[2])[-1]})
    result = evaluate_task(lm, "triviaqa", limit=4)
    assert [ex["correct"] for ex in result.per_example] == [1, 0, 1, 0]
    assert result.per_example[0]["output"] == " sunset boulevard"
    assert result.metrics["exact_match"] == 0.5 and result.metrics["exact_match_stderr"] > 0
    assert all(r.stop == ("\n", ".", ",") and r.max_new_tokens == 256 for r in lm.requests)


def test_unknown_generation_task_suggests_the_nearest():
    with pytest.raises(DataError, match="triviaqa"):
        get_task("trivia_qa")


def test_hflm_generation_stops_at_a_stop_string(tiny_model_dir):
    from optforge.evals.lm import GenerateRequest, load_lm

    lm = load_lm(tiny_model_dir)
    prompt = lm._encode("The quick brown fox")
    free = lm.greedy_tokens(prompt, 24)
    text = lm.tokenizer.decode(free, skip_special_tokens=True)
    stop = next(ch for ch in text[len(text) // 3 :] if not ch.isspace())
    (cut,) = lm.generate([GenerateRequest("The quick brown fox", max_new_tokens=24, stop=(stop,))])
    assert cut == text[: text.index(stop)]
    # Decoding ended at the stop instead of running to the budget.
    assert len(lm.greedy_tokens(prompt, 24, stop=(stop,))) < len(free) or len(free) < 24


def test_generation_task_through_run_evals_is_cached(tiny_model_dir, cache_dir, monkeypatch):
    from optforge.cache import Cache
    from optforge.evaluation import run_evals
    from optforge.gate import resolve_metric
    from optforge.recipe import EvalSpec, ModelSpec, TaskSpec
    from optforge.sources import resolve_source

    cache = Cache(cache_dir)
    artifact, _ = resolve_source(ModelSpec(source=str(tiny_model_dir)), cache)
    spec = EvalSpec(perplexity=None, tasks=[TaskSpec(name="nq_open", limit=3)])
    first, cached = run_evals(artifact, spec, dtype="float32", cache=cache)
    assert not cached and set(first) == {"nq_open.exact_match"}
    assert first["nq_open.exact_match"]["n"] == 3 and set(first["nq_open.exact_match"]["per_example"]["correct"]) <= {0, 1}
    assert resolve_metric("nq_open", first) == "nq_open.exact_match"

    import optforge.model_io as loader

    def no_load(*args, **kwargs):
        raise AssertionError("a cached evaluation must not load the model")

    monkeypatch.setattr(loader, "load_model", no_load)
    second, cached = run_evals(artifact, spec, dtype="float32", cache=cache)
    assert cached and second == first


def test_optforge_eval_runs_triviaqa(tiny_model_dir, cache_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from optforge.cli import app

    out = tmp_path / "evals.json"
    result = CliRunner().invoke(app, ["eval", str(tiny_model_dir), "--tasks", "triviaqa", "--limit", "2", "--cache-dir", str(cache_dir), "--json", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    assert set(results) == {"triviaqa.exact_match"} and results["triviaqa.exact_match"]["n"] == 2


def test_a_recipe_lists_a_generation_task_and_gates_on_it(tiny_model_dir, tmp_path):
    from optforge.recipe import parse_recipe

    recipe = parse_recipe({
        "model": {"source": str(tiny_model_dir)},
        "data": {"eval": {"perplexity": None, "tasks": [{"name": "triviaqa", "limit": 100}]}},
        "passes": [{"name": "quant.int8_weight_only", "gate": {"metric": "triviaqa.exact_match", "max_drop": 5}}],
        "output": str(tmp_path / "out"),
    })
    assert recipe.data.eval.tasks[0].name == "triviaqa" and recipe.passes[0].gates()[0].metric == "triviaqa.exact_match"
