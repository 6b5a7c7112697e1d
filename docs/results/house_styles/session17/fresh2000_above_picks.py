"""Ad-hoc: fresh-2000 accuracy/τ of a few judges at settings above their picks (session 17)."""
import importlib.util, json, sys, tempfile
from pathlib import Path
spec = importlib.util.spec_from_file_location("fc", "/work/main/scripts/fresh_check.py")
fc = importlib.util.module_from_spec(spec); spec.loader.exec_module(fc)
from spd_verl.eval.data import load_eval_judge, load_rows
from spd_verl.eval.sweep import Rule, evaluate, judge_rule
from spd_verl.spd import RejectAll
from spd_verl.world import load_world
from spd_verl.world.build import to_rows, write_parquet
world = load_world()
with tempfile.TemporaryDirectory() as tmp:
    write_parquet(to_rows(fc.fresh_problems(2000, 424242), "fresh"), Path(tmp) / "f.parquet")
    rows = load_rows(Path(tmp) / "f.parquet")
kw = dict(gamma=8, max_new_tokens=96, eos_token_id=world.eos_token_id, progress=False)
base = evaluate([Rule.fixed("reject_all", RejectAll())], world.draft, world.target, None, world.tokenizer, rows, **kw)[0]
print("lossless", base["accuracy"], base["tau"], flush=True)
jobs = json.loads(sys.argv[1])
out = []
for judge_dir, settings in jobs:
    judge = load_eval_judge(judge_dir, world.target)
    for t, m in settings:
        r = evaluate([judge_rule(t, m)], world.draft, world.target, judge, world.tokenizer, rows, **kw)[0]
        print(f"| {judge_dir.split('/')[3]} | {r['name']} | {100*r['accuracy']:.2f}% / {r['tau']:.3f} ({r['tau']/base['tau']:.2f}x) | {100*(base['accuracy']-r['accuracy']):.2f} |", flush=True)
        out.append(dict(judge=judge_dir, row=r))
Path("/tmp/s17/frontier.json").write_text(json.dumps(dict(lossless=base, rows=out), indent=1, default=str))
