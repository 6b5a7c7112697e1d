"""Experiment: weight-averaged judges (soups of a run's saved steps) vs single steps, on the swap proxy."""
import dataclasses, json, sys, time
from pathlib import Path
import torch
from spd_verl.eval.data import load_eval_judge, load_rows
from spd_verl.eval.swap_proxy import SwapBank, build_swap_bank, judge_logits, swap_score
from spd_verl.world import load_world

world = load_world(None)
bank_file = Path("/tmp/s22/bank400.pt")
if bank_file.exists():
    bank = SwapBank(**torch.load(bank_file))
else:
    t0 = time.time()
    rows = load_rows(world.split("calib"), limit=400)
    bank = build_swap_bank(world.draft, world.target, world.tokenizer, rows, 8, 96, world.eos_token_id)
    torch.save(dataclasses.asdict(bank), bank_file); print("bank", len(bank), time.time() - t0)

runs = {"demo21": "/tmp/demo21/runs/demo/checkpoints", "R2": "/tmp/s21/R2/checkpoints", "R3": "/tmp/s21/R3/checkpoints"}
def judge(run, step):
    return load_eval_judge(f"{runs[run]}/global_step_{step}/judge", world.target)
def soup(run, steps):
    j = judge(run, steps[-1])
    sds = [judge(run, s).state_dict() for s in steps]
    j.load_state_dict({k: torch.stack([sd[k].float() for sd in sds]).mean(0) for k in sds[0]})
    return j
out = {}
for run in runs:
    res = {}
    for s in range(20, 65, 5):
        res[f"{s}"] = swap_score(judge_logits(judge(run, s), bank), bank)
    for lo in (30, 40, 45, 50):
        steps = list(range(lo, 65, 5))
        res[f"soup{lo}-60"] = swap_score(judge_logits(soup(run, steps), bank), bank)
        # logit ensemble for comparison
        lg = torch.stack([judge_logits(judge(run, s), bank) for s in steps]).mean(0)
        res[f"ens{lo}-60"] = swap_score(lg, bank)
    out[run] = res
    print(run, " ".join(f"{k}:{v:.3f}" for k, v in res.items()), flush=True)
json.dump(out, open("/tmp/s22/soup_proxy.json", "w"), indent=1)
