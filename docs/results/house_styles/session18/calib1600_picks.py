"""Ad-hoc (session 18): calibrate judges with the fine stage on a large fresh calib set C (seed 515151),
then evaluate each pick on test and on the fresh set F (2000, seed 424242; disjoint from C)."""
import importlib.util, json, sys, tempfile, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("fc", "/work/main/scripts/fresh_check.py")
fc = importlib.util.module_from_spec(spec); spec.loader.exec_module(fc)
from spd_verl.eval.calibrate import calibrate
from spd_verl.eval.data import load_eval_judge, load_rows
from spd_verl.eval.sweep import Rule, evaluate, judge_rule
from spd_verl.spd import RejectAll
from spd_verl.world import load_world
from spd_verl.world.build import fresh_problems, to_rows, write_parquet
NC = int(sys.argv[1]); out = Path(sys.argv[2]); judges = sys.argv[3:]
world = load_world()
F = fc.fresh_problems(2000, 424242)
held = fc.held_questions() | {p.question for p in F}
C = fresh_problems(NC, 515151, held)
with tempfile.TemporaryDirectory() as tmp:
    write_parquet(to_rows(F, "fresh"), Path(tmp) / "F.parquet"); write_parquet(to_rows(C, "calib_big"), Path(tmp) / "C.parquet")
    Frows, Crows = load_rows(Path(tmp) / "F.parquet"), load_rows(Path(tmp) / "C.parquet")
val, test = load_rows(world.split("val")), load_rows(world.split("test"))
kw = dict(gamma=8, max_new_tokens=96, eos_token_id=world.eos_token_id, progress=False, batch_size=400)
for j in judges:
    t0 = time.time()
    judge = load_eval_judge(j, world.target)
    pick, coarse, fine = calibrate(world.draft, world.target, judge, world.tokenizer, val, tol=0.01, fine_rows=Crows,
                                   min_runs=[1, 3, 4, 5], **kw)
    rec = dict(judge=j, pick=pick, coarse=coarse, fine=fine)
    if pick is not None:
        r = judge_rule(pick["setting"], pick["min_run"])
        rec["test"] = evaluate([r], world.draft, world.target, judge, world.tokenizer, test, **kw)[0]
        rec["F"] = evaluate([r], world.draft, world.target, judge, world.tokenizer, Frows, **kw)[0]
    with out.open("a") as f:
        f.write(json.dumps(rec, default=str) + "\n")
    lc = fine[0]
    if pick is None:
        print(j, "no pick", round(time.time() - t0), flush=True)
    else:
        print(f"{j} | {pick['name']} | C {100*pick['accuracy']:.2f}/{pick['tau']:.3f} (lossless {100*lc['accuracy']:.2f}/{lc['tau']:.3f}, {pick['tau']/lc['tau']:.3f}x) "
              f"| test {100*rec['test']['accuracy']:.1f}/{rec['test']['tau']:.3f} ({rec['test']['tau']/3.732:.3f}x) "
              f"| F {100*rec['F']['accuracy']:.2f}/{rec['F']['tau']:.3f} ({rec['F']['tau']/3.7459:.3f}x, lost {100*(0.984-rec['F']['accuracy']):.2f}) | {round(time.time()-t0)} s", flush=True)
