"""Mask math and the SparseGPT solver, on random matrices with known answers."""

import pytest
import torch

from optforge.passes.prune.masks import global_threshold, parse_pattern, prune_mask, sparsegpt_prune


def test_parse_pattern():
    assert parse_pattern("unstructured") is None
    assert parse_pattern("2:4") == (2, 4)
    for bad in ("4:2", "2:2", "0:4", "two:four", "2-4"):
        with pytest.raises(ValueError, match="N:M"):
            parse_pattern(bad)


def test_two_four_keeps_the_two_largest_of_every_four():
    torch.manual_seed(0)
    scores = torch.rand(16, 32)
    mask = prune_mask(scores, sparsity=0.0, nm=(2, 4), per_row=True)
    groups_mask, groups = mask.view(16, 8, 4), scores.view(16, 8, 4)
    assert torch.all(groups_mask.sum(-1) == 2)
    kept_min = groups.masked_fill(groups_mask, float("inf")).amin(-1)
    pruned_max = groups.masked_fill(~groups_mask, float("-inf")).amax(-1)
    assert torch.all(kept_min > pruned_max)


def test_per_row_and_per_matrix_sparsity_are_exact():
    torch.manual_seed(1)
    scores = torch.rand(10, 40) * torch.arange(1, 11)[:, None]  # rows on very different scales
    rows = prune_mask(scores, sparsity=0.25, nm=None, per_row=True)
    assert torch.all(rows.sum(1) == 10)
    whole = prune_mask(scores, sparsity=0.25, nm=None, per_row=False)
    assert int(whole.sum()) == 100
    assert whole[0].sum() > whole[9].sum()  # the small-scale row loses more under one matrix-wide cut
    assert float(scores[whole].max()) <= float(scores[~whole].min())


def test_global_threshold_cuts_the_requested_fraction():
    a, b = torch.arange(100.0), torch.arange(100.0, 300.0)
    t = global_threshold([a, b], 0.5)
    assert int((a <= t).sum() + (b <= t).sum()) == 150


def _layer_error(w, w_pruned, x):
    return float(((x @ w.T - x @ w_pruned.T) ** 2).sum())


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_reconstructs_better_than_masking(nm):
    torch.manual_seed(2)
    w = torch.randn(48, 64)
    x = torch.randn(512, 64) @ torch.randn(64, 64) * 0.3 + torch.randn(512, 64)  # correlated inputs
    x[:, :4] *= 8  # a few outlier features, as in LLM activations
    h = x.T @ x
    pruned = sparsegpt_prune(w, h, sparsity=0.5, nm=nm, block_size=16)
    zeros = pruned == 0
    assert abs(float(zeros.float().mean()) - 0.5) < 1e-6
    if nm:
        assert torch.all(zeros.view(48, 16, 4).sum(-1) == 2)
    wanda_score = w.abs() * x.norm(dim=0)
    masked = w.masked_fill(prune_mask(wanda_score, sparsity=0.5, nm=nm, per_row=True), 0.0)
    magnitude = w.masked_fill(prune_mask(w.abs(), sparsity=0.5, nm=nm, per_row=True), 0.0)
    err_sgpt, err_wanda, err_mag = (_layer_error(w, p, x) for p in (pruned, masked, magnitude))
    assert err_sgpt < err_wanda < err_mag


def test_sparsegpt_with_zero_sparsity_changes_nothing():
    torch.manual_seed(3)
    w, x = torch.randn(8, 16), torch.randn(64, 16)
    torch.testing.assert_close(sparsegpt_prune(w, x.T @ x, sparsity=0.0, nm=None), w, rtol=1e-5, atol=1e-5)
