"""Under a host budget, a calibrated pass parks each finished decoder layer in a file of its resume folder and keeps
memory-mapped views of it: the host holds the finished layers as file pages, and the artifact is the same."""

import hashlib
import sys
from pathlib import Path

import pytest

from optforge.resources import MemoryBudget


def _mapped_file(address: int) -> str | None:
    """The file mapped at `address` in this process (/proc/self/maps), None for anonymous memory."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split()
        low, high = (int(x, 16) for x in span.split("-"))
        if low <= address < high:
            return rest[4] if len(rest) > 4 else None
    return None


def _weights_digest(result) -> str:
    return hashlib.sha256((result.output / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("step", [{"name": "quant.gptq", "config": {"group_size": 32}}, {"name": "quant.awq", "config": {"group_size": 32}}], ids=lambda s: s["name"])
def test_parked_layers_are_mapped_and_the_artifact_is_unchanged(tiny_model_dir, tmp_path, make_recipe, monkeypatch, step):
    import optforge
    from optforge.passes import onload

    mapped = []
    park = onload.park

    def spy(layer, folder, index):
        park(layer, folder, index)
        mapped.append({name: _mapped_file(t.data_ptr()) for name, t in layer.state_dict().items() if t.numel()})

    monkeypatch.setattr(onload, "park", spy)
    plain = optforge.build(make_recipe(tiny_model_dir, tmp_path / "plain", gate_pct=None, passes=[step]), cache_dir=tmp_path / "c1")
    assert mapped == []  # no host budget: nothing parked
    bounded = optforge.build(make_recipe(tiny_model_dir, tmp_path / "bounded", gate_pct=None, passes=[step]), cache_dir=tmp_path / "c2",
                             memory=MemoryBudget(host=64 << 30))
    assert len(mapped) == 2 and all(name and name.endswith(f"layer{i}.safetensors") for i, files in enumerate(mapped) for name in files.values())
    assert _weights_digest(plain) == _weights_digest(bounded)
