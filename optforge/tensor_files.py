"""safetensors files without a whole-model copy in host memory: written one tensor at a time, read memory-mapped.

`safetensors.torch.save_file` turns every tensor into a Python bytes object before writing, so saving holds a
second copy of the model; `load_file` copies every tensor into anonymous memory. For a model the size of the host's
memory (a 70B build keeps the model on the host while layers visit the GPU) both matter:

- `write_safetensors` writes the header, then each tensor's bytes straight from its storage (a contiguous copy
  only of a tensor that is not contiguous), in the safetensors layout (8-byte little-endian header length, JSON
  header padded to 8 bytes, data in the order of the header's offsets). Tensors go in descending element size so
  every offset is aligned for its dtype, which lets `mmap_safetensors` view them in place.
- `mmap_safetensors` maps the file copy-on-write (`torch.UntypedStorage.from_file(shared=False)`): tensors are
  views whose pages the kernel reads on first touch and may drop again under memory pressure (they stay clean
  file pages); a pass that changes a weight in place gets private pages for what it writes, the file is never
  modified. A tensor at an offset its dtype cannot view (files from other writers) is copied.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
CODES = {code: dtype for dtype, code in DTYPES.items()}


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (on any device; copied to the host one at a time) as a safetensors file at `path`."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key in order:
        t = tensors[key]
        if t.dtype not in DTYPES:
            raise ValueError(f"tensor '{key}': dtype {t.dtype} has no safetensors code")
        size = t.numel() * t.element_size()
        header[key] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key in order:
            t = tensors[key].detach()
            if t.numel():
                f.write(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def read_header(path: str | Path) -> tuple[int, dict]:
    """(byte offset of the data, header without `__metadata__`) of a safetensors file."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


def mmap_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the file, as copy-on-write memory-mapped views (host memory is spent only on what is written)."""
    start, header = read_header(path)
    size = Path(path).stat().st_size
    data = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size))
    out = {}
    for key, entry in header.items():
        dtype = CODES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor '{key}' has dtype {entry['dtype']}, which optforge does not read")
        begin, end = (start + o for o in entry["data_offsets"])
        raw = data[begin:end]
        if begin % dtype.itemsize:
            raw = raw.clone()  # misaligned for a view of its dtype
        out[key] = raw.view(dtype).reshape(entry["shape"])
    return out
