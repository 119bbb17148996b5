"""prune.magnitude / prune.wanda / prune.sparsegpt on the tiny Llama: sparsity, patterns, scope, cache keys."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from optforge.errors import PassError
from optforge.pass_ import get_pass, make_config

CALIB = {"num_samples": 8, "seq_len": 32}


def _weights(artifact):
    return load_file(artifact.path / "model.safetensors")


@pytest.mark.parametrize("name,config", [("prune.magnitude", {}), ("prune.wanda", CALIB), ("prune.sparsegpt", CALIB)])
def test_half_the_selected_weights_are_zero_and_nothing_else_changes(tiny_artifact, run_pass, name, config):
    out = run_pass(name, tiny_artifact, sparsity=0.5, **config)
    before, after = _weights(tiny_artifact), _weights(out)
    pruned = [k for k in after if ".self_attn." in k or ".mlp." in k]
    assert pruned and all(abs(float((after[k] == 0).float().mean()) - 0.5) < 0.01 for k in pruned)
    for key in after:
        if key not in pruned:
            assert torch.equal(after[key], before[key]), key  # embeddings, norms, lm_head untouched
    assert {"sparse_weights", "float_weights", "hf_causal_lm"} <= out.properties
    assert out.layout["sparsity"]["method"] == name and out.layout["sparsity"]["sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("name", ["prune.magnitude", "prune.wanda", "prune.sparsegpt"])
def test_two_four_pattern_holds_in_the_saved_checkpoint(tiny_artifact, run_pass, name):
    out = run_pass(name, tiny_artifact, pattern="2:4", **({} if name == "prune.magnitude" else CALIB))
    for key, w in _weights(out).items():
        if ".mlp." in key or ".self_attn." in key:
            assert torch.all((w == 0).view(w.shape[0], -1, 4).sum(-1) >= 2), key
    assert "sparse_2_4" in out.properties


def test_wanda_keeps_weights_on_loud_inputs_that_magnitude_drops():
    from optforge.passes.prune.masks import prune_mask

    w = torch.tensor([[1.0, 0.9, 0.2, 0.1]])
    norms = torch.tensor([1.0, 1.0, 100.0, 1.0])  # feature 2 carries large activations
    wanda = prune_mask(w.abs() * norms, sparsity=0.5, nm=None, per_row=True)
    magnitude = prune_mask(w.abs(), sparsity=0.5, nm=None, per_row=True)
    assert not wanda[0, 2] and magnitude[0, 2]


def test_global_scope_spreads_sparsity_unevenly(tiny_artifact, run_pass):
    out = run_pass("prune.magnitude", tiny_artifact, sparsity=0.5, scope="global")
    fractions = [float((w == 0).float().mean()) for k, w in _weights(out).items() if ".mlp." in k or ".self_attn." in k]
    assert sum(fractions) / len(fractions) == pytest.approx(0.5, abs=0.05)
    assert max(fractions) - min(fractions) > 0.01


def test_bad_config_is_a_pass_error(tiny_artifact, run_pass):
    with pytest.raises(PassError, match="sparsity"):
        run_pass("prune.magnitude", tiny_artifact, sparsity=1.0)
    with pytest.raises(PassError, match="N:M"):
        run_pass("prune.wanda", tiny_artifact, pattern="3:2", **CALIB)
    with pytest.raises(PassError, match="no Linear"):
        run_pass("prune.magnitude", tiny_artifact, include=("nothing_matches",))


def test_cache_key_reads_calibration_only_when_calibrated():
    mag, wanda = (get_pass(n) for n in ("prune.magnitude", "prune.wanda"))
    m, w = mag(make_config(mag, {})), wanda(make_config(wanda, {}))
    assert m.cache_key("d", {"rows": [0, 1]}) == m.cache_key("d", {"rows": [2, 3]})
    assert w.cache_key("d", {"rows": [0, 1]}) != w.cache_key("d", {"rows": [2, 3]})
    assert w.cache_key("d", None) != wanda(dataclasses.replace(w.config, sparsity=0.6)).cache_key("d", None)
