"""TensorRT engine from the exported ONNX (`export.tensorrt`). NOT exercised on the machines of this project.

TensorRT's builder cannot be installed here (its libs download from NVIDIA's own index), so this file follows
the TensorRT 10 Python API documentation and has never built an engine. Without an importable `tensorrt`
the pass fails while the recipe is being validated, before any model is loaded or any path is written:
MissingDependencyError, exit code 2, naming what to install. Where it runs, it:
parses `model.onnx` (external data beside it) and reports every parser error with its node; builds one
optimization profile over the recipe's batch/sequence/past ranges; uses a strongly typed network for QDQ
graphs (types come from the graph) and the fp16/bf16/fp8 builder flags otherwise; limits the workspace;
reuses a timing cache file across builds; writes `model.plan`, the engine inspector's JSON, and the TensorRT
version and GPU compute capability in optforge.json; and checks logits against PyTorch (the recipe's dtype, on
the GPU) through `optforge.runtime.tensorrt_runner` (see that file). Input must be the unfused export:
onnxruntime's contrib operators (`fuse.onnx_graph`) are not ONNX standard ops and TensorRT's parser rejects them.
It runs with `--device cuda` only: TensorRT has no CPU engines, so the build refuses another device while it
validates the recipe (RecipeError, exit 2).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from optforge.artifact import ModelArtifact, copy_model_files
from optforge.context import PassContext
from optforge.errors import PassError
from optforge.formats.tensorrt import INSPECTOR_FILE, PLAN_FILE, import_tensorrt
from optforge.pass_ import Pass, config, option, register

log = logging.getLogger(__name__)

@config
class TensorRTConfig:
    precision: Literal["fp32", "fp16", "bf16", "fp8"] = option("fp16", "builder precision flag for graphs without QDQ; QDQ graphs build strongly typed and ignore it")
    batch: tuple[int, int, int] = option((1, 1, 8), "optimization profile (min, opt, max) of the batch dimension")
    sequence: tuple[int, int, int] = option((1, 128, 512), "profile (min, opt, max) of new tokens per step: 1 is decode, more is prefill")
    past: tuple[int, int, int] = option((0, 128, 1024), "profile (min, opt, max) of cached tokens (past length)")
    workspace_mib: int = option(4096, "builder workspace limit (MemoryPoolType.WORKSPACE), MiB")
    timing_cache: str = option("~/.cache/optforge/tensorrt/timing.cache", "timing cache file, read before and written after each build (shared across builds)")
    parity_tolerance: float = option(5e-2, "largest allowed max |logits(TensorRT) - logits(PyTorch in the recipe's dtype)|; fp16 kernels need more than fp32")

    def __post_init__(self):
        for name in ("batch", "sequence", "past"):
            lo, opt, hi = getattr(self, name)
            if not 0 <= lo <= opt <= hi:
                raise ValueError(f"{name}: expected min <= opt <= max, found {[lo, opt, hi]}")


def profile_shapes(cfg: TensorRTConfig, onnx_info: dict) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shapes of every dynamic input."""
    kv = (onnx_info["num_kv_heads"], onnx_info["head_dim"])
    shapes = {}
    for name in ("input_ids", "position_ids"):
        shapes[name] = tuple((b, s) for b, s in zip(cfg.batch, cfg.sequence))
    for row in onnx_info["inputs"]:
        if row["name"].startswith("past_key_values."):
            shapes[row["name"]] = tuple((b, kv[0], p, kv[1]) for b, p in zip(cfg.batch, cfg.past))
    return shapes


def parse_onnx(trt, builder, logger, onnx_path: Path, *, strongly_typed: bool):
    """A network from `onnx_path`; raises PassError listing each parser error with its node."""
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so the parser finds model.onnx.data next to the graph.
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            errors.append(f"node {err.node()} ({err.node_name()}, {err.node_operator()}): {err.desc()}")
        raise PassError("export.tensorrt", f"TensorRT's ONNX parser rejected {onnx_path.name}: " + "; ".join(errors))
    return network, parser


def build_engine(trt, cfg: TensorRTConfig, onnx_path: Path, onnx_info: dict) -> tuple[bytes, str]:
    """Serialized plan and the engine inspector's JSON."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = onnx_info.get("num_qdq_matmuls", 0) > 0
    network, _parser = parse_onnx(trt, builder, logger, onnx_path, strongly_typed=strongly_typed)
    bconfig = builder.create_builder_config()
    bconfig.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib << 20)
    # Strongly typed networks take precisions from the graph; the builder rejects precision flags on them
    # (TensorRT developer guide, "Strongly Typed Networks").
    if not strongly_typed and cfg.precision != "fp32":
        bconfig.set_flag({"fp16": trt.BuilderFlag.FP16, "bf16": trt.BuilderFlag.BF16, "fp8": trt.BuilderFlag.FP8}[cfg.precision])
    # DETAILED keeps per-layer names, tactics and formats for the engine inspector.
    bconfig.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(cfg, onnx_info).items():
        profile.set_shape(name, lo, opt, hi)
    bconfig.add_optimization_profile(profile)
    cache_path = Path(cfg.timing_cache).expanduser()
    blob = cache_path.read_bytes() if cache_path.is_file() else b""
    timing_cache = bconfig.create_timing_cache(blob)
    # ignore_mismatch=False: a cache from another GPU or TensorRT version is refused, not silently used.
    bconfig.set_timing_cache(timing_cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, bconfig)
    if plan is None:
        raise PassError("export.tensorrt", "TensorRT's builder returned no engine; rerun with --verbose for the builder log")
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_bytes(memoryview(bconfig.get_timing_cache().serialize()))
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    inspector = engine.create_engine_inspector()
    return bytes(memoryview(plan)), inspector.get_engine_information(trt.LayerInformationFormat.JSON)


@register
class TensorRTExport(Pass):
    """Build a TensorRT engine from the exported ONNX (needs TensorRT and a CUDA GPU)."""

    name = "export.tensorrt"
    version = 1
    Config = TensorRTConfig
    requires = frozenset({"hf_causal_lm", "onnx_graph"})
    produces = frozenset({"hf_causal_lm", "onnx_graph", "tensorrt_engine"})
    devices = frozenset({"cuda"})
    unsupported_why = "TensorRT builds and runs its engines on a CUDA GPU only"

    def preflight(self) -> None:
        import_tensorrt()  # without TensorRT the build stops at recipe validation, before it loads anything

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        import torch

        from optforge.passes.output import write_output

        trt = import_tensorrt()
        info = artifact.layout.get("onnx") or {}
        if info.get("fused"):
            raise PassError(self.name, "its input graph holds onnxruntime contrib operators (`fuse.onnx_graph`); put `export.tensorrt` before `fuse.onnx_graph`")
        if not torch.cuda.is_available():
            raise PassError(self.name, "TensorRT builds engines on a CUDA GPU and none is visible")
        plan, inspector_json = build_engine(trt, self.config, artifact.path / info["file"], info)
        copy_model_files(artifact.path, ctx.output_dir)
        (ctx.output_dir / PLAN_FILE).write_bytes(plan)
        (ctx.output_dir / INSPECTOR_FILE).write_text(inspector_json)
        parity = self._parity(ctx.output_dir, artifact, ctx)
        record = {
            "plan_file": PLAN_FILE, "inspector_file": INSPECTOR_FILE, "tensorrt_version": trt.__version__,
            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())), "gpu": torch.cuda.get_device_name(),
            "precision": self.config.precision, "strongly_typed": info.get("num_qdq_matmuls", 0) > 0,
            "profile": {k: list(v) for k, v in profile_shapes(self.config, info).items() if not k.startswith("past_key_values.") or k.endswith("0.key")},
            "parity": parity,
        }
        log.info("export.tensorrt: %s", json.dumps(parity))
        return write_output(artifact, self, ctx, records={"tensorrt": record})

    def _parity(self, out_dir: Path, artifact: ModelArtifact, ctx: PassContext) -> dict:
        import torch

        from optforge.passes.export.onnx_export import make_cache_wrapper, sample_inputs
        from optforge.passes.output import load_input
        from optforge.runtime.tensorrt_runner import TensorRTCausalLM

        model, _ = load_input(artifact, ctx, fused=True)  # the recipe's dtype, on the GPU
        runner = TensorRTCausalLM(out_dir / PLAN_FILE)
        ids, pos, cache = sample_inputs(model.config, batch=1, seq=5, past=0, dtype=model.dtype, seed=1, device=model.device)
        with torch.no_grad():
            ref = make_cache_wrapper(model)(ids, pos, cache)[0]
        got, _ = runner.forward(ids, pos, [t for pair in cache for t in pair])
        diff = float((got.float() - ref.float()).abs().max())
        if not diff <= self.config.parity_tolerance:
            raise PassError(self.name, f"TensorRT logits differ from PyTorch by {diff:.3g} (> parity_tolerance {self.config.parity_tolerance:g})")
        return {"max_abs_logits_diff": diff, "tolerance": self.config.parity_tolerance}
