"""Tiny random Llamas for fast engine/judge tests (no downloads, seconds on CPU)."""

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 50
EOS = 7


def tiny_llama(layers=2, hidden=64, seed=0, vocab=VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def perturbed(model, scale=0.02, seed=1):
    """A draft that agrees with ``model`` often but not always."""
    torch.manual_seed(seed)
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * scale)
    return m.eval()


def random_prompts(n, seed=3, max_len=12, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len, (n,), generator=g).tolist()
    return [torch.randint(8, vocab, (k,), generator=g).tolist() for k in lens]


@torch.no_grad()
def greedy(model, prompt, max_new_tokens, eos=None):
    ids = torch.tensor([prompt])
    out = []
    for _ in range(max_new_tokens):
        nxt = int(model(ids).logits[0, -1].argmax())
        out.append(nxt)
        if nxt == eos:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out
