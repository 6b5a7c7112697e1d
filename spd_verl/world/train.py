"""Train the world's tiny Llamas from scratch (CPU, fp32, deterministic from a seed)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spd_verl.world.tokenizer import EOS_ID, PAD_ID, prompt_ids, prompt_text


@dataclass
class ModelSpec:
    layers: int
    hidden: int
    heads: int
    steps: int
    lr: float = 3e-3
    batch_size: int = 64
    warmup: int = 50

    def config(self, vocab_size: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden,
            intermediate_size=4 * self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=256,  # prompt + solution is < 140 tokens
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
            attn_implementation="sdpa",
        )


def encode_examples(tokenizer, problems) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, solution ids + eos) per problem.

    Rendering the chat template per row is slow (jinja); the prompt is "<s>Q : {q} A :", so
    encode that string in one batch call and check it against the real template on row 0."""
    if not problems:
        return []
    texts = [prompt_text(p.question) for p in problems]
    prompts = tokenizer(texts, add_special_tokens=False)["input_ids"]
    sols = tokenizer([p.solution for p in problems], add_special_tokens=False)["input_ids"]
    assert prompts[0] == prompt_ids(tokenizer, problems[0].question), "chat template drifted"
    return [(list(p), list(s) + [EOS_ID]) for p, s in zip(prompts, sols)]


def _batch(examples, idx):
    seqs = [examples[i][0] + examples[i][1] for i in idx]
    width = max(map(len, seqs))
    ids = torch.full((len(idx), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        p, s = examples[i]
        n = len(p) + len(s)
        ids[row, :n] = torch.tensor(p + s)
        mask[row, :n] = 1
        # Loss on the solution only: the prompt is given at inference time.
        labels[row, len(p):n] = torch.tensor(s)
    return ids, mask, labels


def _length_bucketed_batches(examples, batch_size: int, gen, window: int = 32) -> list[list[int]]:
    """One epoch of batches, shuffled, each cut from a length-sorted window of `window` batches:
    padding would otherwise cost ~30% of every step (lengths vary from ~60 to ~130 tokens)."""
    perm = torch.randperm(len(examples), generator=gen).tolist()
    batches = []
    span = window * batch_size
    for w in range(0, len(perm) - batch_size + 1, span):
        chunk = sorted(perm[w:w + span], key=lambda i: len(examples[i][0]) + len(examples[i][1]))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order][::-1]


def train_model(spec: ModelSpec, vocab_size: int, examples, seed: int, log=print,
                threads: int = 2, callback=None, callback_every: int = 100) -> LlamaForCausalLM:
    """Train from scratch. ``callback(step, model)`` (optional) runs every ``callback_every``
    steps in eval mode, e.g. to measure accuracy along the way."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(spec.config(vocab_size))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step):  # linear warmup, cosine to 10%: converges in few steps at a high peak lr
        if step < spec.warmup:
            return (step + 1) / spec.warmup
        t = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    bs = min(spec.batch_size, len(examples))
    batches = _length_bucketed_batches(examples, bs, gen)
    for step in range(spec.steps):
        if not batches:
            batches = _length_bucketed_batches(examples, bs, gen)
        idx = batches.pop()
        ids, mask, labels = _batch(examples, idx)
        # Right padding under a causal mask: real tokens never see pads, and pads carry no
        # labels, so no attention mask is needed (it would force the slower masked SDPA path).
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log and (step % 100 == 0 or step == spec.steps - 1):
            log(f"  step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:6.1f}s")
        if callback is not None and step > 0 and (step + 1) % callback_every == 0:
            model.eval()
            callback(step + 1, model)
            model.train()
    model.eval()
    return model


@torch.no_grad()
def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int = 96,
                    batch_size: int = 128, eos_token_id: int = EOS_ID) -> list[list[int]]:
    """Greedy responses (EOS included when produced), batched with left padding."""
    out: list[list[int]] = []
    dev = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(chunk):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos_token_id, pad_token_id=PAD_ID)
        for row in gen[:, width:].tolist():
            resp = []
            for t in row:
                resp.append(t)
                if t == eos_token_id:
                    break
            out.append(resp)
    return out
