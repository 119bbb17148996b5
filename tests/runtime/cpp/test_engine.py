"""The C++ engine against HF transformers on the tiny random Llama: logits, greedy tokens, batching,
prefix caching and preemption invariance, and clear errors on tampered or truncated artifacts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

OPTFORGE_RT = Path(__file__).resolve().parents[3] / "runtime" / "cpp" / "build" / "optforge-rt"  # `make cpp` builds it
PROMPTS = [[5, 17, 42, 99, 7], [3, 3, 3], [120, 4, 56, 78, 90, 11, 23, 250, 8, 9, 10, 12, 13, 14, 15, 16, 17, 18]]


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def hf_greedy(model, ids: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_logits_match_hf(rt, tiny_artifact, hf_model):
    engine = rt.Engine(str(tiny_artifact), num_threads=2)
    for ids in PROMPTS:
        ours = engine.last_logits(ids)
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0, -1].numpy()
        assert np.abs(ours - ref).max() < 1e-4


def test_greedy_matches_hf_and_batching_is_invariant(rt, tiny_artifact, hf_model):
    engine = rt.Engine(str(tiny_artifact), num_threads=2)
    batched, stats = engine.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)
    for ids, out in zip(PROMPTS, batched):
        assert out == hf_greedy(hf_model, ids, 12)
        single, _ = engine.generate([ids], max_new_tokens=12, ignore_eos=True)
        assert single[0] == out
    assert stats.decode_tokens > 0 and stats.prefill_tokens == sum(map(len, PROMPTS))
    assert engine.num_free_blocks == 1024  # every block returned after the run


def test_prefix_cache_and_preemption_keep_outputs(rt, tiny_artifact):
    shared = list(range(10, 50))  # 40 tokens: two full blocks of 16 shared
    prompts = [shared + [1, 2], shared + [3], shared + [4, 5, 6]]
    plain = rt.Engine(str(tiny_artifact), enable_prefix_caching=False)
    expected, _ = plain.generate(prompts, max_new_tokens=10, ignore_eos=True, max_num_seqs=1)
    cached = rt.Engine(str(tiny_artifact))
    got, _ = cached.generate(prompts, max_new_tokens=10, ignore_eos=True, max_num_seqs=1)
    assert got == expected and cached.prefix_hits >= 2 * 16 * 2
    tight = rt.Engine(str(tiny_artifact), num_kv_blocks=7, enable_prefix_caching=False)  # 112 slots: the second decode runs out
    squeezed, stats = tight.generate(prompts, max_new_tokens=10, ignore_eos=True, max_num_seqs=3)
    assert squeezed == expected and stats.num_preemptions > 0


def test_tampered_artifact_is_rejected(rt, tiny_artifact):
    weights = tiny_artifact / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(rt.ArtifactError, match="sha256"):
        rt.Engine(str(tiny_artifact))
    rt.Engine(str(tiny_artifact), verify=False)  # loads when verification is explicitly off


def test_truncated_weights_give_clear_errors(rt, tiny_artifact):
    weights = tiny_artifact / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(rt.ArtifactError, match="bytes, the manifest says"):
        rt.Engine(str(tiny_artifact))
    with pytest.raises(rt.FormatError, match="truncated"):
        rt.Engine(str(tiny_artifact), verify=False)
    (tiny_artifact / "extra.bin").write_bytes(b"x")
    with pytest.raises(rt.ArtifactError):
        rt.verify_manifest(str(tiny_artifact))


def test_missing_manifest_fails_closed(rt, tiny_artifact):
    assert rt.Engine(str(tiny_artifact)).verified
    (tiny_artifact / "manifest.json").unlink()
    (tiny_artifact / "optforge.json").write_text('{"properties": []}')  # an optforge model directory without its manifest
    with pytest.raises(rt.ArtifactError, match="manifest.json is missing, so its files cannot be verified.*--no-verify"):
        rt.Engine(str(tiny_artifact))
    with pytest.raises(rt.ArtifactError, match="manifest.json is missing"):
        rt.StepRunner(str(tiny_artifact))
    assert not rt.Engine(str(tiny_artifact), verify=False).verified
    (tiny_artifact / "optforge.json").unlink()  # a plain Hugging Face folder never had a manifest: loads unverified
    assert not rt.Engine(str(tiny_artifact)).verified


def test_crafted_config_sizes_are_refused(rt, tiny_artifact):
    config = json.loads((tiny_artifact / "config.json").read_text())
    (tiny_artifact / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4, "head_dim": 2**30 + 16}))
    with pytest.raises(rt.ArtifactError, match=r"'head_dim' is 1073741840, expected an integer in \[1, 1048576\]"):
        rt.Engine(str(tiny_artifact), verify=False)


def test_missing_artifact_and_bad_config(rt, tmp_path, tiny_model_dir):
    with pytest.raises(rt.ArtifactError, match="no such artifact"):
        rt.Engine(str(tmp_path / "nope"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "mamba"}')
    with pytest.raises(rt.ArtifactError, match="not supported"):
        rt.Engine(str(bad))


def test_last_logits_leaves_the_prefix_cache_intact(rt, tiny_artifact):
    prompt = list(range(10, 60))  # 50 tokens: three full blocks go to the prefix cache
    engine = rt.Engine(str(tiny_artifact))
    first, _ = engine.generate([prompt], max_new_tokens=8, ignore_eos=True)
    engine.last_logits(list(range(100, 180)))  # another sequence's KV must not land in the cached blocks
    hits_before = engine.prefix_hits
    again, _ = engine.generate([prompt], max_new_tokens=8, ignore_eos=True)
    assert engine.prefix_hits > hits_before and again == first  # the rerun reused cached blocks
    reused = engine.last_logits(prompt + first[0])  # 48 of these tokens come from the prefix cache
    fresh = rt.Engine(str(tiny_artifact), enable_prefix_caching=False).last_logits(prompt + first[0])
    assert engine.prefix_hits >= hits_before + 2 * 48
    assert np.array_equal(reused, fresh)  # prefix reuse is exact, and nothing overwrote the cached KV
    assert engine.num_free_blocks == 1024


def test_failed_generate_returns_its_blocks(rt, tiny_artifact):
    engine = rt.Engine(str(tiny_artifact))
    with pytest.raises(ValueError, match="out of range"):
        engine.generate([[5, 6, 7], [5, 100_000]], max_new_tokens=4, ignore_eos=True)
    assert engine.num_free_blocks == 1024
    with pytest.raises(RuntimeError, match="does not fit"):
        rt.Engine(str(tiny_artifact), num_kv_blocks=2).generate([list(range(40))], max_new_tokens=2)


def test_weights_read_from_the_file_mapping_give_the_same_tokens(rt, tiny_artifact):
    mapped = rt.Engine(str(tiny_artifact), num_threads=1, copy_weights=False)
    assert mapped.weight_placement == "mmap"
    copied, _ = rt.Engine(str(tiny_artifact), num_threads=1).generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
    assert mapped.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)[0] == copied


@pytest.mark.skipif(not OPTFORGE_RT.exists(), reason="needs the optforge-rt binary: make cpp")
def test_optforge_rt_no_copy_reads_the_weights_from_the_file_mapping(tiny_artifact):
    def bench(*flags: str) -> dict:
        cmd = [str(OPTFORGE_RT), "bench", str(tiny_artifact), "--threads", "1", "--prompt-tokens", "8", "--new-tokens", "4", *flags]
        return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)

    assert bench("--no-copy")["weights"] == "mmap"
    assert bench()["weights"] in ("copy", "mmap")  # the copy is skipped where memory is short
