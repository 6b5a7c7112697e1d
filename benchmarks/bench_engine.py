"""Engine vs Hugging Face assisted generation (``generate(assistant_model=...)``), lossless mode.

Same prompts, same γ, greedy; outputs must be identical. Prints tokens/s at batch 1 and total
time for a set of prompts (HF looped: it does not batch assisted generation; ours batched), and
the ratios. Both run in this process, interleaved, so machine noise hits both alike.

    .venv/bin/python benchmarks/bench_engine.py [--prompts 16] [--gamma 4] [--max-new-tokens 96] [--world DIR]
"""

from __future__ import annotations

import argparse
import time

import torch

from spd_verl.spd import RejectAll, SpeculativeDecoder


def load(args):
    from spd_verl.world import load_world

    world = load_world(args.world)
    import pandas as pd

    rows = pd.read_parquet(world.split("test")).head(args.prompts)
    prompts = []
    for msgs in rows["prompt"]:
        ids = world.tokenizer.apply_chat_template(list(msgs), add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return world.draft, world.target, prompts, world.eos_token_id


def hf_assisted(target, draft, prompt, gamma, max_new_tokens, eos):
    draft.generation_config.num_assistant_tokens = gamma
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0  # always draft γ tokens, like ours
    ids = torch.tensor([prompt])
    out = target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=draft, do_sample=False,
                          max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos)
    return out[0, len(prompt):].tolist()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--world", help="world dir (default: the packaged demo world)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    draft, target, prompts, eos = load(args)
    dec = SpeculativeDecoder(draft, target, num_speculative_tokens=args.gamma)

    # Warm-up and the lossless check.
    for p in prompts:
        ours = dec.generate([p], RejectAll(), max_new_tokens=args.max_new_tokens, eos_token_id=eos).responses[0]
        hf = hf_assisted(target, draft, p, args.gamma, args.max_new_tokens, eos)
        if ours != hf:
            raise SystemExit(f"outputs differ on a prompt: ours={ours} hf={hf}")
    print(f"lossless check: identical outputs on {len(prompts)} prompts (γ={args.gamma})")

    t_hf1 = t_ours1 = t_hf_all = t_ours_all = 0.0
    n_tokens = 0
    for _ in range(args.repeats):
        for p in prompts:  # batch 1, interleaved
            t0 = time.perf_counter()
            r = dec.generate([p], RejectAll(), max_new_tokens=args.max_new_tokens, eos_token_id=eos)
            t_ours1 += time.perf_counter() - t0
            t0 = time.perf_counter()
            hf_assisted(target, draft, p, args.gamma, args.max_new_tokens, eos)
            t_hf1 += time.perf_counter() - t0
            n_tokens += len(r.responses[0])
        t0 = time.perf_counter()
        dec.generate(prompts, RejectAll(), max_new_tokens=args.max_new_tokens, eos_token_id=eos)
        t_ours_all += time.perf_counter() - t0
        t0 = time.perf_counter()
        for p in prompts:
            hf_assisted(target, draft, p, args.gamma, args.max_new_tokens, eos)
        t_hf_all += time.perf_counter() - t0
    R = args.repeats
    print(f"batch 1:  ours {n_tokens / t_ours1:8.1f} tok/s   HF assisted {n_tokens / t_hf1:8.1f} tok/s   "
          f"ratio {t_hf1 / t_ours1:.2f}x")
    print(f"{len(prompts)} prompts: ours batched {t_ours_all / R:6.2f} s   HF looped {t_hf_all / R:6.2f} s   "
          f"ratio {t_hf_all / t_ours_all:.2f}x")


if __name__ == "__main__":
    main()
