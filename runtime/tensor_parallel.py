"""Tensor parallelism for the serving runtime over torch.distributed (gloo on the CPU, NCCL on GPUs).

`optforge generate|serve|bench --tensor-parallel N` (or `torchrun --nproc-per-node N -m optforge generate ...`)
starts N processes. Each loads the model and keeps its share of every decoder layer (`shard`): q/k/v and
gate/up split by output rows (column-parallel: this rank's attention heads, its slice of the MLP), o_proj and
down_proj by input columns (row-parallel: partial sums all-reduced, `RowParallel`); embeddings, norms and the LM
head are whole on every rank. Each rank's KV cache holds its KV heads for the same blocks. Rank 0 runs the engine
(scheduler, block manager, sampling); each step it runs, it first sends the step (token ids, cache slots, block
tables: `StepView`) to the others, which run the same forward (`follow`). Sums reduce in the same order on every
rank, so every rank computes the same hidden states.

Layers take dense Linears, INT8 (weight-only and W8A8), group-wise or per-channel INT4/INT8 weight-only (a
row-parallel split must fall on group boundaries) and FP8. Activations that are rounded per token (W8A8, dynamic
FP8) are rounded per rank in a row-parallel Linear, from the rank's slice of the row: close to one process's
numbers, not equal to them. The fused batch-1 decode path and CUDA graphs are not used under tensor parallelism.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from optforge import distributed
from optforge.errors import UserInputError
from optforge.formats.fp8 import Fp8Linear
from optforge.formats.int8 import ChannelInt8Linear
from optforge.formats.weight_only import WeightOnlyLinear

log = logging.getLogger(__name__)


def check_degree(config, n: int) -> None:
    """Exit 2 unless `n` divides the attention heads, the KV heads and the MLP width (names the degrees that do),
    and for a mixture-of-experts model above 1 (its experts are not split)."""
    from optforge.runtime.architectures import MOE_MODEL_TYPES

    if n > 1 and config.model_type in MOE_MODEL_TYPES:
        raise UserInputError(f"tensor parallelism does not split mixture-of-experts layers ({config.model_type}); serve it with --tensor-parallel 1")
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    sizes = {"attention heads": heads, "KV heads": kv, "MLP width (intermediate_size)": config.intermediate_size}
    bad = [f"{v} {k}" for k, v in sizes.items() if v % n]
    if bad:
        fits = [d for d in range(1, kv + 1) if all(v % d == 0 for v in sizes.values())]
        raise UserInputError(f"--tensor-parallel {n} does not divide the model's {' and '.join(bad)}; degrees that do: {', '.join(map(str, fits))}")


def _part(total: int, rank: int, world: int) -> slice:
    size = total // world
    return slice(rank * size, (rank + 1) * size)


def _slice(module: nn.Module, dim: int, part: slice, keep_bias: bool = True) -> nn.Module:
    """This rank's rows (dim 0) or input columns (dim 1) of a Linear; a row-parallel bias stays on one rank only."""
    if type(module) is nn.Linear:
        weight = module.weight.detach()[part] if dim == 0 else module.weight.detach()[:, part]
        out = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None and (dim == 0 or keep_bias), dtype=weight.dtype, device=weight.device)
        out.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        if out.bias is not None:
            out.bias = nn.Parameter((module.bias.detach()[part] if dim == 0 else module.bias.detach()).contiguous(), requires_grad=False)
        return out
    if isinstance(module, (ChannelInt8Linear, Fp8Linear)):  # 8-bit (out, in), one scale per output row or per tensor
        out = _shallow_copy(module)
        per_row = module.weight_scale.numel() > 1
        if dim == 0:
            out.weight = module.weight[part].contiguous()
            out.weight_scale = module.weight_scale[part].contiguous() if per_row else module.weight_scale
        else:
            out.weight = module.weight[:, part].contiguous()
        out.out_features, out.in_features = out.weight.shape
    elif isinstance(module, WeightOnlyLinear):  # int4/int8 codes with a scale (and zero) per row and group
        q, scale, zero = module.quantized()
        out = _shallow_copy(module)
        if dim == 0:
            q, scale, zero = q[part], scale[part], None if zero is None else zero[part]
        else:
            g = module.group_size or module.in_features
            if part.start % g and module.group_size:
                raise UserInputError(f"tensor parallelism splits {module.in_features} input columns at {part.start}, inside a group of {g}: serve this artifact with a degree whose split falls on group boundaries")
            groups = slice(part.start // g, part.stop // g) if module.group_size else slice(None)
            q, scale, zero = q[:, part], scale[:, groups], None if zero is None else zero[:, groups]
        out.out_features, out.in_features = q.shape
        if module.bits == 4:
            out.weight_shape = torch.tensor(list(q.shape), dtype=torch.int64)
        out.set_quantized(q.contiguous(), scale.contiguous(), None if zero is None else zero.contiguous())
    else:
        raise UserInputError(f"tensor parallelism runs dense, INT8, INT4 and FP8 Linears; this model has {type(module).__name__} layers. Serve it with --tensor-parallel 1")
    if dim == 0:
        out.bias = None if module.bias is None else nn.Parameter(module.bias.detach()[part].contiguous(), requires_grad=False)
    else:
        out.bias = module.bias if keep_bias else None
    return out


def _shallow_copy(module: nn.Module) -> nn.Module:
    """The module with its own parameter and buffer tables (so replacing one leaves the original whole)."""
    out = copy.copy(module)
    out._parameters, out._buffers = dict(module._parameters), dict(module._buffers)
    for cache in ("_prepared", "_dense", "_w_scale_rows"):  # derived from the old tensors
        if hasattr(out, cache):
            setattr(out, cache, None)
    return out


class RowParallel(nn.Module):
    """A row-parallel Linear: this rank's partial product, summed over the ranks."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if distributed.world_size() > 1:
            torch.distributed.all_reduce(y)
        return y


def shard(model: nn.Module, rank: int, world: int) -> nn.Module:
    """Keep this rank's share of every decoder layer (see the module docstring); marks the model for the Decoder."""
    cfg = model.config
    check_degree(cfg, world)
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    q_part, kv_part, mlp_part = _part(heads * head_dim, rank, world), _part(kv * head_dim, rank, world), _part(cfg.intermediate_size, rank, world)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj, attn.k_proj, attn.v_proj = _slice(attn.q_proj, 0, q_part), _slice(attn.k_proj, 0, kv_part), _slice(attn.v_proj, 0, kv_part)
        attn.o_proj = RowParallel(_slice(attn.o_proj, 1, q_part, keep_bias=rank == 0))
        mlp.gate_proj, mlp.up_proj = _slice(mlp.gate_proj, 0, mlp_part), _slice(mlp.up_proj, 0, mlp_part)
        mlp.down_proj = RowParallel(_slice(mlp.down_proj, 1, mlp_part, keep_bias=rank == 0))
    model.tensor_parallel = world
    return model


# ---------------------------------------------------------------------------------------------- the steps


@dataclass
class SeqView:
    """What a forward needs of a sequence (the other ranks have no scheduler)."""

    seq_id: int
    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass
class StepView:
    """One scheduled step as the other ranks run it: `ScheduledBatch`'s fields over `SeqView`s."""

    seqs: list[SeqView] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def of(cls, batch) -> "StepView":
        seqs = [SeqView(s.seq_id, list(s.token_ids[: s.num_computed_tokens + n]), s.num_computed_tokens, list(s.block_table)) for s, n in zip(batch.seqs, batch.num_new_tokens)]
        return cls(seqs, list(batch.num_new_tokens), list(batch.block_copies))

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.num_new_tokens)


class LeaderRunner:
    """Rank 0's ModelRunner: sends every step to the other ranks before running it; never overlaps steps."""

    def __init__(self, runner):
        self.runner = runner

    def run(self, batch):
        distributed.broadcast(StepView.of(batch))
        return self.runner.run(batch)

    def can_launch(self, batch) -> bool:
        return False

    def close(self) -> None:
        """Release the other ranks from `follow` (once)."""
        if self.runner is not None:
            distributed.broadcast(None)
            self.runner = None

    def __getattr__(self, name):
        return getattr(self.runner, name)


@torch.inference_mode()
def follow(runner) -> int:
    """A rank other than 0: run each step rank 0 sends, until it sends None; returns the steps run."""
    steps = 0
    while (step := distributed.broadcast(None)) is not None:
        runner.forward_only(step)
        steps += 1
    log.info("rank %d: %d steps run for rank 0", distributed.rank(), steps)
    return steps


def load_sharded(path, config):
    """(engine, tokenizer) of this rank under tensor parallelism: rank 0's Engine with a `LeaderRunner`; on the
    other ranks the engine is None, and this returns once rank 0 has closed (after running its steps)."""
    from dataclasses import replace

    from optforge.model_io import load_model
    from optforge.runtime.llm import Engine
    from optforge.runtime.model_runner import ModelRunner

    if config.backend != "torch":
        raise UserInputError("--tensor-parallel runs the torch backend; drop --backend cpp")
    if distributed.launched_size() != config.tensor_parallel:
        raise UserInputError(f"tensor_parallel={config.tensor_parallel} needs as many processes: start it with `optforge generate|serve|bench --tensor-parallel "
                             f"{config.tensor_parallel}` or `torchrun --nproc-per-node {config.tensor_parallel} -m optforge ...`")
    device = distributed.init(config.device)
    model, tokenizer = load_model(path, dtype=config.dtype, device=device)
    shard(model, distributed.rank(), distributed.world_size())
    kv_bytes = config.kv_cache_bytes
    if kv_bytes is None and device.startswith("cuda"):  # every rank the same number of blocks: the least free memory decides
        kv_bytes = int(distributed.all_reduce(torch.tensor([torch.cuda.mem_get_info(device)[0] // 2], dtype=torch.int64), "min")[0])
    config = replace(config, device=device, kv_cache_bytes=kv_bytes, use_cuda_graphs=False, async_scheduling=False)
    if not distributed.is_leader():
        follow(ModelRunner(model, block_size=config.block_size, num_blocks=config.num_blocks, kv_cache_bytes=config.kv_cache_bytes,
                           max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs, use_cuda_graphs=False))
        return None, tokenizer
    engine = Engine(model, tokenizer, config)
    engine.runner = LeaderRunner(engine.runner)
    return engine, tokenizer
