"""The teacher side of distillation: which model teaches, and its logits cached by content.

The cache entry is keyed by (teacher digest, sha256 of the token windows, top-k, hidden flag), so a second
student distilled from the same teacher on the same text skips every teacher forward pass. Only the top-k
logits per token are stored (fp16 values, int32 indices): the full vocabulary would take vocab x 4 bytes per
token (196 KB for SmolLM2), the top 64 take 384 bytes and hold nearly all of the teacher's probability mass.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from optforge.artifact import ModelArtifact
from optforge.hashing import sha256_json

log = logging.getLogger(__name__)

TEACHER_CACHE_VERSION = 1


@dataclass
class TeacherTargets:
    """Teacher outputs for every window: top-k logits (N, T, k) or None, and final hidden states (N, T, D) or None."""

    values: torch.Tensor | None
    indices: torch.Tensor | None
    hidden: torch.Tensor | None


def cache_root(ctx) -> Path | None:
    """The build's cache directory: `ctx.cache_dir` where the context has one, else inferred from where the
    pipeline stages pass outputs (<cache>/passes/<tmp>); None when the pass runs outside a build."""
    explicit = getattr(ctx, "cache_dir", None)
    if explicit:
        return Path(explicit)
    out = Path(ctx.output_dir).resolve()
    return out.parent.parent if out.parent.name == "passes" else None


def resolve_teacher(spec: str, ctx, root: Path | None) -> ModelArtifact:
    """'source' -> the recipe's normalized source model; anything else is an optforge model directory."""
    if spec == "source":
        from optforge.cache import Cache
        from optforge.sources import resolve_source

        artifact, _ = resolve_source(ctx.model, Cache(root))
        return artifact
    return ModelArtifact.open(spec)


def _windows_digest(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes() + str(tuple(windows.shape)).encode()).hexdigest()


@torch.no_grad()
def teacher_targets(teacher_model, windows: torch.Tensor, *, top_k: int, with_hidden: bool, batch_size: int, device: str) -> TeacherTargets:
    values, indices, hidden = [], [], []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        h = teacher_model.model(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, D)
        logits = teacher_model.lm_head(h).float()  # (B, T, V)
        top = logits.topk(top_k, dim=-1)
        values.append(top.values.half().cpu())
        indices.append(top.indices.int().cpu())
        if with_hidden:
            hidden.append(h.half().cpu())
    return TeacherTargets(torch.cat(values), torch.cat(indices), torch.cat(hidden) if with_hidden else None)


def cached_teacher_targets(teacher: ModelArtifact, windows: torch.Tensor, *, top_k: int, with_hidden: bool, root: Path | None, dtype: str, device: str, batch_size: int = 8) -> tuple[TeacherTargets, bool]:
    """Teacher targets from the cache, or computed (and stored when there is a cache). Returns (targets, hit)."""
    from safetensors.torch import load_file, save_file

    key = sha256_json({"teacher": teacher.digest, "windows": _windows_digest(windows), "top_k": top_k, "hidden": with_hidden, "v": TEACHER_CACHE_VERSION})
    path = root / "teacher-logits" / f"{key}.safetensors" if root else None
    if path is not None and path.is_file():
        state = load_file(path)
        return TeacherTargets(state["values"], state["indices"], state.get("hidden")), True
    from optforge.model_io import load_model

    model, _ = load_model(teacher.path, dtype=dtype, device=device)
    targets = teacher_targets(model, windows, top_k=top_k, with_hidden=with_hidden, batch_size=batch_size, device=device)
    del model
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"values": targets.values, "indices": targets.indices}
        if targets.hidden is not None:
            state["hidden"] = targets.hidden
        tmp = path.with_suffix(".tmp")
        save_file(state, tmp)
        tmp.replace(path)
        log.info("teacher logits cached: %s (%.1f MB)", path.name[:16], path.stat().st_size / 1e6)
    return targets, False
