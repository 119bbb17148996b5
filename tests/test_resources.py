"""Peak host memory: the process's own memory is sampled while a block runs; mapped file pages are not counted in it."""

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_anonymous_peak_sees_a_freed_buffer_and_not_mapped_file_pages(tmp_path):
    # a fresh process: the test process's heap may already hold free chunks a buffer would reuse
    script = textwrap.dedent("""
        import json, sys, time
        import torch
        from optforge.resources import PeakMemory, anonymous_bytes, resident_bytes
        from optforge.tensor_files import mmap_safetensors
        from safetensors.torch import save_file

        save_file({"w": torch.ones(64 << 20, dtype=torch.uint8)}, sys.argv[1])  # 64 MiB of file
        base = anonymous_bytes()
        with PeakMemory("cpu") as held:
            x = torch.ones(32 << 20)  # 128 MiB, freed before the block ends
            time.sleep(0.2)
            del x
        resident = resident_bytes()
        with PeakMemory("cpu") as mapped:
            w = mmap_safetensors(sys.argv[1])["w"]
            total = int(w[::4096].sum())  # one byte of every page read
        print(json.dumps([held.result()["host_anonymous_peak_bytes"] - base, mapped.result()["host_anonymous_peak_bytes"] - base,
                          mapped.result()["host_peak_bytes"] - resident, total]))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "w.safetensors")], capture_output=True, text=True, check=True).stdout
    held, mapped, resident, total = __import__("json").loads(out.splitlines()[-1])
    assert total == (64 << 20) // 4096
    assert held >= 120 << 20  # the 128 MiB buffer, though gone at the block's end
    assert mapped < 32 << 20  # reading 64 MiB of mapped file is not the process's own memory
    assert resident >= 60 << 20  # but it is in the resident set
