"""Runs a Llama-family model over a paged KV cache. Owns the KV tensors and the CUDA graphs.

The forward is ours; the weights and modules are the HF model's (q/k/v/o projections, which may be the
quantized Linear modules of an artifact, MLP, norms, and HF's rotary module, so rope scaling follows the
config). KV cache per layer: `(num_blocks, block_size, num_kv_heads, head_dim)` for k and for v; one extra
block at the end is scratch space for the padded rows of a CUDA graph.

Attention: on CPU (and for prefill chunks on CUDA) each sequence's keys and values are gathered from its
blocks and go through torch SDPA with a causal mask offset by its cached context. On CUDA, decode-only steps
use our Triton paged-attention kernel, and the layer runs fused (q/k/v and gate/up as one matmul each, dense
or quantized with per-row scales, residual+RMSNorm, rotary+KV write and SiLU*up as Triton kernels), captured
in CUDA graphs for the decode batch sizes in `graph_batch_sizes`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from optforge.errors import UserInputError
from optforge.runtime.sampler import Sampler
from optforge.runtime.scheduler import ScheduledBatch

log = logging.getLogger(__name__)

# cuDNN's SDPA is left out: it builds a cuDNN graph per new shape on the host, ~26 ms per call on an H100
# host (benchmarks/RESULTS.md), and every prefill step brings new shapes; flash attention needs no such step.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class Launched:
    """A decode step started by `ModelRunner.launch`: its greedy tokens, on the host once `event` completes
    (a pinned buffer that the copy fills), or a list already there (no event)."""

    num_rows: int
    tokens: torch.Tensor | list[int]
    event: torch.cuda.Event | None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_bytes: int | None = None,
        max_model_len: int = 4096,
        max_num_seqs: int = 256,
        use_cuda_graphs: bool = True,
    ):
        cfg = model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES or getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            raise UserInputError(
                f"the runtime runs {', '.join(SUPPORTED_MODEL_TYPES)} decoders without sliding windows; this model is "
                f"'{cfg.model_type}'. Evaluate it with HF transformers instead (`optforge eval`)."
            )
        self.model, self.config = model, cfg
        self.base = model.model
        self.layers = list(self.base.layers)
        self.device = self.base.embed_tokens.weight.device
        self.dtype = self.base.embed_tokens.weight.dtype
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        self.block_size, self.max_model_len = block_size, max_model_len
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.is_cuda = self.device.type == "cuda"
        self.use_triton = self.is_cuda and _triton_available()
        self.num_blocks = num_blocks or self._blocks_for_budget(kv_cache_bytes)
        # (layers, k|v, blocks + 1 scratch, block_size, kv heads, head dim)
        self.kv_cache = torch.zeros(
            len(self.layers), 2, self.num_blocks + 1, block_size, self.num_kv_heads, self.head_dim,
            dtype=self.dtype, device=self.device,
        )
        self.fused = self._fuse_weights() if self.use_triton else None
        self.decode_weights = self._decode_weights() if self.fused is not None else None
        self.sampler = Sampler()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}  # size -> graph, logits, argmax
        self._last_launch: list[int] = []  # tokens of the last `launch` without graphs
        self.graph_batch_sizes = [b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256) if b <= max_num_seqs]
        if self.use_triton and use_cuda_graphs:
            self._capture_graphs()
        log.info("model runner: %d KV blocks of %d tokens on %s (triton=%s, graphs=%s)", self.num_blocks, block_size, self.device, self.use_triton, bool(self.graphs))

    # ---- set-up -------------------------------------------------------------------------------------
    def _blocks_for_budget(self, kv_cache_bytes: int | None) -> int:
        per_block = len(self.layers) * 2 * self.block_size * self.num_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8
        if kv_cache_bytes is None:
            if self.is_cuda:
                free, _ = torch.cuda.mem_get_info(self.device)
                kv_cache_bytes = int(free * 0.5)
            else:
                kv_cache_bytes = 512 * 2**20
        return max(1, kv_cache_bytes // per_block)

    def _fuse_weights(self) -> list[dict] | None:
        """One q|k|v and one gate|up module per layer, dense or quantized (`stack_linears`); the HF modules keep
        views into the stacked tensors, so no second copy of the weights stays alive."""
        from optforge.runtime.fused_linears import can_stack, stack_linears

        fused = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            groups = {"qkv": [attn.q_proj, attn.k_proj, attn.v_proj], "gate_up": [mlp.gate_proj, mlp.up_proj]}
            if hasattr(attn, "q_norm") or self.config.hidden_act != "silu" or not all(can_stack(g) for g in groups.values()):
                return None
            fused.append({key: stack_linears(mods, share=True) for key, mods in groups.items()})
        return fused

    def _decode_weights(self) -> dict | None:
        """Weights of the batch-1 decode path with six launches per layer (`kernels/fused_decode.py`), or None
        where it does not apply: every projection dense in the model dtype or per-channel int8, without bias;
        rotary that depends on the position only; head_dim / 2 a power of two >= 16 (the attention tiles)."""
        from optforge.runtime.layers import Int8WeightOnlyLinear

        def weight(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
            if getattr(m, "bias", None) is not None:
                return None
            if type(m) is nn.Linear and m.weight.dtype == self.dtype:
                return m.weight, None
            if type(m) is Int8WeightOnlyLinear and m.weight.dtype == torch.int8:
                return m.weight, m.weight_scale.reshape(-1).float().contiguous()
            return None

        half = self.head_dim // 2
        if half < 16 or half & (half - 1) or getattr(self.base.rotary_emb, "rope_type", "default") not in ("default", "llama3", "linear"):
            return None
        layers = []
        for layer, fused in zip(self.layers, self.fused):
            ws = {"qkv": weight(fused["qkv"]), "o": weight(layer.self_attn.o_proj), "gate_up": weight(fused["gate_up"]), "down": weight(layer.mlp.down_proj)}
            if any(w is None for w in ws.values()):
                return None
            layers.append(ws)
        head = weight(self.model.lm_head)
        if head is None:
            return None
        positions = torch.arange(self.max_model_len, device=self.device)[None]
        cos, sin = self.base.rotary_emb(torch.empty(1, 1, dtype=self.dtype, device=self.device), positions)
        cos, sin = cos[0], sin[0]
        if not (torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])):
            return None
        return {"layers": layers, "head": head, "cos": cos[:, :half].contiguous(), "sin": sin[:, :half].contiguous()}

    # ---- one step -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> dict[int, int]:
        """Run one scheduled step; returns {seq_id: sampled token} for sequences whose chunk ended their tokens."""
        self._copy_blocks(batch)
        ids, positions, slots, sample_rows = [], [], [], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start : start + n])
            for pos in range(start, start + n):
                positions.append(pos)
                slots.append(seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size)
            if start + n == len(seq):
                sample_rows.append(len(ids) - 1)
        sampled_seqs = [s for s, n in zip(batch.seqs, batch.num_new_tokens) if s.num_computed_tokens + n == len(s)]
        greedy = None
        if batch.is_decode_only and self._graph_size(len(batch)):
            logits, greedy = self._replay(batch, [self.largest + r for r in range(len(batch))], ids)
        else:
            logits = self._forward_eager(batch, ids, positions, slots, sample_rows)
        if not sampled_seqs:
            return {}
        tokens = self.sampler(logits, sampled_seqs, greedy)
        return {seq.seq_id: token for seq, token in zip(sampled_seqs, tokens)}

    # ---- overlapped decode: launch a step before the previous one's tokens reach the host ----------------
    def can_launch(self, batch: ScheduledBatch) -> bool:
        """Whether `launch` takes this batch: decode rows only, and within the largest CUDA graph where graphs run."""
        return batch.is_decode_only and (not self.graphs or self._graph_size(len(batch)) is not None)

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, src_rows: list[int | None]) -> "Launched":
        """Start a decode step whose tokens are picked greedily (argmax of the raw logits); `collect` returns them.

        Row i's input token is `src_rows[i]`'s token of the previous launch where that is set (that token may
        not have reached the host yet: on CUDA the graph reads it on the device), else the sequence's token at
        `num_computed_tokens`. Each row attends to its `num_computed_tokens + 1` positions. On CUDA nothing
        waits for the GPU here; elsewhere the step runs now."""
        self._copy_blocks(batch)
        if self._graph_size(len(batch)):
            host_ids = [0 if r is not None else seq.token_ids[seq.num_computed_tokens] for seq, r in zip(batch.seqs, src_rows)]
            src = [r if r is not None else self.largest + i for i, r in enumerate(src_rows)]
            _, greedy = self._replay(batch, src, host_ids)
            out, event = self.host["tokens"][self._launches % 2], self._events[self._launches % 2]
            out[: len(batch)].copy_(greedy, non_blocking=True)
            event.record()
            return Launched(len(batch), out, event)
        ids = [self._last_launch[r] if r is not None else seq.token_ids[seq.num_computed_tokens] for seq, r in zip(batch.seqs, src_rows)]
        positions = [seq.num_computed_tokens for seq in batch.seqs]
        slots = [seq.block_table[p // self.block_size] * self.block_size + p % self.block_size for seq, p in zip(batch.seqs, positions)]
        logits = self._forward_eager(batch, ids, positions, slots, list(range(len(batch))))
        self._last_launch = logits.argmax(-1).tolist()
        return Launched(len(batch), self._last_launch, None)

    @staticmethod
    def collect(launched: "Launched") -> list[int]:
        """The tokens of a `launch`, one per row; waits for that step (and only it) to finish."""
        if launched.event is not None:
            launched.event.synchronize()
            return launched.tokens[: launched.num_rows].tolist()
        return launched.tokens

    def _copy_blocks(self, batch: ScheduledBatch) -> None:
        for src, dst in batch.block_copies:
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def _graph_size(self, n: int) -> int | None:
        """The smallest captured graph batch size >= n, or None."""
        return next((b for b in self.graph_batch_sizes if b >= n), None) if self.graphs else None

    def _forward_eager(self, batch: ScheduledBatch, ids, positions, slots, sample_rows) -> torch.Tensor | None:
        """Logits (len(sample_rows), vocab) of one step without CUDA graphs."""
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        input_ids, pos_t, slot_t = as_tensor(ids), as_tensor(positions), as_tensor(slots)
        if self.use_triton and batch.is_decode_only:
            attend = self._decode_attention(*self._decode_metadata(batch.seqs))
        else:
            attend = self._gathered_attention(batch)
        hidden = self.forward(input_ids, pos_t, slot_t, attend)
        return self.model.lm_head(hidden[as_tensor(sample_rows)]) if sample_rows else None

    # ---- attention ----------------------------------------------------------------------------------
    def _gathered_attention(self, batch: ScheduledBatch):
        """SDPA over KV gathered from the blocks (CPU, and steps with prefill chunks on CUDA).

        Fresh prompts of equal length (no cached context) go through one batched causal SDPA call; on CUDA
        the decode rows of a mixed step go through one paged-attention launch; every other sequence (a chunk
        after cached context, a decode on CPU) gets its own call with an offset mask.
        """
        bs, q_start = self.block_size, 0
        offsets = torch.arange(bs, device=self.device)
        fresh: dict[int, list[tuple[int, torch.Tensor]]] = {}  # prompt length -> [(first row, gather index)]
        single = []
        decodes = []  # (row, seq, context length): one new token each, for the paged kernel (CUDA)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            ctx = start + n
            if n == 1 and self.use_triton:
                decodes.append((q_start, seq, ctx))
                q_start += 1
                continue
            table = torch.tensor(seq.block_table[: -(-ctx // bs)], dtype=torch.long, device=self.device)
            gather = (table[:, None] * bs + offsets).reshape(-1)[:ctx]
            if n > 1 and start == 0:
                fresh.setdefault(n, []).append((q_start, gather))
            else:
                mask = None
                if n > 1:  # a chunk after cached context: query i sees keys 0 .. start + i
                    mask = torch.arange(ctx, device=self.device)[None, :] <= torch.arange(start, ctx, device=self.device)[:, None]
                single.append((q_start, q_start + n, gather, mask))
            q_start += n
        groups = []
        for n, members in fresh.items():
            rows = torch.cat([torch.arange(r, r + n, device=self.device) for r, _ in members])  # (G n,)
            groups.append((len(members), n, rows, torch.stack([g for _, g in members])))  # gather (G, n)

        if decodes:  # decode rows of a mixed step: one batched paged-attention launch instead of one SDPA each
            decode_rows = torch.tensor([r for r, _, _ in decodes], dtype=torch.long, device=self.device)
            decode_attend = self._decode_attention(*self._decode_metadata([s for _, s, _ in decodes], [c for _, _, c in decodes]))

        def attend(layer: int, q: torch.Tensor) -> torch.Tensor:  # q (T, Hq, D) -> (T, Hq, D)
            with sdpa_kernel(_SDPA_BACKENDS):
                return gathered(layer, q)

        def gathered(layer: int, q: torch.Tensor) -> torch.Tensor:
            k_flat = self.kv_cache[layer, 0].view(-1, self.num_kv_heads, self.head_dim)
            v_flat = self.kv_cache[layer, 1].view(-1, self.num_kv_heads, self.head_dim)
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            if decodes:
                out[decode_rows] = decode_attend(layer, q[decode_rows])
            for num_seqs, n, rows, gather in groups:
                qq = q[rows].view(num_seqs, n, self.num_heads, self.head_dim).transpose(1, 2)  # (G, Hq, n, D)
                kk, vv = k_flat[gather].transpose(1, 2), v_flat[gather].transpose(1, 2)  # (G, Hkv, n, D)
                o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=self.scale, enable_gqa=True)
                out[rows] = o.transpose(1, 2).reshape(-1, self.num_heads, self.head_dim)
            for qs, qe, gather, mask in single:
                qq = q[qs:qe].transpose(0, 1)[None]  # (1, Hq, n, D)
                kk = k_flat[gather].transpose(0, 1)[None]  # (1, Hkv, ctx, D)
                vv = v_flat[gather].transpose(0, 1)[None]
                o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=self.scale, enable_gqa=True)
                out[qs:qe] = o[0].transpose(0, 1)
            return out

        return attend

    def _decode_metadata(self, seqs, context_lens: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables padded with the scratch block, and context lengths (default: each sequence's computed
        tokens plus the one this decode step adds)."""
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [self.num_blocks] * (width - len(s.block_table)) for s in seqs]
        block_tables = torch.tensor(tables, dtype=torch.int32, device=self.device)
        context_lens = torch.tensor(context_lens or [s.num_computed_tokens + 1 for s in seqs], dtype=torch.int32, device=self.device)
        return block_tables, context_lens

    def _decode_attention(self, block_tables: torch.Tensor, context_lens: torch.Tensor):
        from optforge.runtime.kernels.triton_ops import paged_decode_attention

        def attend(layer: int, q: torch.Tensor) -> torch.Tensor:
            return paged_decode_attention(q, self.kv_cache[layer, 0], self.kv_cache[layer, 1], block_tables, context_lens, self.scale)

        return attend

    # ---- the forward --------------------------------------------------------------------------------
    def forward(self, input_ids, positions, slot_mapping, attend) -> torch.Tensor:
        """(T,) token ids, positions and cache slots -> (T, hidden) final-normed hidden states."""
        h = self.base.embed_tokens(input_ids)  # (T, H)
        cos, sin = self.base.rotary_emb(h[None], positions[None])
        cos, sin = cos[0], sin[0]  # (T, D)
        if self.fused is not None:
            return self._forward_fused(h, cos, sin, slot_mapping, attend)
        num_tokens = h.shape[0]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)
            k = attn.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
            v = attn.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
            k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
            self.kv_cache[i, 0].view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slot_mapping, k)
            self.kv_cache[i, 1].view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slot_mapping, v)
            h = h + attn.o_proj(attend(i, q).reshape(num_tokens, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.base.norm(h)

    def _forward_fused(self, h, cos, sin, slot_mapping, attend) -> torch.Tensor:
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
            rope_and_cache(q, k, v, cos, sin, slot_mapping, self.kv_cache[i, 0], self.kv_cache[i, 1])
            a = layer.self_attn.o_proj(attend(i, q).reshape(num_tokens, -1))
            x = add_rms_norm(a, layer.post_attention_layernorm.weight, eps, residual)
            m = layer.mlp.down_proj(silu_mul(self.fused[i]["gate_up"](x)))
            next_norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.base.norm
            x = add_rms_norm(m, next_norm.weight, eps, residual)
        return x

    # ---- CUDA graphs for decode ---------------------------------------------------------------------
    def _capture_graphs(self) -> None:
        largest = self.largest = self.graph_batch_sizes[-1]
        dev, scratch = self.device, self.num_blocks
        # One int64 buffer holds a graph's inputs: row 0 the argmax tokens of the last replay (written by the
        # graph), rows 1-5 host ids, positions, slots, context lengths and sources, refreshed by one copy per
        # step from a pinned host mirror (block tables only when they change). Row r's input token is
        # buf[:2].flatten()[src[r]]: its host id (largest + r), or a token of the previous replay that never
        # went to the host (`launch`). Host mirrors come in pairs: a step fills one while the copy from the
        # other may still be queued behind the step before.
        buf = torch.zeros(6, largest, dtype=torch.long, device=dev)
        self.static = {"buf": buf, "greedy": buf[0], "tokens": buf[:2].view(-1), "pos": buf[2], "slots": buf[3], "lens": buf[4],
                       "src": buf[5], "tables": torch.full((largest, self.max_blocks_per_seq), scratch, dtype=torch.int32, device=dev)}
        self.host = {"meta": torch.zeros(2, 5, largest, dtype=torch.long).pin_memory(),
                     "tables": torch.full((2, largest, self.max_blocks_per_seq), scratch, dtype=torch.int32).pin_memory(),
                     "tokens": torch.zeros(2, largest, dtype=torch.long).pin_memory()}
        self.host["meta_np"], self.host["tables_np"] = self.host["meta"].numpy(), self.host["tables"].numpy()
        self.host["pad"] = torch.tensor([[0], [0], [scratch * self.block_size], [1], [0]]).numpy()  # src set per row
        self.host["src"] = torch.arange(largest, 2 * largest).numpy()
        self._events = [torch.cuda.Event(), torch.cuda.Event()]
        self._launches = 0
        self._tables_shown: dict[int, list] = {}  # graph size -> the block-table rows last copied for it
        pool = None
        with torch.inference_mode():
            s = self.static
            s["src"].copy_(torch.arange(largest, 2 * largest))
            for size in reversed(self.graph_batch_sizes):
                body = self._graph_body(size)
                body()  # warm up: compiles the Triton kernels, picks the cuBLAS algorithms
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = body()
                    torch.argmax(logits, -1, out=s["greedy"][:size])
                pool = graph.pool()
                self.graphs[size] = (graph, logits, s["greedy"][:size])

    def _forward_decode_fused(self, ids, positions, slots, block_tables, context_lens) -> torch.Tensor:
        """Logits (1, vocab) of one decode token: embedding, then per layer RMSNorm+q|k|v, rotary+KV write+attention,
        o_proj+residual, RMSNorm+gate|up, SiLU*up+down+residual, then final norm+LM head: 6 launches per layer
        (attention splits its context over programs and a second launch combines them)."""
        from optforge.runtime.kernels.fused_decode import PRO_RMSNORM, PRO_SILU_MUL, gemv, rope_paged_attention

        dw = self.decode_weights
        eps = self.layers[0].input_layernorm.variance_epsilon
        residual = self.base.embed_tokens(ids)  # (1, H), a fresh tensor: updated in place below
        for i, (layer, ws) in enumerate(zip(self.layers, dw["layers"])):
            qkv = gemv(residual, *ws["qkv"], prologue=PRO_RMSNORM, norm_weight=layer.input_layernorm.weight, eps=eps)
            attn = rope_paged_attention(qkv, dw["cos"], dw["sin"], positions, slots, self.kv_cache[i, 0], self.kv_cache[i, 1],
                                        block_tables, context_lens, self.num_heads, self.scale)
            gemv(attn, *ws["o"], residual=residual)
            gate_up = gemv(residual, *ws["gate_up"], prologue=PRO_RMSNORM, norm_weight=layer.post_attention_layernorm.weight, eps=eps)
            gemv(gate_up, *ws["down"], prologue=PRO_SILU_MUL, residual=residual)
        return gemv(residual, *dw["head"], prologue=PRO_RMSNORM, norm_weight=self.base.norm.weight, eps=eps)

    def _graph_body(self, size: int):
        s = self.static

        def body():
            ids = s["tokens"].index_select(0, s["src"][:size])
            if size == 1 and self.decode_weights is not None:
                return self._forward_decode_fused(ids, s["pos"][:1], s["slots"][:1], s["tables"][:1], s["lens"][:1])
            attend = self._decode_attention(s["tables"][:size], s["lens"][:size])
            return self.model.lm_head(self.forward(ids, s["pos"][:size], s["slots"][:size], attend))

        return body

    def _replay(self, batch: ScheduledBatch, src: list[int], host_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the graph of the smallest captured size >= len(batch) for a decode step; row r reads its input
        token at `src[r]` (see `_capture_graphs`), `host_ids[r]` where that is its host id, and attends to its
        `num_computed_tokens + 1` positions. Returns logits (n, vocab) and their argmax (n,), on the device."""
        n = len(batch)
        size = self._graph_size(n)
        s, host, scratch, j = self.static, self.host, self.num_blocks, self._launches % 2
        self._launches += 1
        meta = host["meta_np"][j]
        meta[:, :size] = host["pad"]  # padded rows: token 0 at position 0 in the scratch block
        meta[4, :size] = host["src"][:size]
        positions = [q.num_computed_tokens for q in batch.seqs]
        meta[0, :n], meta[1, :n], meta[4, :n] = host_ids, positions, src
        meta[2, :n] = [q.block_table[p // self.block_size] * self.block_size + p % self.block_size for q, p in zip(batch.seqs, positions)]
        meta[3, :n] = [p + 1 for p in positions]
        s["buf"][1:].copy_(host["meta"][j], non_blocking=True)
        rows = [q.block_table for q in batch.seqs]
        if self._tables_shown.get(size) != rows:  # stale entries past a row's context length are never read
            tables = host["tables_np"][j]
            for r, table in enumerate(rows):
                tables[r, : len(table)] = table
            tables[n:size] = scratch
            s["tables"][:size].copy_(host["tables"][j, :size], non_blocking=True)
            self._tables_shown = {size: [list(t) for t in rows]}
        graph, logits, greedy = self.graphs[size]
        graph.replay()
        return logits[:n], greedy[:n]
