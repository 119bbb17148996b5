"""RuntimeLM (evals/runtime_lm.py): the serving runtime as an eval `LM`, against HFLM on the tiny model (fp32):
the same choice on every item and log-likelihoods within 1e-4, prefix-cache reuse of shared question
contexts, greedy generation equal to the engine's, and the runtime's prompt log-probs leaving serving alone."""

from __future__ import annotations

import pytest

from optforge.evals.lm import HFLM, GenerateRequest, LoglikelihoodRequest
from optforge.evals.runtime_lm import RuntimeLM
from optforge.model_io import load_model

QUESTIONS = [
    ("Question: Which city is the capital of France, and which is the capital of Germany?\nAnswer:", ["Paris", "Berlin", "the lazy dog", "12345"]),
    ("Question: What does quantization store in fewer bits?\nAnswer:", ["weights", "the quick brown fox", "numbers like 3.14159"]),
    ("The quick brown fox jumps over the lazy dog. Then", [" it", " the dog jumps over the fox.", " def add(a, b):"]),
    ("Question: def add(a, b): returns what?\nAnswer:", ["a + b", "a - b", "Paris"]),
]


def _requests() -> tuple[list[LoglikelihoodRequest], list[tuple[int, int]]]:
    requests, spans = [], []
    for context, choices in QUESTIONS:
        start = len(requests)
        requests += [LoglikelihoodRequest(context, c if c.startswith(" ") else " " + c) for c in choices]
        spans.append((start, len(requests)))
    requests.append(LoglikelihoodRequest("", "Paris is the capital of France."))  # empty context: EOS stands in
    return requests, spans


@pytest.fixture(scope="module")
def lms(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir, dtype="float32", device="cpu")
    return HFLM(model, tokenizer, batch_size=4), RuntimeLM.from_path(tiny_model_dir, dtype="float32")


def test_loglikelihoods_and_choices_match_hflm(lms):
    hf, rt = lms
    requests, spans = _requests()
    expected, got = hf.loglikelihood(requests), rt.loglikelihood(requests)
    for e, g in zip(expected, got):
        assert g.num_tokens == e.num_tokens and g.is_greedy == e.is_greedy
        assert abs(g.logprob - e.logprob) < 1e-4, (e, g)
    for a, b in spans:
        pick = lambda results: max(range(a, b), key=lambda i: results[i].logprob)  # noqa: E731
        assert pick(got) == pick(expected)
    assert rt.last_tokens > 0 and rt.last_seconds > 0


def test_shared_contexts_come_from_the_prefix_cache(lms):
    _, rt = lms
    manager = rt.engine.block_manager
    context = QUESTIONS[0][0] * 2  # several KV blocks of shared question
    before = manager.num_prefix_hits
    requests = [LoglikelihoodRequest(context + f" {n}.", f" choice {c}") for n in range(3) for c in "ABCD"]
    results = rt.loglikelihood(requests)
    num_context = len(rt.encode_pair(requests[0].context, requests[0].continuation)[0])
    blocks_per_follower = (num_context - 1) // manager.block_size
    assert blocks_per_follower >= 2
    # Every follower of each question reuses the question's whole blocks (leaders may reuse earlier questions').
    assert manager.num_prefix_hits - before >= 3 * 3 * blocks_per_follower * manager.block_size
    hf_results = lms[0].loglikelihood(requests)
    assert max(abs(a.logprob - b.logprob) for a, b in zip(results, hf_results)) < 1e-4


def test_generate_is_the_engines_greedy_output(lms):
    from optforge.runtime.sequence import SamplingParams

    hf, rt = lms
    requests = [GenerateRequest("The quick brown", max_new_tokens=12), GenerateRequest("Paris is the", max_new_tokens=8, stop=("e",))]
    texts = rt.generate(requests)
    for req, text in zip(requests, texts):
        seq = rt.engine.add_request("direct", rt._bos + rt._encode(req.prompt), SamplingParams(max_tokens=req.max_new_tokens, stop=req.stop))
        while rt.engine.has_unfinished:
            rt.engine.step()
        assert text == rt.engine.output(seq).text
    assert texts == hf.generate(requests)
    prompt = rt._encode("Numbers like")
    assert rt.greedy_tokens(prompt, 6) == hf.greedy_tokens(prompt, 6)


def test_prompt_logprobs_leave_the_sampled_tokens_alone(lms):
    from optforge.runtime.sequence import SamplingParams

    _, rt = lms
    prompt = rt._encode("The quick brown fox jumps over the lazy dog.")
    outs = []
    for scored_from in (None, 3):
        seq = rt.engine.add_request(f"p{scored_from}", prompt, SamplingParams(max_tokens=5, prompt_logprobs_from=scored_from))
        while rt.engine.has_unfinished:
            rt.engine.step()
        outs.append(rt.engine.output(seq))
    assert outs[0].token_ids == outs[1].token_ids
    assert outs[0].prompt_logprobs == {} and sorted(outs[1].prompt_logprobs) == list(range(3, len(prompt)))


def test_the_cpp_backend_scores_like_hflm(lms, tiny_model_dir):
    from optforge.runtime.cpp import BUILD_HINT, is_available

    if not is_available():
        pytest.skip(f"C++ runtime extension not built: {BUILD_HINT}")
    hf, _ = lms
    cpp = RuntimeLM.from_path(tiny_model_dir, backend="cpp")
    requests, _ = _requests()
    for e, g in zip(hf.loglikelihood(requests), cpp.loglikelihood(requests)):
        assert abs(g.logprob - e.logprob) < 1e-4 and g.is_greedy == e.is_greedy
    assert cpp.engine.block_manager.num_prefix_hits > 0


def test_prompt_agreement_outputs_match_hflm(lms):
    from optforge.evals.agreement import greedy_outputs

    hf, rt = lms
    prompts = [{"prompt": "The quick brown fox"}, {"prompt": "def add(a, b):"}, {"prompt": "Paris is"}]
    assert greedy_outputs(rt, prompts, 10) == greedy_outputs(hf, prompts, 10)
