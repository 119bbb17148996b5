"""Task definitions (lm-eval prompt formats on real rows), acc vs acc_norm, and the LM's scoring paths."""

from __future__ import annotations

import pytest

from optforge.evals.lm import HFLM, LoglikelihoodRequest, LoglikelihoodResult
from optforge.evals.tasks import TASKS, evaluate_task, get_task, task_docs


def _first_requests(name: str) -> tuple[list[str], list[str], int]:
    task = get_task(name)
    (doc,), _ = task_docs(task, limit=1)
    contexts, continuations = task.build(doc)
    return contexts, continuations, task.gold(doc)


def test_prompt_formats_follow_lm_eval():
    ctx, conts, gold = _first_requests("arc_easy")
    assert ctx == ["Question: Which technology was developed most recently?\nAnswer:"]
    assert conts == [" cellular telephone", " television", " refrigerator", " airplane"] and gold == 0
    ctx, conts, gold = _first_requests("hellaswag")
    assert ctx == ["Roof shingle removal: A man is sitting on a roof. He"] and len(conts) == 4 and gold == 3
    ctx, conts, gold = _first_requests("winogrande")
    assert ctx == ["Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria"]
    assert conts == [" always got the easier cases."] and gold == 1
    ctx, conts, gold = _first_requests("boolq")
    assert ctx[0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert conts == [" no", " yes"] and gold == 0
    ctx, conts, gold = _first_requests("sciq")
    assert ctx[0] == "\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:" and conts[gold] == " darwin"  # empty support, as in lm-eval
    ctx, conts, _ = _first_requests("sst2")
    assert ctx[0].endswith("\nQuestion: Is this sentence positive or negative?\nAnswer:") and conts == [" negative", " positive"]
    ctx, conts, _ = _first_requests("mmlu")
    assert ctx[0].startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert "\nA. " in ctx[0] and ctx[0].endswith("\nAnswer:") and conts == [" A", " B", " C", " D"]


def test_every_task_builds_requests_and_a_valid_gold_index():
    for name, task in TASKS.items():
        docs, _ = task_docs(task, limit=3)
        for doc in docs:
            contexts, continuations = task.build(doc)
            width = max(len(contexts), len(continuations))
            assert 0 <= task.gold(doc) < width == len(task.choice_texts(doc)), name


class LengthLM:
    """Scores each continuation (" " + choice) as -0.5 per character. Raw log-likelihood prefers the shortest
    choice; acc_norm divides by len(choice) without the space, -0.5 * (L + 1) / L, which prefers the longest."""

    last_tokens = 0

    def loglikelihood(self, requests):
        return [LoglikelihoodResult(-0.5 * len(r.continuation), False, 1) for r in requests]

    def generate(self, requests):
        return ["" for _ in requests]


def test_acc_and_acc_norm_follow_their_definitions():
    result = evaluate_task(LengthLM(), "arc_easy", limit=20)
    docs, _ = task_docs(get_task("arc_easy"), limit=20)
    shortest = [min(range(len(d["choices"]["text"])), key=lambda i: len(d["choices"]["text"][i])) for d in docs]
    gold = [d["choices"]["label"].index(d["answerKey"]) for d in docs]
    assert [ex["pred"] for ex in result.per_example] == shortest
    assert result.metrics["acc"] == pytest.approx(sum(s == g for s, g in zip(shortest, gold)) / 20)
    longest = [max(range(len(d["choices"]["text"])), key=lambda i: len(d["choices"]["text"][i])) for d in docs]
    assert result.metrics["acc_norm"] == pytest.approx(sum(s == g for s, g in zip(longest, gold)) / 20)
    assert result.n == 20 and [ex["row"] for ex in result.per_example] == list(range(20))


def test_limit_and_rows_select_documents():
    result = evaluate_task(LengthLM(), "sst2", rows=(10, 30), limit=5)
    assert result.n == 5 and result.config["rows"] == [10, 15]


def test_unknown_task_suggests_the_nearest():
    from optforge.errors import DataError

    with pytest.raises(DataError, match="arc_easy"):
        get_task("arc_eazy")


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def test_kv_reuse_matches_scoring_whole_sequences(tiny_lm):
    model, tok = tiny_lm
    requests = [LoglikelihoodRequest(c, x) for c in ("Paris is the", "The quick brown fox jumps over the lazy") for x in (" capital", " dog.", " a b c d e f", " 12345")]
    requests.append(LoglikelihoodRequest("Numbers like", " 3.14159"))  # a context of its own: the whole-sequence path
    shared = HFLM(model, tok, batch_size=3).loglikelihood(requests)
    whole = HFLM(model, tok, kv_reuse=False, batch_size=3).loglikelihood(requests)
    for a, b in zip(shared, whole):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert a.num_tokens == b.num_tokens and a.is_greedy == b.is_greedy


def test_trailing_context_spaces_move_to_the_continuation(tiny_lm):
    model, tok = tiny_lm
    lm = HFLM(model, tok)
    assert lm.encode_pair("Paris is the ", "capital") == lm.encode_pair("Paris is the", " capital")
    ctx, cont = lm.encode_pair("", "dog")
    assert ctx == [tok.eos_token_id] and cont


def test_long_requests_are_truncated_from_the_left(tiny_lm):
    model, tok = tiny_lm
    lm = HFLM(model, tok, max_length=16)
    (res,) = lm.loglikelihood([LoglikelihoodRequest("The quick brown fox jumps over the lazy dog. " * 10, " Paris")])
    assert res.num_tokens >= 1 and res.logprob < 0


def test_generate_is_greedy_and_honours_stop_strings(tiny_lm):
    from optforge.evals.lm import GenerateRequest

    model, tok = tiny_lm
    lm = HFLM(model, tok)
    first, again = lm.generate([GenerateRequest("Paris is", max_new_tokens=5)] * 2)
    assert first == again
    (stopped,) = lm.generate([GenerateRequest("Paris is", max_new_tokens=5, stop=(first[:1],))]) if first else ("",)
    assert stopped == ""
