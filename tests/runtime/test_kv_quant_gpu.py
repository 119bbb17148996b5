"""The quantized KV cache in the CUDA kernels: rope_and_cache writes the bytes `formats.kv_cache.encode_kv`
writes, the paged kernel reads them back as `decode_kv`, and greedy decoding through every CUDA path (fused
layers, batched paged attention in graphs, the batch-1 six-launch path) follows HF's emulation of the cache."""

import copy

import pytest
import torch

from optforge.formats.kv_cache import KV_QMAX, apply_kv_cache_layout, decode_kv, encode_kv
from optforge.runtime.llm import EngineConfig, LLM
from optforge.runtime.sequence import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
KV_DTYPES = ["int8", "fp8"]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_kernels_store_and_read_the_bytes_of_the_torch_codec(kv_dtype):
    from optforge.runtime.kernels.triton_ops import paged_decode_attention, rope_and_cache

    torch.manual_seed(0)
    code, storage = {"int8": (1, torch.int8), "fp8": (2, torch.float8_e4m3fn)}[kv_dtype]
    T, Hq, Hkv, D, scale = 24, 4, 2, 64, (0.02, 0.03)
    q, k, v = (torch.randn(T, h, D, device="cuda") * 2 for h in (Hq, Hkv, Hkv))
    cos, sin = torch.ones(T, D, device="cuda"), torch.zeros(T, D, device="cuda")  # identity rotation
    k_cache = torch.zeros(4, 16, Hkv, D, dtype=storage, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    slots = torch.arange(T, device="cuda")
    rope_and_cache(q, k, v, cos, sin, slots, k_cache, v_cache, kv_scales=scale, kv_code=code)
    stored_k, stored_v = k_cache.view(-1, Hkv, D)[:T], v_cache.view(-1, Hkv, D)[:T]
    assert torch.equal(stored_k.view(torch.uint8), encode_kv(k, scale[0], kv_dtype).view(torch.uint8))
    assert torch.equal(stored_v.view(torch.uint8), encode_kv(v, scale[1], kv_dtype).view(torch.uint8))
    query = torch.randn(1, Hq, D, device="cuda")
    out = paged_decode_attention(query, k_cache, v_cache, torch.tensor([[0, 1]], dtype=torch.int32, device="cuda"),
                                 torch.tensor([T], dtype=torch.int32, device="cuda"), D**-0.5, kv_scales=scale, kv_code=code)
    kk = decode_kv(stored_k, scale[0], torch.float32).repeat_interleave(Hq // Hkv, 1).transpose(0, 1)  # (Hq, T, D)
    vv = decode_kv(stored_v, scale[1], torch.float32).repeat_interleave(Hq // Hkv, 1).transpose(0, 1)
    ref = torch.softmax(query[0][:, None] @ kk.transpose(1, 2) * D**-0.5, -1) @ vv  # (Hq, 1, D)
    torch.testing.assert_close(out[0], ref[:, 0], rtol=2e-3, atol=2e-3)  # the kernel's dot runs in tf32


@pytest.fixture(scope="module")
def llama_128(tiny_llama_factory):
    """head_dim 32: the batch-1 six-launch path applies."""
    return tiny_llama_factory(hidden=128, intermediate=256, head_dim=32)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_decoding_follows_the_emulated_cache(llama_128, byte_tokenizer, hf_greedy, kv_dtype, dtype):
    from optforge.passes.quant.kv_cache import calibrate_kv

    model = copy.deepcopy(llama_128).to("cuda", dtype)
    calib = [torch.tensor([[5 + (11 * i + j) % 250 for j in range(40)]], device="cuda") for i in range(4)]
    amax = calibrate_kv(model, calib)
    qmax = KV_QMAX[kv_dtype]
    apply_kv_cache_layout(model, {"dtype": kv_dtype, "scales": {str(i): {"k": k / qmax, "v": v / qmax} for i, (k, v) in amax.items()}})
    prompts = [[5 + (7 * i + j) % 250 for j in range(3 + 5 * i)] for i in range(5)]
    expected, scores = hf_greedy(model, prompts)
    llm = LLM.from_model(model, byte_tokenizer, EngineConfig(device="cuda", dtype=str(dtype).removeprefix("torch."), num_blocks=64, block_size=16,
                                                             max_num_seqs=8, max_model_len=256))
    runner = llm.engine.runner
    assert runner.kv_cache.element_size() == 1 and runner.fused is not None and runner.graphs
    batched = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))]
    alone = [llm.generate([p], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids for p in prompts]  # batch-1 path
    tol = 1e-3 if dtype == torch.float32 else 2e-2  # bf16: HF and the runtime round in other places
    for outputs in (batched, alone):
        for i, (got, ref) in enumerate(zip(outputs, expected)):
            step = next((t for t, (a, b) in enumerate(zip(got, ref)) if a != b), None)
            if step is None:
                continue
            logits = scores[i][step]
            gap = float(logits[ref[step]] - logits[got[step]])
            assert gap <= tol * float(logits.abs().max()), f"prompt {i} step {step}: runtime {got[step]} vs HF {ref[step]}, HF logit gap {gap:.4g}"
