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

    def decide(self, ctx: DecisionContext) -> torch.Tensor:
        d, t = ctx.draft_tokens.cpu(), ctx.target_tokens.cpu()
        return (~(self.is_digit[d] | self.is_digit[t])).to(ctx.draft_tokens.device)


def greedy_continue(model, prefixes: list[list[int]], max_new_tokens: int, eos_token_id: int,
                    batch_size: int = 256) -> list[list[int]]:
    """Greedy continuation of each prefix (left-padded, batched); EOS included when produced."""
    from .train import greedy_generate

    return greedy_generate(model, prefixes, max(1, max_new_tokens), batch_size, eos_token_id)


class SingleSwapOracle(Policy):
    """Accept a mismatch iff swapping in the draft token alone keeps the final answer right.

    Args:
        target: the target model (greedy continuations).
        tokenizer: decodes the sequence for the answer check.
        ground_truths: per prompt of the generate() call (indexed by ``ctx.rows``).
        max_new_tokens: the response budget of the generate() call.
        eos_token_id: stops continuations.

    The engine asks about every mismatch of a block, but the walk stops at the first reject, so
    mismatches are resolved in rounds by position within each row: round k runs one batched
    greedy generate for the k-th mismatch of every row whose earlier mismatches were accepted;
    later ones of a rejected row are rejected without a rollout (the walk never reaches them).
    """

    name = "single_swap_oracle"
    needs_prefix = True

    def __init__(self, target, tokenizer, ground_truths, max_new_tokens: int, eos_token_id: int):
        self.target = target
        self.tokenizer = tokenizer
        self.ground_truths = [str(g) for g in ground_truths]
        self.max_new_tokens = max_new_tokens
        self.eos_token_id = eos_token_id
        self.rollouts = 0  # number of greedy continuations run (cost accounting)

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
