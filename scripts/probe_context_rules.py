"""Probe two context signals a judge could use, with training-free rules on the demo world.

Both start from the non-digit hand rule (accept a mismatch unless a number is involved):

* ``cap=K`` / ``cooldown=W``: at most K accepts per sequence / no accept within W tokens of the
  previous one. If the harm built up with the draft wording a sequence already holds, a cap would
  keep most of the τ and lose few answers.
* ``lookahead=H``: accept only if the target's entropy at the *next* position, given the draft
  token, is below H. The verification pass computes that distribution anyway (the target reads
  d_1..d_γ), so a judge could get it for free; this probe recomputes it from the prefix.

Prints accuracy and τ per rule against lossless SD on the same problems (README: Results, session 9).

    python scripts/probe_context_rules.py --data spd_verl/assets/world/data/calib.parquet
    python scripts/probe_context_rules.py --fresh 1000      # the README's table
    python scripts/probe_context_rules.py --data spd_verl/assets/world/data/calib.parquet --gamma 8 \
        --caps "" --cooldowns "" --entropies "" --run-gates 5,6      # the run gate (README session 13)
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch

from spd_verl.eval.data import load_rows, normalize_row
from spd_verl.eval.sweep import Rule, evaluate
from spd_verl.spd import RejectAll, RunGated
from spd_verl.spd.policies import DecisionContext, Policy
from spd_verl.world import load_world
from spd_verl.world.oracle import NonDigitRule


class CappedNonDigit(NonDigitRule):
    """Non-digit rule with at most ``cap`` accepts per sequence and ``cooldown`` tokens between
    accepts. The engine decides a block's mismatches at once and walks them until the first
    reject, so a row's decisions are counted in position order up to its first reject."""

    def __init__(self, tokenizer, cap: int | None = None, cooldown: int = 0):
        super().__init__(tokenizer)
        self.cap, self.cooldown = cap, cooldown
        self.accepted = defaultdict(int)
        self.last = {}
        self.name = f"non_digit cap={cap} cooldown={cooldown}"

    def decide(self, ctx: DecisionContext) -> torch.Tensor:
        ok = super().decide(ctx).cpu()
        out = torch.zeros_like(ok)
        stopped = set()
        for k in sorted(range(len(ok)), key=lambda k: (int(ctx.rows[k]), int(ctx.positions[k]))):
            row, pos = int(ctx.rows[k]), int(ctx.positions[k])
            if row in stopped:
                continue
            if (ok[k] and (self.cap is None or self.accepted[row] < self.cap)
                    and (row not in self.last or pos - self.last[row] > self.cooldown)):
                out[k] = True
                self.accepted[row] += 1
                self.last[row] = pos
            else:
                stopped.add(row)
        return out.to(ctx.draft_tokens.device)


class LookaheadNonDigit(NonDigitRule):
    """Non-digit rule that also needs the target's next-position entropy (given the draft token)
    below ``max_entropy`` nats."""

    needs_prefix = True

    def __init__(self, tokenizer, target, max_entropy: float):
        super().__init__(tokenizer)
        self.target, self.max_entropy = target, max_entropy
        self.name = f"non_digit lookahead_entropy<{max_entropy:g}"

    @torch.no_grad()
    def next_entropy(self, seqs: list[list[int]]) -> torch.Tensor:
        L = max(map(len, seqs))
        ids = torch.zeros(len(seqs), L, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):  # left-padded: the last position is each sequence's own
            ids[i, L - len(s):] = torch.tensor(s)
            mask[i, L - len(s):] = 1
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        logits = self.target(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
        lp = torch.log_softmax(logits, dim=-1)
        return -(lp.exp() * lp).sum(-1)

    def decide(self, ctx: DecisionContext) -> torch.Tensor:
        ok = super().decide(ctx).cpu()
        idx = ok.nonzero().flatten().tolist()
        if idx:
            d = ctx.draft_tokens.cpu()
            ent = self.next_entropy([ctx.prefixes[k] + [int(d[k])] for k in idx])
            ok[idx] = ent < self.max_entropy
        return ok.to(ctx.draft_tokens.device)


EQUATION = re.compile(r"((?:\d )+)([+-]) ((?:\d )+)= ((?:\d )+)")


def equation_errors(texts: list[str]) -> dict[str, list[int]]:
    """[equations, wrong ones] per kind over decoded answers ("4 2 + 8 = 5 0" style): sums with the
    larger operand first, sums with the smaller first, differences."""
    out = {"sum, larger first": [0, 0], "sum, smaller first": [0, 0], "difference": [0, 0]}
    for text in texts:
        for a, op, b, c in EQUATION.findall(text + " "):
            a, b, c = (int(x.replace(" ", "")) for x in (a, b, c))
            kind = "difference" if op == "-" else ("sum, smaller first" if a < b else "sum, larger first")
            out[kind][0] += 1
            out[kind][1] += (a + b if op == "+" else a - b) != c
    return out


GAIN_WORDS = {"gets", "gains", "adds", "buys", "finds", "wins"}


class OperandOrderNonDigit(NonDigitRule):
    """Non-digit rule that also rejects the draft's ":" where the equation it opens would be a sum
    with the smaller operand first. The draft's style writes "start + change" after ":", the
    target's own style the larger operand first; the target's sums in the other order are where
    its arithmetic fails. Reads the numbers from the decoded prefix: the running total (the last
    "= N" of the answer, else the question's first number) and the change (the last number)."""

    needs_prefix = True

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.tokenizer = tokenizer
        self.colon = tokenizer.convert_tokens_to_ids(":")
        self.name = "non_digit never_small_first_colon"

    def small_first_sum(self, prefix: list[int]) -> bool:
        text = self.tokenizer.decode(prefix)
        question, _, answer = text.partition(" A :")
        words = answer.split()
        numbers = []  # (word index of the last digit, value) for each digit run of the answer
        k = 0
        while k < len(words):
            if words[k].isdigit():
                j = k
                while j + 1 < len(words) and words[j + 1].isdigit():
                    j += 1
                numbers.append((k, j, int("".join(words[k:j + 1]))))
                k = j + 1
            else:
                k += 1
        if not numbers or numbers[-1][1] != len(words) - 1:
            return False  # the ":" does not follow a number: no equation is being opened
        start, _, change = numbers[-1]
        if start == 0 or words[start - 1] not in GAIN_WORDS:
            return False
        totals = [v for (a, _, v) in numbers if a > 0 and words[a - 1] == "="]
        if totals:
            total = totals[-1]
        else:
            q = [w for w in question.split()]
            digits = next((i for i, w in enumerate(q) if w.isdigit()), None)
            if digits is None:
                return False
            end = digits
            while end + 1 < len(q) and q[end + 1].isdigit():
                end += 1
            total = int("".join(q[digits:end + 1]))
        return total < change

    def decide(self, ctx: DecisionContext) -> torch.Tensor:
        ok = super().decide(ctx).cpu()
        d = ctx.draft_tokens.cpu()
        for k in (ok & (d == self.colon)).nonzero().flatten().tolist():
            ok[k] = not self.small_first_sum(ctx.prefixes[k])
        return ok.to(ctx.draft_tokens.device)


def fresh_rows(world, n: int, seed: int) -> list[dict]:
    """n problems drawn like the world's splits, none of whose questions is in train/val/test/calib."""
    from spd_verl.world.build import fresh_problems, to_rows

    held = {r["prompt"][0]["content"] for s in ("train", "val", "test", "calib") for r in load_rows(world.split(s))}
    drawn = fresh_problems(n, seed, held)
    return [normalize_row(r, i) for i, r in enumerate(to_rows(drawn, "fresh"))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="verl parquet with prompts and ground truths")
    ap.add_argument("--fresh", type=int, help="instead of --data: N fresh problems, disjoint from the world's splits")
    ap.add_argument("--seed", type=int, default=987654, help="generator seed of --fresh")
    ap.add_argument("--limit", type=int, help="first N problems")
    ap.add_argument("--gamma", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--caps", default="1,2,3,4,6", help="comma-separated caps on accepts per sequence")
    ap.add_argument("--cooldowns", default="16", help="comma-separated cooldowns (tokens)")
    ap.add_argument("--entropies", default="0.05,0.2", help="comma-separated lookahead entropy bars (nats)")
    ap.add_argument("--run-gates", default="", help="comma-separated run gates (spd.RunGated) on the non-digit rule "
                    "(README session 13; give empty --caps/--cooldowns/--entropies to run only these)")
    ap.add_argument("--world", default=None, help="world directory (default: the packaged one)")
    args = ap.parse_args(argv)
    world = load_world(args.world)
    tok, draft, target = world.tokenizer, world.draft, world.target
    if (args.data is None) == (args.fresh is None):
        ap.error("give exactly one of --data and --fresh")
    rows = fresh_rows(world, args.fresh, args.seed) if args.fresh else load_rows(args.data, args.limit)

    def rule(make, name):  # a fresh policy per batch: the cap state is per generate call
        return Rule("probe", None, lambda _batch: make(), name)

    def floats(s):
        return [float(x) for x in s.split(",") if x]

    rules = [Rule.fixed("reject_all", RejectAll()), rule(lambda: CappedNonDigit(tok), "non_digit")]
    rules += [rule(lambda c=int(c): CappedNonDigit(tok, cap=c), f"non_digit cap={int(c)}") for c in floats(args.caps)]
    rules += [rule(lambda w=int(w): CappedNonDigit(tok, cooldown=w), f"non_digit cooldown={int(w)}")
              for w in floats(args.cooldowns)]
    rules += [rule(lambda h=h: LookaheadNonDigit(tok, target, h), f"non_digit lookahead_entropy<{h:g}")
              for h in floats(args.entropies)]
    rules += [rule(lambda m=int(m): RunGated(NonDigitRule(tok), m), f"non_digit run>={int(m)}")
              for m in floats(args.run_gates)]
    rules.append(rule(lambda: OperandOrderNonDigit(tok), "non_digit never_small_first_colon"))
    res = evaluate(rules, draft, target, None, tok, rows, gamma=args.gamma, max_new_tokens=args.max_new_tokens,
                   eos_token_id=world.eos_token_id, progress=False, keep_outputs=True)
    base = res[0]
    bar = base["correct"] - 0.01 * base["n"]
    print(f"| rule ({base['n']} problems) | correct | accuracy | τ | vs lossless | accepted mismatches |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in res:
        keeps = "" if r["correct"] >= bar else " (misses the bar)"
        print(f"| {r['name']} | {r['correct']} | {100 * r['accuracy']:.2f}%{keeps} | {r['tau']:.3f} | "
              f"{r['tau'] / base['tau']:.2f}× | {r['accepted_mismatch_rate']:.3f} |")
    print("\nThe target's equations in those answers (wrong / written):\n")
    kinds = list(equation_errors([]))
    print("| rule | " + " | ".join(kinds) + " |")
    print("| --- |" + " --- |" * len(kinds))
    for r in res:
        eq = equation_errors(r["outputs"])
        print(f"| {r['name']} | " + " | ".join(f"{eq[k][1]} / {eq[k][0]} ({100 * eq[k][1] / max(1, eq[k][0]):.1f}%)"
                                                for k in kinds) + " |")


if __name__ == "__main__":
    main()
