"""Shared fixtures: a tiny random Llama with a real (small) byte-level BPE tokenizer, recipes over it,
a cache directory per session, and the real SmolLM2 source for end-to-end tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from optforge.artifact import ModelArtifact
from optforge.context import PassContext
from optforge.pass_ import Pass, config, option, register

REPO = Path(__file__).resolve().parents[1]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Quantization stores weights in fewer bits; pruning removes them.",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 12345 and 3.14159 appear in text too.",
]


def make_tiny_llama(path: Path, *, tie: bool = True, seed: int = 0) -> Path:
    """Write a 2-layer random Llama (hidden 64, GQA 4/2) with a trained 300-token BPE tokenizer to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def tiny_recipe(model_dir: Path, output: Path, *, gate_pct: float | None = 5.0, passes: list | None = None) -> dict:
    if passes is None:
        gate = {"metric": "perplexity", "max_increase_pct": gate_pct} if gate_pct is not None else None
        passes = [{"name": "quant.int8_weight_only", "gate": gate}]
    return {
        "name": "tiny-int8",
        "model": {"source": str(model_dir), "dtype": "float32"},
        "data": {
            "calibration": {"dataset": "boolq", "rows": [2000, 2004], "max_length": 32},
            "eval": {"perplexity": {"dataset": "boolq", "rows": [0, 6], "max_length": 48, "batch_size": 3}},
        },
        "passes": passes,
        "output": str(output),
    }


@pytest.fixture
def make_recipe():
    """tiny_recipe as a fixture, so test modules in any folder can use it without importing conftest."""
    return tiny_recipe


@pytest.fixture(scope="session")
def smollm2_cache() -> Path:
    """A cache dir that persists across test runs, so the SmolLM2 GGUF is converted once per machine."""
    path = Path(os.environ.get("OPTFORGE_TEST_CACHE", REPO / ".cache" / "test-cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@config
class ScrambleConfig:
    noise: float = option(10.0, "std of the Gaussian noise added to every Linear weight, in units of the weight's std")


@register
class Scramble(Pass):
    """A deliberately damaging pass, registered for tests only: adds large noise to every Linear weight."""

    name = "test.scramble"
    Config = ScrambleConfig
    requires = frozenset({"hf_causal_lm", "float_weights"})
    produces = frozenset({"hf_causal_lm", "float_weights"})

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        from optforge.passes.output import load_input, save_output

        model, tokenizer = load_input(artifact, ctx)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    w = module.weight
                    w.add_(torch.randn(w.shape, generator=gen).to(w.device) * w.std() * self.config.noise)
        return save_output(model, tokenizer, artifact, self, ctx)


def hf_greedy_reference(model, prompts: list[list[int]], max_new_tokens: int = 12):
    """HF `generate`, greedy, one prompt at a time on the model's device, exactly `max_new_tokens` each: the tokens
    and each step's raw logits (float32, CPU; `min_new_tokens` bans EOS in the scores, not in these)."""
    expected, logits = [], []
    with torch.inference_mode():
        for p in prompts:
            out = model.generate(torch.tensor([p], device=model.device), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
            expected.append(out.sequences[0, len(p):].tolist())
            logits.append([s[0].float().cpu() for s in out.logits])
    return expected, logits


@pytest.fixture(scope="session")
def hf_greedy():
    """`hf_greedy_reference` for tests in any folder (conftest modules are not importable by name)."""
    return hf_greedy_reference
