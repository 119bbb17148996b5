"""The forward of a Llama-family, Gemma-3 or mixture-of-experts (Qwen3-MoE, Mixtral) decoder over the paged KV cache.

The forward is ours; the weights and modules are the HF model's (q/k/v/o projections, which may be the
quantized Linear modules of an artifact, MLP, norms, and HF's rotary module, so rope scaling follows the
config). What differs by model family (attention windows, rotary per layer type, attention scale, logit cap)
is read by runtime/architectures.py. A layer runs in one of three forms:
- the HF modules one by one (CPU, Gemma-3's norms around attention and MLP, sliding-window models, MoE
  models, whose sparse blocks run as HF's modules route them, and models the fused forms do not take);
- fused (CUDA with Triton): q/k/v and gate/up as one matmul each, dense or quantized with per-row scales,
  residual+RMSNorm, rotary+KV write and SiLU*up as Triton kernels;
- batch-1 decode in six launches per layer (`kernels/fused_decode.py`), where every projection is dense in
  the model dtype or per-channel int8.
Attention is the caller's `attend(layer, q)` (runtime/attention.py); the KV cache is the caller's tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from optforge.formats.kv_cache import kv_kernel_args, stored_kv
from optforge.runtime.architectures import SUPPORTED_MODEL_TYPES, binding_windows, read_architecture
from optforge.runtime.kernels.decode_options import DecodeKernelOptions

__all__ = ["Decoder", "SUPPORTED_MODEL_TYPES"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Decoder:
    """The model's weights in the forms its forward paths need (`fused`, `decode_weights`: None where a form
    does not apply), and those paths."""

    def __init__(self, model: nn.Module):
        cfg = model.config
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.arch = read_architecture(cfg, self.head_dim)  # UserInputError for a model the runtime cannot run
        self.model, self.config = model, cfg
        self.base = model.model
        self.layers = list(self.base.layers)
        self.device = self.base.embed_tokens.weight.device
        self.dtype = self.base.embed_tokens.weight.dtype
        tp = getattr(model, "tensor_parallel", 1)  # this rank's share of the heads (runtime/tensor_parallel.py)
        self.num_heads = cfg.num_attention_heads // tp
        self.num_kv_heads = (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) // tp
        self.scale = self.arch.scale
        # Gemma: a norm on the attention output and one before and after the MLP, each before its residual add
        self.has_sandwich_norms = hasattr(self.layers[0], "pre_feedforward_layernorm")
        self.kv = stored_kv(model)  # the artifact's FP8/INT8 KV cache, or None: K/V in the model dtype
        self.fused: list[dict] | None = None
        self.decode_weights: dict | None = None

    # ---- weights ------------------------------------------------------------------------------------
    def fuse(self, max_model_len: int) -> None:
        """Build the fused forms where they apply (CUDA with Triton). The runner calls this after allocating the
        KV cache, whose size may follow the free memory: stacking the weights moves memory around. A model with
        a window that hides keys within `max_model_len` keeps the HF modules: the fused forms attend to every key."""
        if any(binding_windows(self.arch.windows, max_model_len)):
            self.fused = self.decode_weights = None
            return
        self.fused = self._fuse_weights()
        self.decode_weights = self._decode_weights(max_model_len) if self.fused is not None else None

    def _fuse_weights(self) -> list[dict] | None:
        """One q|k|v and one gate|up module per layer, dense or quantized (`stack_linears`); the HF modules keep
        views into the stacked tensors, so no second copy of the weights stays alive."""
        from optforge.formats.fused import can_stack, stack_linears

        if self.arch.is_moe or self.has_sandwich_norms or getattr(self.config, "hidden_act", None) != "silu":
            return None  # MoE: no single gate|up to stack in a sparse block
        fused = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            groups = {"qkv": [attn.q_proj, attn.k_proj, attn.v_proj], "gate_up": [mlp.gate_proj, mlp.up_proj]}
            if not all(can_stack(g) for g in groups.values()) or not _per_head_norms(attn, self.head_dim):
                return None
            fused.append({key: stack_linears(mods, share=True) for key, mods in groups.items()})
        return fused

    def _decode_weights(self, max_model_len: int) -> dict | None:
        """Weights of the batch-1 decode path with six launches per layer (`kernels/fused_decode.py`), or None
        where it does not apply: every projection dense in the model dtype or per-channel int8, without bias;
        rotary that depends on the position only; head_dim / 2 a power of two >= 16 (the attention tiles)."""
        from optforge.formats.int8 import Int8WeightOnlyLinear

        def weight(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
            if getattr(m, "bias", None) is not None:
                return None
            if type(m) is nn.Linear and m.weight.dtype == self.dtype:
                return m.weight, None
            if type(m) is Int8WeightOnlyLinear and m.weight.dtype == torch.int8:
                return m.weight, m.weight_scale.reshape(-1).float().contiguous()
            return None

        if self.arch.is_moe:  # one dense MLP per layer in its launches
            return None
        half = self.head_dim // 2
        if half < 16 or half & (half - 1) or getattr(self.base.rotary_emb, "rope_type", "default") not in ("default", "llama3", "linear"):
            return None
        if self.arch.final_logit_softcap is not None:  # its LM-head launch returns the raw logits
            return None
        layers = []
        for layer, fused in zip(self.layers, self.fused):
            ws = {"qkv": weight(fused["qkv"]), "o": weight(layer.self_attn.o_proj), "gate_up": weight(fused["gate_up"]), "down": weight(layer.mlp.down_proj)}
            if any(w is None for w in ws.values()):
                return None
            attn = layer.self_attn
            ws["qk_norm"] = (attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.variance_epsilon) if hasattr(attn, "q_norm") else None
            layers.append(ws)
        head = weight(self.model.lm_head)
        if head is None:
            return None
        positions = torch.arange(max_model_len, device=self.device)[None]
        cos, sin = self.base.rotary_emb(torch.empty(1, 1, dtype=self.dtype, device=self.device), positions)
        cos, sin = cos[0], sin[0]
        if not (torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])):
            return None
        return {"layers": layers, "head": head, "cos": cos[:, :half].contiguous(), "sin": sin[:, :half].contiguous()}

    # ---- the forward --------------------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(hidden)
        cap = self.arch.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def forward(self, kv_cache, input_ids, positions, slot_mapping, attend) -> torch.Tensor:
        """(T,) token ids, positions and cache slots -> (T, hidden) final-normed hidden states; writes each
        token's K/V to its slot of `kv_cache` (layers, k|v, blocks, block_size, kv heads, head dim)."""
        h = self.base.embed_tokens(input_ids)  # (T, H); Gemma's embedding module scales by sqrt(H) itself
        ropes = {}  # rotary layer type (None: one for all layers) -> cos, sin (T, D), computed once per step
        for rope_type in dict.fromkeys(self.arch.rope_types):
            cos, sin = self.base.rotary_emb(h[None], positions[None], *([rope_type] if rope_type is not None else []))
            ropes[rope_type] = cos[0], sin[0]
        if self.fused is not None:
            return self._forward_fused(kv_cache, h, *ropes[None], slot_mapping, attend)
        num_tokens = h.shape[0]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            cos, sin = ropes[self.arch.rope_types[i]]
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)
            k = attn.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
            v = attn.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
            k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
            self._write_kv(kv_cache, i, slot_mapping, k, v)
            a = attn.o_proj(attend(i, q).reshape(num_tokens, -1))
            if self.has_sandwich_norms:
                h = h + layer.post_attention_layernorm(a)
                h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
            else:
                h = h + a
                h = h + self._mlp(layer, layer.post_attention_layernorm(h))
        return self.base.norm(h)

    def _mlp(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(T, H) -> (T, H) through the layer's MLP. HF's sparse MoE blocks take (B, T, H) (they flatten it to
        tokens, route each to its top-k experts and sum their outputs by the router's weights), so MoE models
        pass the step's tokens as one batch row; their dense layers take that shape as well."""
        if not self.arch.is_moe:
            return layer.mlp(x)
        return layer.mlp(x[None])[0]

    def _write_kv(self, kv_cache, layer: int, slot_mapping, k, v) -> None:
        """k, v (T, Hkv, D) to their slots of layer `layer`'s cache, encoded where it is FP8/INT8."""
        for which, x in enumerate((k, v)):
            rows = kv_cache[layer, which].view(-1, self.num_kv_heads, self.head_dim)
            if self.kv is not None:  # one byte per element; copied as bytes (CPU has no fp8 index_copy)
                rows, x = rows.view(torch.uint8), self.kv.encode(x, layer, which).view(torch.uint8)
            rows.index_copy_(0, slot_mapping, x)

    def _forward_fused(self, kv_cache, h, cos, sin, slot_mapping, attend) -> torch.Tensor:
        from optforge.runtime.kernels.triton_ops import add_rms_norm, rope_and_cache, silu_mul

        num_tokens, q_width, kv_width = h.shape[0], self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        eps = self.layers[0].input_layernorm.variance_epsilon
        residual = h.clone()
        x = add_rms_norm(h, self.layers[0].input_layernorm.weight, eps)
        for i, layer in enumerate(self.layers):
            qkv = self.fused[i]["qkv"](x)  # (T, (Hq + 2 Hkv) D)
            q = qkv[:, :q_width].view(num_tokens, self.num_heads, self.head_dim)
            k = qkv[:, q_width : q_width + kv_width].view(num_tokens, self.num_kv_heads, self.head_dim)
            v = qkv[:, q_width + kv_width :].view(num_tokens, self.num_kv_heads, self.head_dim)
            if hasattr(layer.self_attn, "q_norm"):  # Qwen3: RMSNorm per head before the rotary
                q, k = layer.self_attn.q_norm(q), layer.self_attn.k_norm(k)
            rope_and_cache(q, k, v, cos, sin, slot_mapping, kv_cache[i, 0], kv_cache[i, 1], **kv_kernel_args(self.kv, i))
            a = layer.self_attn.o_proj(attend(i, q).reshape(num_tokens, -1))
            x = add_rms_norm(a, layer.post_attention_layernorm.weight, eps, residual)
            m = layer.mlp.down_proj(silu_mul(self.fused[i]["gate_up"](x)))
            next_norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.base.norm
            x = add_rms_norm(m, next_norm.weight, eps, residual)
        return x

    def forward_decode(self, kv_cache, ids, positions, slots, block_tables, context_lens, options: DecodeKernelOptions) -> torch.Tensor:
        """Logits (1, vocab) of one decode token: embedding, then per layer RMSNorm+q|k|v, rotary+KV write+attention,
        o_proj+residual, RMSNorm+gate|up, SiLU*up+down+residual, then final norm+LM head: 6 launches per layer
        (attention splits its context over programs and a second launch combines them). Needs `decode_weights`;
        `options` go to every kernel."""
        from optforge.runtime.kernels.fused_decode import PRO_RMSNORM, PRO_SILU_MUL, gemv, rope_paged_attention

        dw = self.decode_weights
        eps = self.layers[0].input_layernorm.variance_epsilon
        residual = self.base.embed_tokens(ids)  # (1, H), a fresh tensor: updated in place below
        for i, (layer, ws) in enumerate(zip(self.layers, dw["layers"])):
            qkv = gemv(residual, *ws["qkv"], prologue=PRO_RMSNORM, norm_weight=layer.input_layernorm.weight, eps=eps, options=options)
            attn = rope_paged_attention(qkv, dw["cos"], dw["sin"], positions, slots, kv_cache[i, 0], kv_cache[i, 1],
                                        block_tables, context_lens, self.num_heads, self.scale, options=options, qk_norm=ws["qk_norm"],
                                        **kv_kernel_args(self.kv, i))
            gemv(attn, *ws["o"], residual=residual, options=options)
            gate_up = gemv(residual, *ws["gate_up"], prologue=PRO_RMSNORM, norm_weight=layer.post_attention_layernorm.weight, eps=eps, options=options)
            gemv(gate_up, *ws["down"], prologue=PRO_SILU_MUL, residual=residual, options=options)
        return gemv(residual, *dw["head"], prologue=PRO_RMSNORM, norm_weight=self.base.norm.weight, eps=eps, options=options)


def _per_head_norms(attn: nn.Module, head_dim: int) -> bool:
    """Whether the layer's q/k norms, if any, are what the fused paths apply: Qwen3's RMSNorm over each head
    (weight * x / rms(x)); other norms keep the HF modules."""
    if not hasattr(attn, "q_norm"):
        return True
    return all(type(n).__name__.endswith("RMSNorm") and "Gemma" not in type(n).__name__ and tuple(n.weight.shape) == (head_dim,)
               and hasattr(n, "variance_epsilon") for n in (attn.q_norm, attn.k_norm))
