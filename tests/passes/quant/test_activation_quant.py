"""quant.smoothquant (W8A8 int8), quant.fp8 and quant.kv_cache: numerics against references, artifacts,
compressed-tensors loading in plain transformers, requires/produces and cache hits, on the tiny Llama."""

import json

import pytest
import torch

from optforge.errors import PassError
from optforge.formats.int8 import W8A8Linear
from optforge.formats.kv_cache import apply_kv_cache_layout
from optforge.model_io import load_model
from optforge.passes.quant.smoothquant import choose_alpha, fake_w8a8, smoothing_scale

IDS = torch.arange(1, 40).unsqueeze(0)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_w8a8_linear_is_the_int8_product_of_its_rounded_operands():
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(48, 64, generator=gen), torch.randn(2, 5, 64, generator=gen)  # x (B, T, K)
    layer = W8A8Linear(64, 48, False)
    layer.set_float(w)
    y = layer(x)
    assert layer.kernel == "torch._int_mm" and layer.weight.dtype == torch.int8 and y.shape == (2, 5, 48)
    # Integer accumulation is exact; only the float rescale differs from the reference.
    torch.testing.assert_close(y.reshape(-1, 48), fake_w8a8(x.reshape(-1, 64), w), rtol=1e-5, atol=1e-5)
    ref = x @ w.T
    assert (y - ref).abs().max() <= 0.03 * ref.abs().max()


def test_smoothing_moves_activation_outliers_into_weights():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 128, generator=gen)
    x[:, :4] *= 60.0  # a few outlier channels, as LLM activations have
    w = torch.randn(96, 128, generator=gen) * 0.05
    ref = x @ w.T
    plain = float(((fake_w8a8(x, w) - ref) ** 2).mean())
    act_max = x.abs().amax(0)
    s = smoothing_scale(act_max, [w], 0.5)
    torch.testing.assert_close((x / s) @ (w * s).T, ref, rtol=1e-4, atol=1e-3)  # function unchanged in float
    smoothed = float(((fake_w8a8(x / s, w * s) - ref) ** 2).mean())
    assert smoothed < 0.5 * plain, (smoothed, plain)
    alpha, rel = choose_alpha(x, act_max, [w], (0.0, 0.25, 0.5, 0.75))
    assert alpha > 0.0 and rel * float((ref**2).mean()) <= smoothed * 1.0001


@pytest.mark.parametrize("passes", [
    [{"name": "quant.smoothquant"}],
    [{"name": "quant.smoothquant", "config": {"alpha": 0.5}}],
    [{"name": "quant.fp8"}],
    [{"name": "quant.fp8", "config": {"strategy": "tensor", "dynamic": False}}],
], ids=["sq-searched", "sq-0.5", "fp8-channel-dynamic", "fp8-tensor-static"])
def test_artifact_is_close_to_float_and_loads_in_transformers(build_tiny, tiny_model_dir, passes):
    out = build_tiny(passes, "act-" + json.dumps(passes, sort_keys=True)).output
    layout = json.loads((out / "optforge.json").read_text())
    assert {"quantized_weights", "quantized_activations"} <= set(layout["properties"])
    assert len(layout["modules"]) == 14 and layout["precision"]["lm_head"] == "float"
    ours, _ = load_model(out)
    base, _ = load_model(tiny_model_dir)
    a, f = _logits(ours), _logits(base)
    assert (a - f).abs().max() <= 0.05 * f.abs().max()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == ("int-quantized" if passes[0]["name"] == "quant.smoothquant" else "float-quantized")
    pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed")
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    # transformers applies the same per-token activation rounding; int8 rounding ties differ slightly.
    assert (a - _logits(theirs)).abs().max() <= 1e-2 * a.abs().max()


def test_smoothquant_reports_alphas_and_rerun_is_a_cache_hit(build_tiny):
    first = build_tiny([{"name": "quant.smoothquant"}], "sq-a")
    report = json.loads((first.output / "optforge.json").read_text())["quantization"]
    assert set(report["alphas"]) == {f"model.layers.{i}.{op}" for i in (0, 1) for op in ("input_layernorm", "post_attention_layernorm", "mlp.up_proj")}
    assert report["unsmoothed"] == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert build_tiny([{"name": "quant.smoothquant"}], "sq-b").manifest["passes"][0]["cached"] is True
    with pytest.raises(PassError, match="float_weights"):
        build_tiny([{"name": "quant.rtn", "config": {"bits": 8, "group_size": None}}, {"name": "quant.smoothquant"}], "sq-twice")
    with pytest.raises(PassError, match="alpha must be in"):
        build_tiny([{"name": "quant.smoothquant", "config": {"alpha": 1.5}}], "sq-bad")


def test_kv_cache_scales_are_recorded_and_change_what_attention_reads(build_tiny, tiny_model_dir):
    out = build_tiny([{"name": "quant.kv_cache", "config": {"dtype": "int8"}}], "kv").output
    layout = json.loads((out / "optforge.json").read_text())
    kv = layout["kv_cache"]
    assert "quantized_kv_cache" in layout["properties"] and "float_weights" in layout["properties"]
    assert kv["dtype"] == "int8" and set(kv["scales"]) == {"0", "1"}
    assert all(s["k"] > 0 and s["v"] > 0 for s in kv["scales"].values())
    f = _logits(load_model(tiny_model_dir)[0])  # float K/V
    model, _ = load_model(out)  # the loader applies the artifact's KV-cache layout itself
    q = _logits(model)
    assert 0 < (q - f).abs().max() <= 0.02 * f.abs().max()  # int8 KV: applied, and small
    coarse = {**kv, "scales": {i: {"k": s["k"] * 40, "v": s["v"] * 40} for i, s in kv["scales"].items()}}
    apply_kv_cache_layout(model, coarse)
    assert (_logits(model) - f).abs().max() > 5 * (q - f).abs().max()
    # Weights are untouched and a rerun is a cache hit.
    assert load_model(tiny_model_dir)[0].model.layers[0].self_attn.k_proj.weight.equal(model.model.layers[0].self_attn.k_proj.weight)
    assert build_tiny([{"name": "quant.kv_cache", "config": {"dtype": "int8"}}], "kv-b").manifest["passes"][0]["cached"] is True


def test_kv_cache_after_weight_quantization_keeps_both_layouts(build_tiny):
    out = build_tiny([{"name": "quant.fp8"}, {"name": "quant.kv_cache"}], "fp8-kv").output
    layout = json.loads((out / "optforge.json").read_text())
    assert layout["kv_cache"]["dtype"] == "fp8" and len(layout["modules"]) == 14
    assert layout["precision"]["model.layers.0.mlp.up_proj"].startswith("fp8")
    model, _ = load_model(out)
    apply_kv_cache_layout(model, layout["kv_cache"])
    assert torch.isfinite(_logits(model)).all()
