"""Ad-hoc (session 18): for every judge in bigcal.jsonl, the pick on C at fine tolerances 0.005 and
0.0075 (same candidate rows), evaluated on test and F (seed 424242, 2000).
After the run, its fresh-set block was replaced by fresh_check.fresh_rows, which draws the same rows."""
import importlib.util, json, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("fc", "/work/main/scripts/fresh_check.py")
fc = importlib.util.module_from_spec(spec); spec.loader.exec_module(fc)
from spd_verl.eval.calibrate import pick_threshold
from spd_verl.eval.data import load_eval_judge, load_rows
from spd_verl.eval.sweep import evaluate, judge_rule
from spd_verl.world import load_world
world = load_world()
Frows = fc.fresh_rows(2000, 424242)
test = load_rows(world.split("test"))
kw = dict(gamma=8, max_new_tokens=96, eos_token_id=world.eos_token_id, progress=False, batch_size=400)
done = {(json.loads(l)["judge"], json.loads(l)["name"]) for l in open(sys.argv[2])} if Path(sys.argv[2]).exists() else set()
for line in open(sys.argv[1]):
    rec = json.loads(line)
    judge = None
    for tol in (0.005, 0.0075):
        p = pick_threshold(rec["fine"], tol)
        if p is None or (rec["judge"], p["name"]) in done:
            continue
        done.add((rec["judge"], p["name"]))
        judge = judge or load_eval_judge(rec["judge"], world.target)
        r = judge_rule(p["setting"], p["min_run"])
        t = evaluate([r], world.draft, world.target, judge, world.tokenizer, test, **kw)[0]
        f = evaluate([r], world.draft, world.target, judge, world.tokenizer, Frows, **kw)[0]
        lc = rec["fine"][0]
        out = dict(judge=rec["judge"], name=p["name"], tol=tol, C=p, test=t, F=f)
        with open(sys.argv[2], "a") as fh:
            fh.write(json.dumps(out, default=str) + "\n")
        print(f"{rec['judge'][5:-6]} | tol {tol} | {p['name']} | C lost {100*(lc['accuracy']-p['accuracy']):.2f} {p['tau']/lc['tau']:.3f}x "
              f"| test {100*t['accuracy']:.1f}/{t['tau']/3.732:.3f}x | F lost {100*(0.984-f['accuracy']):.2f} {f['tau']/3.7459:.3f}x", flush=True)
