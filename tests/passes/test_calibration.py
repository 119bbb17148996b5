"""The layer-by-layer calibration driver: what a layer's modules see equals what they see in a whole-model
forward (bit for bit), "after" propagation feeds the next layer the changed layer's outputs, and the
calibration data helpers cut passages and windows as documented."""

from __future__ import annotations

import pytest
import torch

from optforge.passes.calibration import LayerAlgorithm, calibrate, calibration_forward, token_windows, watch_inputs
from optforge.passes.targets import select_linears


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


BATCHES = [torch.arange(3, 23).view(2, 10), torch.arange(40, 52).view(1, 12)]


class Recorder(LayerAlgorithm):
    propagate = "before"

    def __init__(self):
        self.seen: dict[str, list[torch.Tensor]] = {}

    def record(self, key, x):
        self.seen.setdefault(key, []).append(x)


def _full_forward_inputs(model, modules) -> dict[str, list[torch.Tensor]]:
    seen: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad(), watch_inputs(modules, lambda k, x: seen.setdefault(k, []).append(x)):
        for ids in BATCHES:
            calibration_forward(model, ids)
    return seen


def test_layer_by_layer_inputs_equal_the_whole_model_forward(tiny):
    model, _ = tiny
    targets = select_linears(model, (r".*",), (r"lm_head",))
    recorder = Recorder()
    calibrate(model, BATCHES, recorder, pass_name="test", targets=targets)
    reference = _full_forward_inputs(model, targets)
    assert set(recorder.seen) == set(targets) == set(reference)
    for name, xs in reference.items():
        assert len(recorder.seen[name]) == len(BATCHES)
        for got, want in zip(recorder.seen[name], xs):
            assert torch.equal(got, want), name


class ZeroFirstOProj(Recorder):
    propagate = "after"

    def watch(self, step):
        return {n: m for n, m in step.targets.items() if n.endswith("o_proj")}

    def apply(self, step):
        if step.index == 0:
            step.layer.self_attn.o_proj.weight.data.zero_()


def test_after_propagation_feeds_the_next_layer_the_changed_layer(tiny_model_dir):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    targets = select_linears(model, (r"o_proj",), ())
    algorithm = ZeroFirstOProj()
    calibrate(model, BATCHES, algorithm, pass_name="test", targets=targets)
    reference = _full_forward_inputs(model, targets)  # the model as changed: layer 0's o_proj zeroed
    later = "model.layers.1.self_attn.o_proj"
    assert all(torch.equal(a, b) for a, b in zip(algorithm.seen[later], reference[later]))
    assert algorithm.seen["model.layers.0.self_attn.o_proj"][0].abs().sum() > 0  # observed before the change


def test_a_model_without_decoder_layers_is_a_pass_error():
    from optforge.errors import PassError

    with pytest.raises(PassError, match="decoder layers"):
        calibrate(torch.nn.Linear(2, 2), BATCHES, Recorder(), pass_name="test")


def test_token_windows_cut_joined_text(tiny):
    _, tokenizer = tiny
    texts = ["The quick brown fox jumps over the lazy dog."] * 8
    ids = token_windows(tokenizer, texts, num_samples=3, seq_len=8, pass_name="test")
    assert ids.shape == (3, 8)
    joined = (tokenizer(texts[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]) * len(texts)
    assert ids.flatten().tolist() == joined[:24]


def test_packed_calibration_gives_samples_of_exactly_max_length(tiny, tmp_path):
    from optforge.context import PassContext
    from optforge.passes.calibration import calibration_samples
    from optforge.recipe import CalibrationSpec, ModelSpec

    _, tokenizer = tiny
    spec = CalibrationSpec(rows=(2000, 2040), max_length=64, pack=True)
    ctx = PassContext(output_dir=tmp_path, model=ModelSpec(source="x"), calibration=spec)
    samples = calibration_samples("quant.gptq", tokenizer, ctx, 5)
    assert [s.shape for s in samples] == [(1, 64)] * 5
    joined = sum((s[0].tolist() for s in samples), [])  # this tokenizer adds no BOS: every token is text
    texts = ctx.calibration_texts()
    assert tokenizer.decode(joined).startswith(texts[0][:200])
    assert "pack" not in CalibrationSpec(rows=(0, 4)).cache_identity() and spec.cache_identity()["pack"] is True
    with pytest.raises(Exception, match="windows of 64 tokens, 1000 requested"):
        calibration_samples("quant.gptq", tokenizer, ctx, 1000)
