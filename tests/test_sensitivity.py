"""Per-layer sensitivity (optforge/sensitivity.py) on the tiny model: one score per layer, equal to the loss
increase of quantizing that layer alone, most sensitive first, and the float model left as it was."""

import copy

import torch

from optforge.formats import quantize_in_memory
from optforge.model_io import load_model
from optforge.sensitivity import _mean_nll, layer_exclude_patterns, layer_sensitivities, proxy_spec


def test_scores_are_the_loss_increase_of_each_layer_alone_and_the_model_is_left_as_it_was(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    before = copy.deepcopy(model.state_dict())
    batches = [torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    spec = proxy_spec("quant.rtn", {"bits": 4, "group_size": 32})
    scores = layer_sensitivities(model, batches, spec)
    assert sorted(s.layer for s in scores) == [0, 1] and scores[0].loss_increase >= scores[1].loss_increase
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    base = _mean_nll(model, batches)
    for score in scores:  # the definition, computed independently: quantize one layer of a copy
        alone = copy.deepcopy(model)
        quantize_in_memory(alone.model.layers[score.layer], spec, skip=())
        assert abs((_mean_nll(alone, batches) - base) - score.loss_increase) < 1e-6
        assert score.loss_increase > 0
    assert layer_exclude_patterns([3, 1]) == [r"(^|\.)layers\.1\.", r"(^|\.)layers\.3\."]
