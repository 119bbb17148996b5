"""Knowledge distillation: train a pruned (or otherwise changed) student to match its teacher.

Loss per token (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015): T^2 * KL(p_t || p_s)
with both distributions softened by temperature T. The teacher's distribution is its top-k logits
renormalized (cached by content, see `teacher.py`); the student's log-probabilities are over the full
vocabulary, gathered at the teacher's top-k tokens. Optionally plus `hidden_weight` * MSE between the final
(normed) hidden states, which have the same width after MLP/head/depth pruning.

Deterministic for a given seed on a given device: the window order is drawn from a seeded generator per
epoch, and the model has no dropout. Resumable: every `checkpoint_every` steps the student, the optimizer
and the step are saved under the build cache (`<cache>/distill-checkpoints/<key>/`); a rerun of the same
pass on the same input continues from the last checkpoint. Memory: the teacher is loaded only to fill the
cache, then freed; training holds one model, its AdamW state and the cached top-k targets.
Limits: the student and teacher must share the tokenizer; text is the recipe's calibration rows.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time

import torch
import torch.nn.functional as F

from optforge.artifact import ModelArtifact
from optforge.context import PassContext
from optforge.errors import PassError
from optforge.hashing import sha256_json
from optforge.pass_ import Pass, config, option, register

log = logging.getLogger(__name__)


@config
class KDConfig:
    teacher: str = option("source", "'source' (the recipe's source model, before any pass) or a path to an optforge model directory")
    temperature: float = option(1.0, "softmax temperature of teacher and student, > 0")
    hidden_weight: float = option(0.0, "weight of the final-hidden-state MSE term; 0 disables it")
    top_k: int = option(64, "teacher logits kept per token (cached), in [1, vocab]")
    steps: int = option(200, "optimizer steps, > 0")
    batch_size: int = option(4, "windows per step, > 0")
    seq_len: int = option(256, "tokens per window, > 1")
    lr: float = option(5e-5, "AdamW peak learning rate (linear warmup, cosine decay to 10%)")
    warmup_steps: int = option(10, "linear warmup steps, >= 0")
    weight_decay: float = option(0.0, "AdamW weight decay")
    freeze: tuple[str, ...] = option((r"embed_tokens", r"lm_head"), "regexes of parameter names kept frozen")
    max_windows: int | None = option(None, "use only the first N windows of the calibration text; None uses all of it")
    seed: int = option(0, "seed for the window order")
    checkpoint_every: int = option(50, "steps between resumable checkpoints; 0 disables them")
    log_every: int = option(10, "steps between progress log lines (loss, tokens/s)")


def kd_loss(student_logits: torch.Tensor, top_values: torch.Tensor, top_indices: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of T^2 * KL(teacher top-k || student). Shapes: (N, V), (N, k), (N, k)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, top_indices.long())
    log_p = F.log_softmax(top_values.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature**2


def _lr_at(step: int, cfg: KDConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def window_order(num_windows: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """(steps, batch_size) window indices: seeded permutations, one per epoch, concatenated."""
    need = steps * batch_size
    perms = [torch.randperm(num_windows, generator=torch.Generator().manual_seed(seed * 100003 + epoch)) for epoch in range(-(-need // num_windows))]
    return torch.cat(perms)[:need].view(steps, batch_size)


@register
class KnowledgeDistillation(Pass):
    name = "distill.kd"
    version = 1
    Config = KDConfig
    uses_calibration = True
    requires = frozenset({"hf_causal_lm", "float_weights"})
    produces = frozenset({"hf_causal_lm", "float_weights", "distilled"})

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        from optforge.passes.calibration import token_windows
        from optforge.passes.distill.teacher import cache_root, cached_teacher_targets, resolve_teacher
        from optforge.passes.output import load_input, save_output

        cfg = self.config
        self._validate()
        root = cache_root(ctx)
        student, tokenizer = load_input(artifact, ctx)
        windows = token_windows(tokenizer, ctx.calibration_texts(), num_samples=cfg.max_windows, seq_len=cfg.seq_len, pass_name=self.name)
        teacher = resolve_teacher(cfg.teacher, ctx, root)
        targets, hit = cached_teacher_targets(teacher, windows, top_k=cfg.top_k, with_hidden=cfg.hidden_weight > 0, root=root, dtype=ctx.dtype, device=ctx.device)
        if int(targets.indices.max()) >= student.config.vocab_size:
            raise PassError(self.name, f"teacher {teacher.path} predicts token ids beyond the student's vocabulary ({student.config.vocab_size}); teacher and student must share a tokenizer")
        run_key = sha256_json({"input": artifact.digest, "teacher": teacher.digest, "config": dataclasses.asdict(cfg), "windows": list(windows.shape), "v": self.version})
        ckpt_dir = root / "distill-checkpoints" / run_key if root and cfg.checkpoint_every else None
        keep_zeros = "sparse_weights" in artifact.properties  # a pruned sparsity pattern survives training
        summary = self._train(student, windows, targets, ctx, ckpt_dir, keep_zeros)
        summary.update({"teacher": str(teacher.path), "teacher_digest": teacher.digest, "teacher_cache_hit": hit, "windows": windows.shape[0], "device": ctx.device})
        output = save_output(student, tokenizer, artifact, self, ctx, records={"distillation": summary})
        if ckpt_dir is not None:
            _remove_checkpoint(ckpt_dir)
        return output

    def _validate(self) -> None:
        cfg = self.config
        if cfg.temperature <= 0 or cfg.steps <= 0 or cfg.batch_size <= 0 or cfg.top_k <= 0 or cfg.seq_len <= 1:
            raise PassError(self.name, f"temperature, steps, batch_size, top_k must be > 0 and seq_len > 1 (found {cfg})")

    def _train(self, model, windows, targets, ctx: PassContext, ckpt_dir, keep_zeros: bool) -> dict:
        cfg = self.config
        frozen = [re.compile(p) for p in cfg.freeze]
        params = []
        for name, p in model.named_parameters():
            p.requires_grad_(not any(f.search(name) for f in frozen))
            if p.requires_grad:
                params.append(p)
        if not params:
            raise PassError(self.name, f"freeze={cfg.freeze} freezes every parameter; nothing to train")
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        zero_masks = [(p, p.detach() == 0) for p in params if p.dim() == 2] if keep_zeros else []
        start = _load_checkpoint(ckpt_dir, model, optimizer)
        order = window_order(windows.shape[0], cfg.steps, cfg.batch_size, cfg.seed)
        model.train()
        advance = ctx.progress(self.name, cfg.steps)
        advance(start)
        losses, t0, tokens = [], time.perf_counter(), 0
        for step in range(start, cfg.steps):
            idx = order[step]
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, cfg)
            loss = self._step(model, windows[idx].to(ctx.device), targets, idx, ctx.device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            with torch.no_grad():
                for p, mask in zero_masks:
                    p.masked_fill_(mask, 0.0)
            losses.append(loss.item())
            tokens += idx.numel() * cfg.seq_len
            advance(1)
            if cfg.log_every and (step + 1) % cfg.log_every == 0:
                recent = losses[-cfg.log_every :]
                log.info("distill step %d/%d loss %.4f  %.0f tokens/s", step + 1, cfg.steps, sum(recent) / len(recent), tokens / (time.perf_counter() - t0))
            if ckpt_dir is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                _save_checkpoint(ckpt_dir, model, optimizer, step + 1)
        model.eval()
        seconds = time.perf_counter() - t0
        head = losses[: max(1, len(losses) // 10)]
        tail = losses[-max(1, len(losses) // 10) :]
        return {"steps": cfg.steps, "resumed_from_step": start, "tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1) if seconds else None, "loss_first": sum(head) / len(head) if losses else None, "loss_last": sum(tail) / len(tail) if losses else None}

    def _step(self, model, ids, targets, idx, device) -> torch.Tensor:
        cfg = self.config
        h = model.model(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, D)
        logits = model.lm_head(h)  # (B, T, V)
        vals = targets.values[idx].to(device)  # (B, T, k)
        inds = targets.indices[idx].to(device)
        loss = kd_loss(logits.reshape(-1, logits.shape[-1]), vals.reshape(-1, vals.shape[-1]), inds.reshape(-1, inds.shape[-1]), cfg.temperature)
        if cfg.hidden_weight > 0:
            loss = loss + cfg.hidden_weight * F.mse_loss(h.float(), targets.hidden[idx].to(device).float())
        return loss


def _save_checkpoint(ckpt_dir, model, optimizer, step: int) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f"state.pt.tmp{os.getpid()}"
    torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp)
    os.replace(tmp, ckpt_dir / "state.pt")
    log.info("distill checkpoint at step %d: %s", step, ckpt_dir)


def _load_checkpoint(ckpt_dir, model, optimizer) -> int:
    path = ckpt_dir / "state.pt" if ckpt_dir is not None else None
    if path is None or not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    log.info("distill resumed from step %d (%s)", state["step"], path)
    return int(state["step"])


def _remove_checkpoint(ckpt_dir) -> None:
    state = ckpt_dir / "state.pt"
    if state.is_file():
        state.unlink()
    if ckpt_dir.is_dir() and not any(ckpt_dir.iterdir()):
        ckpt_dir.rmdir()
