"""safetensors written one tensor at a time and read memory-mapped (optforge/tensor_files.py), against the
safetensors library's own reader and writer."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from optforge.tensor_files import mmap_safetensors, read_header, write_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "w.f32": torch.randn(7, generator=g),
        "scale": torch.tensor(0.25),  # 0-dim
        "codes": torch.randint(-128, 127, (3, 5), generator=g, dtype=torch.int8),
        "packed": torch.randint(0, 2**31 - 1, (2, 4), generator=g, dtype=torch.int32),
        "fp8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "strided": torch.arange(12.0).reshape(3, 4).T,  # not contiguous
    }


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a, b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)


def test_written_file_reads_back_in_safetensors_and_mapped(tmp_path):
    tensors = _tensors()
    write_safetensors(tmp_path / "m.safetensors", tensors, metadata={"format": "pt"})
    theirs, mapped = load_file(tmp_path / "m.safetensors"), mmap_safetensors(tmp_path / "m.safetensors")
    assert set(theirs) == set(mapped) == set(tensors)
    assert all(_equal(theirs[k], tensors[k]) and _equal(mapped[k], tensors[k]) for k in tensors)
    start, header = read_header(tmp_path / "m.safetensors")
    assert start % 8 == 0 and all((start + e["data_offsets"][0]) % mapped[k].dtype.itemsize == 0 for k, e in header.items())


def test_mapped_tensors_share_the_file_mapping_and_writes_stay_private(tmp_path):
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"a": torch.ones(1024), "b": torch.zeros(256, dtype=torch.bfloat16)})
    mapped = mmap_safetensors(path)
    assert mapped["a"].untyped_storage().data_ptr() == mapped["b"].untyped_storage().data_ptr()  # one mapping, views into it
    mapped["a"].mul_(3.0)  # copy-on-write: the pass's change is its own
    assert torch.equal(mapped["a"], torch.full((1024,), 3.0))
    assert torch.equal(load_file(path)["a"], torch.ones(1024)) and torch.equal(mmap_safetensors(path)["a"], torch.ones(1024))


def test_files_of_other_writers_read_at_any_offset(tmp_path):
    odd = {"a": torch.ones(3, dtype=torch.bfloat16), "b": torch.arange(5, dtype=torch.float32), "c": torch.ones(1, dtype=torch.int8)}
    save_file(odd, tmp_path / "o.safetensors")
    mapped = mmap_safetensors(tmp_path / "o.safetensors")
    assert all(_equal(mapped[k], odd[k]) for k in odd)


def test_mapped_model_loads_as_the_copied_one_and_saves_the_same_file(tiny_model_dir, tmp_path):
    from optforge.model_io import load_model, save_model

    copied, tokenizer = load_model(tiny_model_dir)
    mapped, _ = load_model(tiny_model_dir, mmap=True)
    ids = torch.tensor([[1, 5, 9, 200, 17, 3]])
    with torch.no_grad():
        assert torch.equal(copied(ids).logits, mapped(ids).logits)
    storages = {p.untyped_storage().data_ptr() for n, p in mapped.named_parameters() if "layers" in n}
    assert len(storages) == 1  # every decoder weight a view of the one mapped file
    save_model(mapped, tokenizer, tmp_path / "a")
    save_model(copied, tokenizer, tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_freed_large_buffers_leave_the_resident_set():
    """After `return_freed_memory` (glibc on Linux), freed 16 MiB buffers go back to the system at once. In a fresh
    process: a long one holds free heap chunks that glibc reuses before it maps anything new."""
    import json
    import subprocess
    import sys

    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt: Linux only")
    code = (
        "import json, torch\n"
        "from optforge.resources import resident_bytes, return_freed_memory\n"
        "ok = return_freed_memory()\n"
        "before = resident_bytes()\n"
        "buffers = [torch.ones(2**22) for _ in range(4)]\n"
        "held = resident_bytes() - before\n"
        "del buffers\n"
        "print(json.dumps([ok, held, resident_bytes() - before]))\n"
    )
    ok, held, left = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert ok and held >= 60 * 2**20 and left < 8 * 2**20
