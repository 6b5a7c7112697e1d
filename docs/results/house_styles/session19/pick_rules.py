"""Ad-hoc (session 19): pick rules compared offline on all_candidates.py records.

For each run, each calib set S (C = the shipped calib split, C2 = 1,600 other fresh problems,
C+C2 = both) and each rule, the candidate picked on S, and what it gives on F (2,000 fresh) and T
(test; passes when τ ≥ 4.852 and accuracy ≥ 98.2%).
Rules: raw@tol = most τ with accuracy ≥ lossless − tol on S (spd-train's rule);
iso@tol = the same on accuracies fitted non-increasing in τ per run gate (pool-adjacent-violators).

    python pick_rules.py candidates.jsonl
"""
import json, sys
from collections import defaultdict

def pav_nonincreasing(ys, ws):
    """Weighted isotonic fit, non-increasing, of ys in the given order."""
    blocks = []  # [mean, weight, count]
    for y, w in zip(ys, ws):
        blocks.append([y, w, 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            m2, w2, c2 = blocks.pop(); m1, w1, c1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    out = []
    for m, w, c in blocks:
        out += [m] * c
    return out

def merged(row, keys):
    n = sum(row[k]["n"] for k in keys); correct = sum(row[k]["correct"] for k in keys)
    em = sum(row[k]["emitted_tokens"] for k in keys); tf = sum(row[k]["target_forwards"] for k in keys)
    return dict(n=n, acc=correct / n, tau=em / tf)

def pick(rows, keys, tol, iso):
    base = next(r for r in rows if r["name"] == "reject_all")
    bar = merged(base, keys)["acc"] - tol
    judges = [r for r in rows if r["name"] != "reject_all"]
    stats = {id(r): merged(r, keys) for r in judges}
    fitted = {}
    if iso:
        by_gate = defaultdict(list)
        for r in judges:
            by_gate[r["min_run"]].append(r)
        for g, rs in by_gate.items():
            rs.sort(key=lambda r: stats[id(r)]["tau"])
            fit = pav_nonincreasing([stats[id(r)]["acc"] for r in rs], [stats[id(r)]["n"] for r in rs])
            fitted.update({id(r): f for r, f in zip(rs, fit)})
    else:
        fitted = {id(r): stats[id(r)]["acc"] for r in judges}
    ok = [r for r in judges if fitted[id(r)] >= bar - 1e-12]
    return max(ok, key=lambda r: (stats[id(r)]["tau"], r["setting"], r["min_run"])) if ok else None

def main(path):
    runs = defaultdict(list)
    for line in open(path):
        r = json.loads(line); runs[r["run"]].append(r)
    rules = [("raw", 0.01), ("raw", 0.0075), ("raw", 0.005), ("iso", 0.01), ("iso", 0.0075), ("iso", 0.005)]
    sets = [("C",), ("C2",), ("C", "C2")]
    summary = defaultdict(list)
    for run, rows in runs.items():
        base = next(r for r in rows if r["name"] == "reject_all")
        if base is None or len(rows) < 2:
            continue
        fb, tb = base["F"], base["T"]
        print(f"\n{run}: lossless F {100*fb['accuracy']:.2f}/{fb['tau']:.3f}, T {100*tb['accuracy']:.1f}/{tb['tau']:.3f}")
        for keys in sets:
            for kind, tol in rules:
                p = pick(rows, keys, tol, kind == "iso")
                if p is None:
                    print(f"  {'+'.join(keys):5} {kind}@{tol}: none"); summary[(keys, kind, tol)].append(None); continue
                f, t = p["F"], p["T"]
                floss = 100 * (fb["accuracy"] - f["accuracy"]); fx = f["tau"] / fb["tau"]
                tpass = t["accuracy"] >= tb["accuracy"] - 0.01 - 1e-12 and t["tau"] >= 1.3 * tb["tau"]
                summary[(keys, kind, tol)].append((floss, fx, tpass))
                print(f"  {'+'.join(keys):5} {kind}@{tol}: {p['name']:20} F lost {floss:5.2f} {fx:.3f}x | "
                      f"T {100*t['accuracy']:.1f}/{t['tau']/tb['tau']:.3f}x {'PASS' if tpass else 'miss'}")
    print("\n| set | rule | F loss mean (max) | F τ mean | F ≥1.3× within 1 pt | T passes |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (keys, kind, tol), xs in summary.items():
        ok = [x for x in xs if x is not None]
        if not ok:
            continue
        fl = [x[0] for x in ok]; fx = [x[1] for x in ok]
        good = sum(1 for x in ok if x[0] <= 1.0 and x[1] >= 1.3)
        print(f"| {'+'.join(keys)} | {kind}@{tol} | {sum(fl)/len(fl):.2f} ({max(fl):.2f}) | {sum(fx)/len(fx):.3f} | "
              f"{good}/{len(xs)} | {sum(x[2] for x in ok)}/{len(xs)} |")

if __name__ == "__main__":
    main(sys.argv[1])
