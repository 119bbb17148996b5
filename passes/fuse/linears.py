"""Module-level fusion for our runtime: sibling Linears (q/k/v, gate/up) run as one matmul (`fuse.linears`).

The math lives in `optforge.formats.fused`; this pass only records the fusion in optforge.json
(`fusions: [{kind: sibling_linears, groups: ...}]`) and checks it: the output's weights stay in the standard
unfused Hugging Face layout, so every consumer still loads them, and `optforge.model_io.load_model`
re-applies the fusion after loading. Checked at build time: the groups exist in the model, and the fused
forward matches the unfused one to `tolerance` on a random prompt, in the recipe's dtype on the build's device.
Passes after it that rewrite weights load the model unfused and carry the record, so the loader fuses their
output too. Limits: members fuse only where `formats.fused.can_stack` allows (dense, or quantized with per-row
scales); others are left unfused.
"""

from __future__ import annotations

import logging

from optforge.artifact import ModelArtifact, copy_model_files
from optforge.context import PassContext
from optforge.errors import PassError
from optforge.pass_ import Pass, config, option, register

log = logging.getLogger(__name__)


@config
class FuseLinearsConfig:
    groups: tuple[tuple[str, ...], ...] = option(
        (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")),
        "sibling child names fused into one matmul wherever a module has all of them (each group reads one input)",
    )
    tolerance: float = option(1e-4, "largest allowed max |logits(fused) - logits(unfused)| on a random prompt, fp32 logit units")


@register
class FuseLinears(Pass):
    """Record a q/k/v and gate/up fusion that the loader applies; check that it fires and keeps the logits."""

    name = "fuse.linears"
    version = 1
    Config = FuseLinearsConfig
    requires = frozenset({"hf_causal_lm"})
    produces = frozenset({"hf_causal_lm", "fused_linears"})

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        import torch

        from optforge.formats.fused import fuse_sibling_linears
        from optforge.passes.output import load_input, write_output

        if "fused_linears" in artifact.properties:
            raise PassError(self.name, "its input is already fused; run `fuse.linears` once")
        model, _ = load_input(artifact, ctx)
        prompt = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)).to(ctx.device)
        with torch.no_grad():
            ref = model(prompt).logits.float()
            counts = fuse_sibling_linears(model, self.config.groups)
            got = model(prompt).logits.float()
        if not any(counts.values()):
            raise PassError(self.name, f"no module has all the children of any group in {self.config.groups} as dense nn.Linear; nothing to fuse")
        diff = float((got - ref).abs().max())
        if not diff <= self.config.tolerance:
            raise PassError(self.name, f"fused logits differ from unfused by {diff:.3g} (> tolerance {self.config.tolerance:g})")
        log.info("fuse.linears: %s, max |logits diff| %.3g", counts, diff)
        copy_model_files(artifact.path, ctx.output_dir)
        fusion = {"kind": "sibling_linears", "groups": [list(g) for g in self.config.groups], "counts": counts, "max_abs_logits_diff": diff}
        return write_output(artifact, self, ctx, records={"fusions": [*artifact.layout.get("fusions", []), fusion]})
