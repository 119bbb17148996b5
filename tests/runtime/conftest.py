"""Fixtures of the runtime tests: a tiny random Llama (no downloads) and a stand-in tokenizer."""

import pytest
import torch


class ByteTokenizer:
    """Characters <-> ids 3..258; id 2 is eos. Enough for the engine's stop and text handling."""

    eos_token_id = 2

    def encode(self, text: str) -> list[int]:
        return [min(ord(c), 255) + 3 for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i - 3) for i in ids if i >= 3)


def make_tiny_llama(hidden: int = 64, intermediate: int = 128, head_dim: int = 16):
    """A random Llama with 2 layers, 4 query and 2 KV heads, vocab 300; weights x4 for sharper logits, so greedy
    picks are far from ties."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=512, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    return model


@pytest.fixture(scope="session")
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def tiny_llama_factory():
    """`make_tiny_llama` for tests that need other widths (conftest modules are not importable by name)."""
    return make_tiny_llama


@pytest.fixture(scope="session")
def byte_tokenizer():
    return ByteTokenizer()


@pytest.fixture
def poison(monkeypatch):
    """poison(runner, token): any forward of `runner` that feeds `token` raises, as a kernel fault tied to one
    request's input would."""

    def apply(runner, token: int) -> None:
        forward = runner._forward_eager

        def faulty(batch, ids, *args):
            if token in ids:
                raise RuntimeError("injected fault")
            return forward(batch, ids, *args)

        monkeypatch.setattr(runner, "_forward_eager", faulty)

    return apply


def _step_logits(runner, prompts, schedule) -> torch.Tensor:
    """Logits (B, T, vocab) of every position, from steps that run `schedule[k]` tokens of every prompt at step k
    (all prompts in one step: a MoE model's sparse blocks route tokens of several sequences together), each
    prompt's blocks scattered over the cache; the runner's eager forward, as the engine runs a step."""
    from optforge.runtime.attention import slot
    from optforge.runtime.scheduler import ScheduledBatch
    from optforge.runtime.sequence import Sequence

    seqs = [Sequence(list(p)) for p in prompts]
    num_blocks = -(-len(prompts[0]) // runner.block_size)
    blocks = torch.randperm(runner.num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
    for i, seq in enumerate(seqs):
        seq.block_table = blocks[i * num_blocks : (i + 1) * num_blocks]
    rows: list[list[torch.Tensor]] = [[] for _ in seqs]
    with torch.inference_mode():
        for n in schedule:
            batch, ids, positions, slots = ScheduledBatch(), [], [], []
            for seq in seqs:
                batch.add(seq, n, [])
                span = range(seq.num_computed_tokens, seq.num_computed_tokens + n)
                ids += [seq.token_ids[p] for p in span]
                positions += list(span)
                slots += [slot(seq.block_table, p, runner.block_size) for p in span]
            logits = runner._forward_eager(batch, ids, positions, slots, list(range(len(ids))))
            for i, seq in enumerate(seqs):
                rows[i].append(logits[i * n : (i + 1) * n])
                seq.num_computed_tokens += n
    return torch.stack([torch.cat(r) for r in rows])


@pytest.fixture
def step_logits():
    """`_step_logits(runner, prompts, schedule)`: logits (B, T, vocab) of every position of every prompt."""
    return _step_logits


GEMMA3_LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]


def _tiny_gemma3(sliding_window: int = 8, vocab_size: int = 512, **overrides):
    """A random Gemma3ForCausalLM: 4 layers (3 sliding, 1 full), 4 query / 2 KV heads of 16, vocab 512 unless given, rope
    base 10000 on the full layer and 100 on the sliding ones, norm weights random (Gemma's x * (1 + w)). No EOS,
    so HF `generate` runs every token, as `ignore_eos` does."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, sliding_window=sliding_window, layer_types=GEMMA3_LAYER_TYPES,
                           max_position_embeddings=256, query_pre_attn_scalar=16, rope_theta=10000.0, rope_local_base_freq=100.0,
                           pad_token_id=0, eos_token_id=None, bos_token_id=2, **overrides)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)  # sharper logits: greedy picks far from ties
            else:
                p.normal_(0.0, 0.5)  # norm weights: random rather than HF's zeros, so each norm's weight counts
    return model


@pytest.fixture(scope="session")
def tiny_gemma3_model():
    """`_tiny_gemma3(sliding_window=8, vocab_size=512, **overrides)`: a random tiny Gemma-3 (see its docstring)."""
    return _tiny_gemma3
