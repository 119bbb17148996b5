"""What the runtime's decoder reads from a model's config beyond the Llama layout, and the models it refuses.

Llama, Mistral, Qwen2 and Qwen3 run one rotary embedding for every layer; a Mistral config with a
`sliding_window` windows every layer, a Qwen2/Qwen3 config with `use_sliding_window` the layers its
`layer_types` mark. Gemma-3 text models (`gemma3_text`) interleave sliding and full layers whose rotary
embeddings differ in base (the rotary module takes the layer type), scale attention by
`query_pre_attn_scalar ** -0.5`, and may cap the final logits with tanh. Their embedding module multiplies by
sqrt(hidden) itself, and their norms compute x * (1 + w) inside HF's modules, which the decoder calls.
Mixture-of-experts models (`qwen3_moe`, `mixtral`) are Qwen3/Mistral layouts whose MLP may be a sparse block: a
router (`mlp.gate`) picks the top-k experts of each token; the experts are HF's 3D parameters
(`mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj` (E, H, I)) or, as optforge's loader gives them,
one Linear MLP per expert (formats/experts.py), dense or quantized. The decoder calls HF's block as it is (Qwen3-MoE layers in `mlp_only_layers`, or off its `decoder_sparse_step`, hold a
dense MLP there). Neither the fused forms (one dense gate|up per layer) nor CUDA graphs (which would replay
one step's routing) run them.
"""

from __future__ import annotations

from dataclasses import dataclass

from optforge.errors import UserInputError

MOE_MODEL_TYPES = ("qwen3_moe", "mixtral")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", *MOE_MODEL_TYPES)
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True, kw_only=True)
class Architecture:
    # Per layer: how many positions a query attends to, its own included (HF's sliding mask: a query at p sees
    # keys p - window < j <= p); None: every position up to its own.
    windows: tuple[int | None, ...]
    # Per layer: the layer type that Gemma-3's rotary module takes (its base differs by type); None for models
    # with one rotary embedding for all layers.
    rope_types: tuple[str | None, ...]
    scale: float  # multiplies q . k before the softmax; > 0
    final_logit_softcap: float | None  # logits -> cap * tanh(logits / cap) where set; > 0
    # Whether layers may hold a sparse mixture-of-experts block (HF's module takes (B, T, H), routes per token,
    # and its expert loop depends on the routing, so it is neither fused nor captured in a CUDA graph).
    is_moe: bool = False


def read_architecture(config, head_dim: int) -> Architecture:
    """The parts of `config` (an HF text-decoder config) that the decoder and attention follow; UserInputError
    for a model the runtime cannot run exactly."""
    model_type = config.model_type
    what_to_do = "Evaluate it with HF transformers instead (`optforge eval`)."
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserInputError(f"the runtime runs {', '.join(SUPPORTED_MODEL_TYPES)} decoders; this model is '{model_type}'. {what_to_do}")
    num_layers = config.num_hidden_layers
    for key in ("attn_logit_softcapping", "use_bidirectional_attention"):
        if getattr(config, key, None):
            raise UserInputError(f"the runtime does not run {model_type} models with {key}={getattr(config, key)!r} "
                                 f"(its attention is causal SDPA, without a cap on the scores). {what_to_do}")
    layer_types = getattr(config, "layer_types", None) or [SLIDING if _window(config) else FULL] * num_layers
    unknown = sorted(set(layer_types) - {SLIDING, FULL})
    if unknown:
        raise UserInputError(f"the runtime runs {SLIDING} and {FULL} layers; this {model_type} model has {', '.join(unknown)}. {what_to_do}")
    windows = tuple(_window(config) if t == SLIDING else None for t in layer_types)
    is_gemma = model_type == "gemma3_text"
    scale = config.query_pre_attn_scalar**-0.5 if is_gemma else head_dim**-0.5
    return Architecture(windows=windows, rope_types=tuple(layer_types) if is_gemma else (None,) * num_layers, scale=scale,
                        final_logit_softcap=getattr(config, "final_logit_softcapping", None), is_moe=model_type in MOE_MODEL_TYPES)


def _window(config) -> int | None:
    """The config's sliding window where it is switched on (Qwen2/Qwen3 carry one while `use_sliding_window` is off)."""
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return getattr(config, "sliding_window", None) or None


def binding_windows(windows: tuple[int | None, ...], max_model_len: int) -> tuple[int | None, ...]:
    """`windows` with None where a window cannot hide any key of a sequence of at most `max_model_len` tokens
    (window >= max_model_len), so such models keep the paths that attend to every position."""
    return tuple(w if w is not None and w < max_model_len else None for w in windows)
