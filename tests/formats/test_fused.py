"""Module-level q/k/v and gate/up fusion: identical greedy tokens, one matmul per group, correct slices."""

from __future__ import annotations

import pytest
import torch

from optforge.formats.fused import FusedLinearGroup, can_stack, fuse_sibling_linears, stack_linears
from optforge.model_io import load_model


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


def _quantized_siblings(scheme: str, sizes=(16, 8, 8), k: int = 64) -> list[torch.nn.Module]:
    from optforge.formats.fp8 import Fp8Linear
    from optforge.formats.grid import Grid, qparams, quantize
    from optforge.formats.int8 import Int8WeightOnlyLinear, W8A8Linear
    from optforge.formats.weight_only import WeightOnlyLinear

    mods = []
    for i, n in enumerate(sizes):
        w = torch.randn(n, k) * 0.05
        if scheme.startswith("int4") or scheme == "int8-asym-g32":
            bits, group, sym = (4, 32, scheme == "int4-sym") if scheme.startswith("int4") else (8, 32, False)
            m = WeightOnlyLinear(k, n, i == 0, {"bits": bits, "group_size": group, "symmetric": sym})
            s, z = qparams(w, Grid(bits, group, sym))
            m.set_quantized(quantize(w, s, z, Grid(bits, group, sym)), s, z)
        elif scheme == "int8":
            m = Int8WeightOnlyLinear(k, n, i == 0)
            m.weight, m.weight_scale = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, 1) * 0.01
        elif scheme == "w8a8":
            m = W8A8Linear(k, n, i == 0)
            m.set_float(w)
        else:
            m = Fp8Linear(k, n, i == 0, {"strategy": "channel", "dynamic": scheme == "fp8-dynamic"})
            m.set_float(w, input_amax=3.0)
        if m.bias is not None:
            m.bias.data = torch.randn(n)
        mods.append(m)
    return mods


@pytest.mark.parametrize("scheme", ["int8", "int8-asym-g32", "int4-sym", "int4-asym", "w8a8", "fp8-dynamic", "fp8-static"])
def test_stacked_quantized_siblings_match_their_members(scheme):
    """One stacked module gives each member's output (its low-bit layout and kernel kept), sharing memory."""
    torch.manual_seed(0)
    mods = _quantized_siblings(scheme)
    x = torch.randn(5, 64)
    refs = [m(x) for m in mods]
    assert can_stack(mods)
    fused = stack_linears(mods, share=True)
    assert type(fused) is type(mods[0]) and fused.out_features == 32
    # int4 goes through a bf16 kernel on CPU, whose rounding depends on the matmul's width
    tol = 2e-2 if scheme.startswith("int4") else 1e-5
    torch.testing.assert_close(fused(x), torch.cat(refs, dim=1), rtol=tol, atol=tol)
    first_tensor = mods[0].weight_packed if scheme.startswith("int4") else mods[0].weight
    fused_tensor = fused.weight_packed if scheme.startswith("int4") else fused.weight
    assert first_tensor.data_ptr() == fused_tensor.data_ptr()  # members are views: no second copy
    torch.testing.assert_close(mods[1](x), refs[1], rtol=tol, atol=tol)


def test_layouts_that_cannot_stack_are_refused():
    from optforge.formats.fp8 import Fp8Linear

    per_tensor = [Fp8Linear(64, 8, False, {"strategy": "tensor", "dynamic": True}) for _ in range(2)]
    assert not can_stack(per_tensor)
    mixed = _quantized_siblings("int8")[:1] + _quantized_siblings("w8a8")[:1]
    assert not can_stack(mixed)
    static = _quantized_siblings("fp8-static")
    static[1].input_scale = static[1].input_scale * 2  # members calibrated to different activation scales
    assert not can_stack(static)
    with pytest.raises(ValueError, match="cannot stack"):
        stack_linears(mixed)
