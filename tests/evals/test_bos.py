"""Models trained with BOS first (Gemma, Llama-3) are scored with it; tokenizers without (SmolLM2) are not."""

import torch

from optforge.evals.perplexity import leading_bos, perplexity


class Chars:
    """Characters -> ids 3..; `bos` is put first by add_special_tokens=True when given."""

    pad_token_id = eos_token_id = 2

    def __init__(self, bos: int | None):
        self.bos_token_id = bos

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [3 + ord(c) % 200 for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else []) + ids}


def test_leading_bos_only_for_tokenizers_that_add_it():
    assert leading_bos(Chars(bos=1)) == [1]
    assert leading_bos(Chars(bos=None)) == []


def test_perplexity_puts_bos_first_and_never_scores_it():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=210, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    text = "hello world"
    with_bos, without = perplexity(model, Chars(bos=1), [text]), perplexity(model, Chars(bos=None), [text])
    assert with_bos.tokens == [len(text)] and without.tokens == [len(text) - 1]  # BOS adds a target: the first char
    ids = torch.tensor([[1] + Chars(None)(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    expected = -logp.gather(1, ids[0, 1:, None]).sum().item()
    assert abs(with_bos.nll[0] - expected) < 1e-3
