"""quant.int8_weight_only: what its artifact stores (zero rows and biases included) and its cache key semantics.

The rounding itself is tested with the module in tests/formats/test_int8.py."""

import dataclasses

import pytest
import torch

from optforge.passes.quant.int8_weight_only import Int8WeightOnly, Int8WeightOnlyConfig

ZERO_ROW = 3  # of layer 0's q_proj


@pytest.fixture(scope="module")
def biased_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with biases on its attention projections and one all-zero row in layer 0's q_proj."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.attention_bias = True
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.load_state_dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict(), strict=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
        model.model.layers[0].self_attn.q_proj.weight[ZERO_ROW].zero_()
    path = tmp_path_factory.mktemp("biased") / "model"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def test_artifact_holds_the_rounded_rows_scale_one_for_a_zero_row_and_the_bias(biased_model_dir, tmp_path, make_recipe):
    """What the artifacts contain, pinned: s = max|W[o, :]| / 127 (1 for an all-zero row), q = round(W / s)."""
    from safetensors.torch import load_file

    import optforge

    optforge.build(make_recipe(biased_model_dir, tmp_path / "out", gate_pct=None), cache_dir=tmp_path / "cache")
    stored = load_file(tmp_path / "out" / "model.safetensors")
    source = load_file(biased_model_dir / "model.safetensors")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        w = source[f"{name}.weight"].float()
        amax = w.abs().amax(dim=1, keepdim=True)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        assert torch.equal(stored[f"{name}.weight_scale"], scale)
        assert torch.equal(stored[f"{name}.weight"], torch.clamp(torch.round(w / scale), -127, 127).to(torch.int8))
    q_proj = "model.layers.0.self_attn.q_proj"
    assert stored[f"{q_proj}.weight_scale"][ZERO_ROW].item() == 1.0 and not stored[f"{q_proj}.weight"][ZERO_ROW].any()
    assert torch.equal(stored[f"{q_proj}.bias"], source[f"{q_proj}.bias"])


def test_cache_key_depends_on_version_config_input_not_calibration():
    p = Int8WeightOnly(Int8WeightOnlyConfig())
    key = p.cache_key("digest-a", {"rows": [0, 1]})
    assert key == p.cache_key("digest-a", {"rows": [5, 9]})  # int8 RTN reads no calibration data
    assert key != p.cache_key("digest-b", None)
    other = Int8WeightOnly(dataclasses.replace(p.config, exclude=("down_proj",)))
    assert key != other.cache_key("digest-a", None)

    class Bumped(Int8WeightOnly):
        version = Int8WeightOnly.version + 1

    assert key != Bumped(p.config).cache_key("digest-a", None)
    assert key != p.cache_key("digest-a", None, "bfloat16")  # passes compute in the recipe's dtype
