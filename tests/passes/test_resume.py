"""Resumable calibration: layer checkpoints round-trip and are verified before reuse, a calibration interrupted
after layer k resumes at k + 1 with results identical to an uninterrupted one, and a real `optforge build`
killed (SIGKILL) after a layer's checkpoint resumes there and publishes the same tensors."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from optforge.passes.calibration import calibrate
from optforge.passes.layer_checkpoints import INDEX, TEST_KILL_AFTER_LAYER, LayerCheckpoints, changed_tensors, snapshot

IDENTITY = {"pass": "quant.test", "algorithm": "X", "num_layers": 2, "num_batches": 1, "device_type": "cpu"}


# ---------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    store = LayerCheckpoints.open(tmp_path, IDENTITY)
    changed = {"mlp.down_proj.weight": torch.randn(4, 3, dtype=torch.bfloat16), "norm.weight": torch.tensor([-0.0, 1.0])}
    results = {"mlp.down_proj.q": torch.randint(-8, 8, (4, 3), dtype=torch.int8), "amax": torch.tensor(0.1, dtype=torch.float64)}
    store.save(0, changed, results)
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["identity"] == IDENTITY and index["layers"]["0"]["sha256"] == hashlib.sha256((tmp_path / "layer-00000.safetensors").read_bytes()).hexdigest()
    loaded = LayerCheckpoints.open(tmp_path, IDENTITY).load(0)
    assert loaded is not None
    for want, got in zip((changed, results), loaded):
        assert want.keys() == got.keys()
        assert all(want[k].dtype == got[k].dtype and torch.equal(want[k].view(-1).view(torch.uint8), got[k].view(-1).view(torch.uint8)) for k in want)


def test_corrupt_or_missing_layer_is_recalibrated_with_every_later_one(tmp_path):
    store = LayerCheckpoints.open(tmp_path, IDENTITY)
    for i in range(3):
        store.save(i, {"w": torch.full((8,), float(i))}, {})
    data = bytearray((tmp_path / "layer-00001.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "layer-00001.safetensors").write_bytes(bytes(data))
    again = LayerCheckpoints.open(tmp_path, IDENTITY)
    assert again.load(0) is not None
    assert again.load(1) is None and again.load(2) is None  # layer 2's inputs came from layer 1
    (tmp_path / "layer-00000.safetensors").unlink()
    assert LayerCheckpoints.open(tmp_path, IDENTITY).load(0) is None


def test_checkpoints_of_another_run_and_half_written_files_are_discarded(tmp_path):
    LayerCheckpoints.open(tmp_path, IDENTITY).save(0, {"w": torch.ones(2)}, {})
    (tmp_path / ".layer-00001.safetensors.tmp-999999999-x").write_bytes(b"half")  # a writer that died
    other = LayerCheckpoints.open(tmp_path, {**IDENTITY, "num_batches": 2})
    assert other.load(0) is None and sorted(p.name for p in tmp_path.iterdir()) == []


def test_changed_tensors_sees_edits_through_data():
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    before = snapshot(layer)
    layer[0].weight.data.mul_(2)  # no version counter sees this
    layer[1].bias.data = -layer[1].bias.data  # 0.0 -> -0.0: equal values, different bits
    assert sorted(changed_tensors(layer, before)) == ["0.weight", "1.bias"]


# --------------------------------------------------------------------------- calibrate interrupted in-process


class _Crash(Exception):
    pass


def _gptq(model):
    from optforge.formats.grid import Grid
    from optforge.passes.quant.gptq import GPTQConfig, GPTQLayers
    from optforge.passes.targets import select_linears

    targets = select_linears(model, (r"model\.layers\.",), ())
    return GPTQLayers(dict.fromkeys(targets, Grid(4, 32, True)), GPTQConfig(bits=4, group_size=32)), targets, lambda alg: alg.results


def _awq(model):
    from optforge.formats.grid import Grid
    from optforge.passes.quant.awq import AWQConfig, AWQLayers
    from optforge.passes.quant.folding import model_folds
    from optforge.passes.targets import select_linears

    targets = select_linears(model, (r"model\.layers\.",), ())
    alg = AWQLayers(model_folds(model, "quant.awq"), targets, dict.fromkeys(targets, Grid(4, 32, True)), AWQConfig(bits=4, group_size=32, grid_points=4), 7, "quant.awq")
    return alg, targets, lambda a: (a.alphas, sorted(a.scaled), a.generator.get_state())


def _smoothquant(model):
    from optforge.passes.quant.folding import model_folds
    from optforge.passes.quant.smoothquant import SmoothQuantConfig, SmoothQuantLayers
    from optforge.passes.targets import select_linears

    targets = select_linears(model, (r"model\.layers\.",), ())
    report = {"alphas": {}, "errors": {}, "unsmoothed": [], "uncalibrated": []}
    alg = SmoothQuantLayers(model, model_folds(model, "quant.smoothquant"), targets, SmoothQuantConfig(), 7, "quant.smoothquant", report)
    return alg, targets, lambda a: (a.report, a.done, a.generator.get_state())


def _amax(model):
    from optforge.passes.quant.fp8 import InputAmax
    from optforge.passes.targets import select_linears

    targets = select_linears(model, (r"model\.layers\.",), ())
    return InputAmax(targets), targets, lambda a: a.amax


def _kv(model):
    from optforge.formats.kv_cache import attention_layers
    from optforge.passes.quant.kv_cache import KvRange

    return KvRange(attention_layers(model)), None, lambda a: {i: st["observed"] for i, st in a.state.items()}


def _pass(name: str, **config):
    from optforge.pass_ import get_pass, make_config

    cls = get_pass(name)
    return cls(make_config(cls, config))


def _sparsegpt(model):
    from optforge.passes.prune.unstructured import PruneLayers
    from optforge.passes.targets import select_linears

    return PruneLayers(_pass("prune.sparsegpt", sparsity=0.5), None), select_linears(model, (r"model\.layers\.",), ()), lambda a: a.done


def _head_scores(model):
    from optforge.passes.prune.structured import ImportanceLayers

    return ImportanceLayers(_pass("prune.heads", ratio=0.25)), None, lambda a: a.scores


def _tensors(obj):
    """Everything an algorithm kept, with tensors as bytes (bit-exact comparison)."""
    if isinstance(obj, torch.Tensor):
        return (str(obj.dtype), tuple(obj.shape), obj.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    if isinstance(obj, dict):
        return {k: _tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_tensors(v) for v in obj]
    return obj


@pytest.mark.parametrize("make", [_gptq, _awq, _smoothquant, _amax, _kv, _sparsegpt, _head_scores],
                         ids=["gptq", "awq", "smoothquant", "input-amax", "kv-range", "sparsegpt", "head-scores"])
def test_interrupted_calibration_resumes_with_identical_results(tiny_model_dir, tmp_path, make, caplog):
    from transformers import LlamaForCausalLM

    batches = [torch.arange(3, 43).view(2, 20), torch.arange(50, 80).view(1, 30)]

    def run(resume_dir, crash_after=None):
        model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
        alg, targets, kept = make(model)
        if crash_after is not None:
            apply = alg.apply
            alg.apply = lambda step: (_ for _ in ()).throw(_Crash()) if step.index > crash_after else apply(step)
        calibrate(model, batches, alg, pass_name="quant.test", targets=targets, resume_dir=resume_dir)
        return _tensors(kept(alg)), _tensors(dict(model.state_dict()))

    reference = run(None)
    with pytest.raises(_Crash):
        run(tmp_path / "resume", crash_after=0)
    assert sorted(json.loads((tmp_path / "resume" / INDEX).read_text())["layers"]) == ["0"]
    with caplog.at_level("INFO", logger="optforge.passes.calibration"):
        resumed = run(tmp_path / "resume")
    assert "resuming quant.test at layer 1 of 2" in caplog.text
    assert resumed[0] == reference[0]  # the algorithm's results
    assert resumed[1] == reference[1]  # every weight of the model


# --------------------------------------------------------------------------------- a real build, SIGKILLed


def _four_layer_model(tiny_model_dir: Path, path: Path) -> Path:
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_pretrained(tiny_model_dir)
    cfg.num_hidden_layers = 4
    torch.manual_seed(1)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    for f in tiny_model_dir.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, path / f.name)
    return path


def _build(recipe: Path, cache: Path, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "optforge.cli", "build", str(recipe), "--cache-dir", str(cache)]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "250", **env}, timeout=600)


def _tensor_hashes(folder: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    hashes = {}
    for file in sorted(folder.glob("*.safetensors")):
        for name, t in load_file(file).items():
            hashes[name] = hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return hashes


def test_killed_gptq_build_resumes_after_the_last_checkpoint_and_matches(tiny_model_dir, tmp_path):
    model = _four_layer_model(tiny_model_dir, tmp_path / "tiny-4")
    recipes = {}
    for name in ("resumed", "straight"):
        recipe = {
            "name": "tiny-gptq",
            "model": {"source": str(model), "dtype": "float32"},
            "data": {"calibration": {"dataset": "boolq", "rows": [2000, 2004], "max_length": 32}},
            "passes": [{"name": "quant.gptq", "config": {"bits": 4, "group_size": 32}}],
            "output": str(tmp_path / f"out-{name}"),
        }
        recipes[name] = tmp_path / f"{name}.yaml"
        recipes[name].write_text(yaml.safe_dump(recipe))

    killed = _build(recipes["resumed"], tmp_path / "cache-a", **{TEST_KILL_AFTER_LAYER: "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    [folder] = (tmp_path / "cache-a" / "resume").iterdir()
    assert sorted(json.loads((folder / INDEX).read_text())["layers"]) == ["0", "1"]
    assert not (tmp_path / "out-resumed").exists()

    resumed = _build(recipes["resumed"], tmp_path / "cache-a")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming quant.gptq at layer 2 of 4" in resumed.stderr
    assert not folder.exists()  # the pass's output is cached: its resume folder is gone

    straight = _build(recipes["straight"], tmp_path / "cache-b")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "resuming" not in straight.stderr
    a, b = _tensor_hashes(tmp_path / "out-resumed"), _tensor_hashes(tmp_path / "out-straight")
    assert any(".layers.3." in n for n in a) and len(a) == len(b)
    assert a == b
