"""Reward core (DESIGN.md §5): pure functions, no verl.

    gated (default):  r = correct * (1 + alpha * accepted / max(1, mismatches)) - overlong_penalty * overlong
    correct_only:     r = correct - overlong_penalty * overlong             (the seed's reward)
    tau_bonus:        r = correct * (1 + alpha * (tau - 1) / (gamma)) - overlong_penalty * overlong
    gated_run:        r = correct * (1 + alpha * accepted_run_tokens / response_length) - overlong_penalty * overlong

``gated`` pays every accepted mismatch alike, so an accept the target disagrees with again at once
(one token bought) earns what an accept that keeps the rest of the block earns, and a judge
trained on it leans towards the short runs (README: Results, session 14). ``gated_run`` pays the
draft tokens each accept kept before the block's next mismatch (``DecisionRecord.runs``): the share
of the response the accepts bought, which is what τ counts.

With correctness alone, rejecting everything is optimal (lossless SD is always right), so nothing
is learned about accepting; the bonus is gated by correctness so a wrong answer never pays.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction

_HASH_RE = re.compile(r"####\s*([^\n]*)")
_NUM_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
REWARD_KINDS = ("gated", "correct_only", "tau_bonus", "gated_run")


def _boxed_contents(text: str) -> list[str]:
    """Contents of every \\boxed{...}, with nested braces."""
    out, i = [], 0
    while True:
        i = text.find("\\boxed", i)
        if i < 0:
            return out
        j = text.find("{", i)
        if j < 0:
            return out
        depth, k = 0, j
        while k < len(text):
            depth += {"{": 1, "}": -1}.get(text[k], 0)
            if depth == 0:
                out.append(text[j + 1:k])
                break
            k += 1
        i = k + 1 if k < len(text) else len(text)


def _to_number(s: str) -> Fraction | None:
    s = s.strip().replace(",", "").replace(" ", "").rstrip(".").lstrip("$").rstrip("%")
    if s.startswith("\\frac{") and "}{" in s and s.endswith("}"):
        num, den = s[6:-1].split("}{", 1)
        s = f"{num}/{den}"
    try:
        if "/" in s:
            n, d = s.split("/", 1)
            return Fraction(n) / Fraction(d)
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text: str) -> str | None:
    """The final answer of a solution: the last ``#### x`` line, else the last ``\\boxed{x}``.

    Digits may be separated by spaces (``#### 4 7`` reads as 47). Returns the raw answer string
    (stripped) or None when the text states no final answer.
    """
    hashes = _HASH_RE.findall(text)
    if hashes:
        ans = hashes[-1].strip()
        # A spaced-digit answer ("4 7") is one number; keep text answers as they are.
        if re.fullmatch(r"-?\s*[\d\s,./]+", ans):
            ans = re.sub(r"\s+", "", ans)
        return ans or None
    boxed = _boxed_contents(text)
    if boxed:
        return boxed[-1].strip() or None
    return None


def answers_match(answer: str | None, ground_truth) -> bool:
    """Numeric equivalence when both sides are numbers (``12.0 == 12``, ``1,200 == 1200``,
    ``\\frac{1}{2} == 0.5``), exact string match (whitespace-insensitive) otherwise."""
    if answer is None:
        return False
    gt = str(ground_truth)
    a, g = _to_number(answer), _to_number(gt)
    if a is not None and g is not None:
        return a == g
    return "".join(answer.split()) == "".join(gt.split())


def is_correct(text: str, ground_truth) -> bool:
    return answers_match(extract_answer(text), ground_truth)


@dataclass
class RewardConfig:
    kind: str = field(default="gated", metadata={"help": f"one of {REWARD_KINDS}"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the efficiency bonus (accepted-mismatch "
                                                        "share for gated, normalised tau gain for tau_bonus, "
                                                        "share of the response bought by accepts for gated_run)"})
    overlong_penalty: float = field(default=0.5, metadata={"help": "subtracted when the response hits the "
                                                                   "length cap without finishing"})

    def __post_init__(self):
        if self.kind not in REWARD_KINDS:
            raise ValueError(f"reward kind must be one of {REWARD_KINDS}, got {self.kind!r}")
        if self.alpha < 0 or self.overlong_penalty < 0:
            raise ValueError(f"reward weights must be >= 0, got alpha={self.alpha}, "
                             f"overlong_penalty={self.overlong_penalty}")

    def to_dict(self) -> dict:
        return asdict(self)


def compute_spd_reward(response_text: str, ground_truth, *, mismatches: int, accepted_mismatches: int,
                       target_forwards: int, response_length: int, hit_length_cap: bool,
                       gamma: int | None = None, cfg: RewardConfig | None = None,
                       accepted_run_tokens: int | None = None) -> dict:
    """One sequence's reward and each of its terms (every value a float, for logging).

    accepted_run_tokens: draft tokens the accepted mismatches kept (``DecisionRecord.accepted_run_tokens``);
    needed by kind ``gated_run`` only."""
    cfg = cfg or RewardConfig()
    if accepted_mismatches > mismatches or min(mismatches, accepted_mismatches, target_forwards) < 0:
        raise ValueError(f"inconsistent decision counts: accepted_mismatches={accepted_mismatches}, "
                         f"mismatches={mismatches}, target_forwards={target_forwards}")
    if accepted_run_tokens is not None and not (accepted_mismatches <= accepted_run_tokens <= response_length):
        raise ValueError(f"inconsistent accepted_run_tokens={accepted_run_tokens}: each of the "
                         f"{accepted_mismatches} accepts keeps >= 1 token of a {response_length}-token response")
    correct = float(is_correct(response_text, ground_truth))
    tau = response_length / target_forwards if target_forwards else 0.0
    if cfg.kind == "gated":
        bonus = cfg.alpha * accepted_mismatches / max(1, mismatches)
    elif cfg.kind == "tau_bonus":
        if not gamma:
            raise ValueError("reward kind 'tau_bonus' needs gamma (num_speculative_tokens)")
        bonus = cfg.alpha * max(0.0, tau - 1.0) / gamma
    elif cfg.kind == "gated_run":
        if accepted_run_tokens is None:
            raise ValueError("reward kind 'gated_run' needs accepted_run_tokens (the spd rollout's "
                             "spd_accepted_run_tokens)")
        bonus = cfg.alpha * accepted_run_tokens / max(1, response_length)
    else:
        bonus = 0.0
    overlong = float(hit_length_cap)
    score = correct * (1.0 + bonus) - cfg.overlong_penalty * overlong
    return dict(score=score, correct=correct, acceptance_bonus=correct * bonus,
                overlong_penalty=-cfg.overlong_penalty if overlong else 0.0, overlong=overlong, tau=tau,
                mismatches=float(mismatches), accepted_mismatches=float(accepted_mismatches),
                accepted_mismatch_rate=accepted_mismatches / mismatches if mismatches else 0.0,
                response_length=float(response_length),
                **({} if accepted_run_tokens is None else {"accepted_run_tokens": float(accepted_run_tokens)}))
