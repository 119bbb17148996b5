"""A pass's model in and out: the input loaded as the recipe asks, and the output's optforge.json written with
every earlier pass's records carried.

Besides its core keys (`format`, `properties`, `modules`), optforge.json holds records of what the passes did
and what the loader re-applies: `architecture` (the source), `sparsity`, `structured_pruning`, `distillation`,
`fusions`, `kv_cache`, `quantization` and `precision`, `onnx`, `tensorrt`, `cpu_pack`. A pass adds its own
records to its input's. A record of an earlier pass survives every later pass, unless a later pass writes the
same key (its record then describes the current model) or names it in `drop` (a record it made untrue).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from optforge.artifact import ModelArtifact, write_layout

if TYPE_CHECKING:
    from optforge.context import PassContext
    from optforge.pass_ import Pass

CORE_KEYS = frozenset({"format", "properties", "modules"})


def load_input(artifact: ModelArtifact, ctx: "PassContext", *, fused: bool = False, onload: bool = False):
    """(model, tokenizer) of the pass's input, in the recipe's dtype on the build's device, or on the host with
    `onload` (a pass that moves one layer at a time to the device: `calibrate`, `round_weights`), its weights
    then memory-mapped from the input's files where they are stored in the recipe's dtype.

    Unfused unless `fused`: a pass that rewrites weights changes and saves the standard Linears, and its output
    carries the `fusions` record, so the loader fuses them again. A pass that only reads the model (KV-cache
    scales, exports) may load it fused, as it will be served."""
    from optforge.model_io import load_model

    return load_model(artifact.path, dtype=ctx.dtype, device="cpu" if onload else ctx.device, fusions=fused, mmap=onload)


def write_output(
    artifact: ModelArtifact,
    pass_: "Pass",
    ctx: "PassContext",
    *,
    records: dict | None = None,
    modules: dict[str, dict] | None = None,
    properties: Iterable[str] = (),
    drop: Iterable[str] = (),
) -> ModelArtifact:
    """Write optforge.json into ctx.output_dir, whose model files the pass has written, and open the output.

    `records`: this pass's entries. `modules`: the output's quantized modules (None keeps the input's).
    `properties`: added to (input's - pass.removes) | pass.produces. `drop`: earlier records made untrue."""
    dropped = CORE_KEYS | set(drop)
    layout = {key: value for key, value in artifact.layout.items() if key not in dropped}
    layout.update(records or {})
    props = (artifact.properties - pass_.removes) | pass_.produces | set(properties)
    write_layout(ctx.output_dir, properties=props, modules=artifact.quantized_modules if modules is None else modules, extra=layout)
    return ModelArtifact.open(ctx.output_dir)


def save_output(model, tokenizer, artifact: ModelArtifact, pass_: "Pass", ctx: "PassContext", **layout) -> ModelArtifact:
    """Save `model` (config, tokenizer, one safetensors file) into ctx.output_dir, then `write_output(**layout)`."""
    from optforge.model_io import save_model

    save_model(model, tokenizer, ctx.output_dir)
    return write_output(artifact, pass_, ctx, **layout)
