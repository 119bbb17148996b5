"""Module-level q/k/v and gate/up fusion: identical greedy tokens, one matmul per group, correct slices."""

from __future__ import annotations

import torch

from optforge.runtime.fused_linears import FusedLinearGroup, fuse_sibling_linears
from optforge.runtime.loader import load_model


def test_greedy_tokens_identical_after_fusion(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    prompt = torch.tensor([[5, 6, 7, 8, 9], [20, 21, 22, 23, 24]])
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    with torch.no_grad():
        ref_logits = model(prompt).logits
        ref = model.generate(prompt, **kwargs)
    counts = fuse_sibling_linears(model)
    assert counts == {"q_proj+k_proj+v_proj": 2, "gate_proj+up_proj": 2}
    with torch.no_grad():
        torch.testing.assert_close(model(prompt).logits, ref_logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(model.generate(prompt, **kwargs), ref)


def test_one_matmul_serves_all_members_and_forgets_its_input():
    torch.manual_seed(0)
    linears = [torch.nn.Linear(32, n, bias=b) for n, b in ((16, True), (8, False), (8, True))]
    group = FusedLinearGroup(linears)
    calls = []
    group.linear.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(3, 32)
    outs = [group.slice(i, x) for i in range(3)]
    assert len(calls) == 1
    for lin, out in zip(linears, outs):
        torch.testing.assert_close(out, lin(x))
    assert group._input is None and group._output is None  # no stale activations kept between steps
    group.slice(0, torch.randn(3, 32))
    assert len(calls) == 2  # a new input recomputes


def test_quantized_or_missing_members_are_left_alone():
    block = torch.nn.Module()
    block.q_proj, block.k_proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)  # no v_proj
    assert fuse_sibling_linears(block) == {"q_proj+k_proj+v_proj": 0, "gate_proj+up_proj": 0}
    assert type(block.q_proj) is torch.nn.Linear
