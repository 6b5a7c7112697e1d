"""Reference acceptance rules for the demo world (DESIGN.md §7-8).

- SingleSwapOracle: accept a mismatch iff the target, continuing greedily from the prefix plus
  the draft token, still reaches the right final answer. It knows the ground truth, so it is an
  upper reference point for a judge, not a deployable rule.
- NonDigitRule: the hand rule "accept unless the draft or the target token is a number". The world
  is built so that this rule is clearly worse than the oracle (harmless commuted operands are
  digits; harmful operation verbs are words).
"""

from __future__ import annotations

import torch

from spd_verl.spd import DecisionContext, Policy
from spd_verl.world.tokenizer import PAD_ID

try:  # the project's answer check (GSM8K "#### n"); fall back to a local regex if absent
    from spd_verl.reward import is_correct
except ImportError:  # pragma: no cover
    import re

    def is_correct(text, ground_truth):
        m = re.findall(r"####\s*(-?\d+)", text)
        return bool(m) and m[-1] == str(ground_truth).strip()


def digit_token_mask(tokenizer) -> torch.Tensor:
    """BoolTensor[vocab]: token is a number ("7", "47")."""
    vocab = tokenizer.get_vocab()
    mask = torch.zeros(max(vocab.values()) + 1, dtype=torch.bool)
    for tok, i in vocab.items():
        mask[i] = tok.isdigit()
    return mask


class NonDigitRule(Policy):
    """Accept a mismatch unless the draft or the target token is a number."""

    name = "non_digit"

    def __init__(self, tokenizer):
        self.is_digit = digit_token_mask(tokenizer)

    def harmless(self, prefixes, drafts, positions, rows) -> list[bool]:
        """Single-swap test for a list of decisions, with one batched greedy generate."""
        drafts = [int(d) for d in drafts]
        run = [i for i, (d, p) in enumerate(zip(drafts, positions))
               if d != self.eos_token_id and p + 1 < self.max_new_tokens]
        conts = {}
        if run:  # a draft EOS ends the sequence right there: nothing to continue
            budget = max(self.max_new_tokens - positions[i] - 1 for i in run)
            outs = greedy_continue(self.target, [list(prefixes[i]) + [drafts[i]] for i in run],
                                   budget, self.eos_token_id)
            conts = dict(zip(run, outs))
            self.rollouts += len(run)
        out = []
        for i, d in enumerate(drafts):
            cont = conts.get(i, [])[:max(0, self.max_new_tokens - positions[i] - 1)]
            # Decode the whole sequence: the answer line may lie before the swapped token.
            text = self.tokenizer.decode(list(prefixes[i]) + [d] + cont, skip_special_tokens=True)
            out.append(bool(is_correct(text, self.ground_truths[rows[i]])))
        return out

    def decide(self, ctx: DecisionContext) -> torch.Tensor:
        n = ctx.draft_tokens.numel()
        accept = torch.zeros(n, dtype=torch.bool)
        rows, pos = ctx.rows.tolist(), ctx.positions.tolist()
        drafts = ctx.draft_tokens.tolist()
        by_row: dict[int, list[int]] = {}
        for i in sorted(range(n), key=lambda i: (rows[i], pos[i])):
            by_row.setdefault(rows[i], []).append(i)
        alive = {r: 0 for r in by_row}  # row -> index of its next undecided mismatch
        while alive:
            batch = [by_row[r][k] for r, k in alive.items()]
            ok = self.harmless([ctx.prefixes[i] for i in batch], [drafts[i] for i in batch],
                               [pos[i] for i in batch], [rows[i] for i in batch])
            nxt = {}
            for i, good in zip(batch, ok):
                accept[i] = good
                k = alive[rows[i]] + 1
                if good and k < len(by_row[rows[i]]):
                    nxt[rows[i]] = k
            alive = nxt
        return accept.to(ctx.draft_tokens.device)
