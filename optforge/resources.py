"""Memory a build may use and memory it did use: sizes as users write them, the budgets of `--max-device-memory`
and `--max-host-memory`, and the peak device and host memory of a pass.

Peak device memory is what torch's CUDA allocator handed out (`torch.cuda.max_memory_allocated`, reset when
the block starts). On the host two peaks: the process's own memory (anonymous pages, RssAnon, sampled every
20 ms: what `--max-host-memory` bounds and what the build summary prints) and its peak resident set (VmHWM,
reset through /proc/self/clear_refs when the block starts), which also counts the pages of memory-mapped model
files, clean copies the kernel drops under pressure. Both include the interpreter and libraries.
"""

from __future__ import annotations

import gc
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from optforge.errors import UserInputError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str, option: str = "--kv-cache-memory") -> int:
    """'2GiB', '512MiB', '1.5GB' or a plain number of bytes -> bytes; `option` names the flag in the error."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise UserInputError(f"{option} {text!r}: expected a size such as 2GiB, 512MiB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[unit])


def gib(n: float) -> str:
    """Bytes as users read them: '1.73 GiB', '512 MiB'."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@dataclass(frozen=True)
class MemoryBudget:
    """What a build may hold: on the device (torch's allocations) and on the host (the process's own memory, RssAnon).
    None: no limit."""

    device: int | None = None
    host: int | None = None

    @classmethod
    def parse(cls, device: str | None, host: str | None) -> "MemoryBudget":
        return cls(None if device is None else parse_bytes(device, "--max-device-memory"), None if host is None else parse_bytes(host, "--max-host-memory"))


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def return_freed_memory(threshold: int = 2**20) -> bool:
    """Have glibc serve allocations of `threshold` bytes or more from their own mappings, which go back to the
    system when freed. By default glibc raises that threshold as large blocks are freed, after which a pass's
    per-Linear temporaries (float32 copies, integer codes) come from the heap and stay in the resident set,
    interleaved with the quantized weights kept: on a 0.6B-parameter CPU build, about 0.6 GiB of freed memory
    still held. Returns whether it took effect (glibc on Linux only; a no-op elsewhere)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def resident_bytes() -> int:
    """The process's resident set now (Linux /proc; 0 where it cannot be read)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def _status_bytes(field: str) -> int | None:
    """A size field of /proc/self/status ("RssAnon", "VmHWM") in bytes; None where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def anonymous_bytes() -> int:
    """The process's own memory now (RssAnon: not file pages; Linux /proc), or its resident set where unreadable."""
    found = _status_bytes("RssAnon")
    return resident_bytes() if found is None else found


def _host_peak_bytes() -> int:
    """The process's peak resident set (VmHWM) since the last reset, or since it started; 0 where unreadable."""
    return _status_bytes("VmHWM") or 0


class PeakMemory:
    """Context manager measuring the peak device and host memory of what runs inside it.

    `result()` -> {"device": "cuda", "device_peak_bytes": ..., "device_start_bytes": ..., "host_peak_bytes": ...,
    "host_anonymous_peak_bytes": ...} (the device entries only where the device is a CUDA device; the peak is what
    torch held at most, the start what it already held when the block began)."""

    interval = 0.02  # seconds between samples of the process's anonymous memory

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.device = device
        self.host_peak = self.anonymous_peak = 0
        self.device_peak: int | None = None
        self.device_start = 0
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def _sample(self) -> None:
        while True:
            self.anonymous_peak = max(self.anonymous_peak, anonymous_bytes())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakMemory":
        gc.collect()  # what earlier work left unreachable is not this block's
        if self.cuda:
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.device_start = int(torch.cuda.memory_allocated(self.device))
        try:  # Linux: writing 5 resets the process's peak resident set (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self._sampler = threading.Thread(target=self._sample, name="optforge-peak-memory", daemon=True)
        self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._sampler.join()
        self.anonymous_peak = max(self.anonymous_peak, anonymous_bytes())
        self.host_peak = max(_host_peak_bytes(), resident_bytes())
        if self.cuda:
            import torch

            self.device_peak = int(torch.cuda.max_memory_allocated(self.device))

    def result(self) -> dict:
        out: dict = {"host_peak_bytes": self.host_peak, "host_anonymous_peak_bytes": self.anonymous_peak}
        if self.device_peak is not None:
            out |= {"device": self.device, "device_peak_bytes": self.device_peak, "device_start_bytes": self.device_start}
        return out
