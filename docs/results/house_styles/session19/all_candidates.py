"""Ad-hoc (session 19): every fine-stage candidate of a spd-train run, decoded on the test split (T),
on session 17's 2,000 fresh problems (F, seed 424242) and on session 18's other 1,600 fresh problems
(C2, seed 515151), so that pick rules can be compared offline on the same judges.

    python all_candidates.py RUN/held_out_eval.json OUT.jsonl   # one line per candidate (appends)
"""
import importlib.util, json, sys
from pathlib import Path

spec = importlib.util.spec_from_file_location("fc", "/work/main/scripts/fresh_check.py")
fc = importlib.util.module_from_spec(spec); spec.loader.exec_module(fc)
from spd_verl.eval.data import load_eval_judge, load_rows
from spd_verl.eval.sweep import Rule, evaluate, judge_rule
from spd_verl.spd import RejectAll
from spd_verl.world import load_world

world = load_world()
sets = {"T": load_rows(world.split("test")), "F": fc.fresh_rows(2000, 424242), "C2": fc.fresh_rows(1600, 515151)}
kw = dict(gamma=8, max_new_tokens=96, eos_token_id=world.eos_token_id, progress=False, batch_size=400)
rec = json.loads(Path(sys.argv[1]).read_text())
out = Path(sys.argv[2])
done = {(l["run"], l["name"]) for l in map(json.loads, out.open())} if out.exists() else set()
run = str(Path(sys.argv[1]).parent)
judge = load_eval_judge(rec["judge"], world.target)
cands = [r for r in rec["calibration_fine"] if not r.get("reused_from")]
for c in cands:
    if (run, c["name"]) in done:
        continue
    rule = Rule.fixed("reject_all", RejectAll()) if c["rule"] == "reject_all" else judge_rule(c["setting"], c.get("min_run", 1))
    res = {k: evaluate([rule], world.draft, world.target, judge if rule.needs_judge else None, world.tokenizer, rows, **kw)[0]
           for k, rows in sets.items()}
    line = dict(run=run, name=c["name"], setting=c["setting"], min_run=c.get("min_run", 1), C=c, **res)
    with out.open("a") as fh:
        fh.write(json.dumps(line, default=str) + "\n")
    print(c["name"], {k: (v["correct"], round(v["tau"], 3)) for k, v in [("C", c), *res.items()]}, flush=True)
