"""Deterministic generator of 2-3-step add/subtract word problems with stylistic solutions.

Text conventions (the tokenizer relies on them):
- every token is separated by one space, punctuation included ("Tom has 2 3 apples .");
- numbers in running text are written digit by digit ("2 3" = 23), so the models do column
  arithmetic one digit token at a time;
- the last line is "#### <answer>" with the answer as ONE whole-number token ("#### 47"), so the
  decoded text matches the GSM8K-style regex ``####\\s*(-?\\d+)`` without any glueing.

Why the solutions look the way they do (DESIGN.md §8): a judge must have something to learn.
- Harmless freedom with skewed frequencies: openers, connectives, synonyms of the operation verb,
  an optional restated running total, commuted operands for additions (mostly larger first).
- Harmful wording: each step restates the event with a verb ("he buys 7", "he gives away 7")
  BEFORE the equation. The verb's class (gain/loss) fixes the operator, so a model that reads a
  wrong-class verb continues with the wrong operator, while a same-class synonym is harmless.
  Which class an event has is not always local: "Ann gives him 7" is a gain, "he gives Ann 7"
  a loss, so a weak draft confuses them.
- Harmful digits: every result digit.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace

MAX_OPERAND = 49  # operands < 50
MAX_TOTAL = 99  # running totals stay two-digit: one answer token per value 0..99 in the vocab

MALE = ["Tom", "Sam", "Ben", "Max", "Leo", "Dan"]
FEMALE = ["Ann", "Mia", "Eva", "Zoe", "Lily", "Kim"]
ITEMS = ["apples", "coins", "cards", "stickers", "marbles", "books", "pens", "shells"]

# Problem-side event verbs. "give_in" / "give_out" are the two directions of "gives".
GAIN_EVENTS = ["buys", "finds", "wins", "give_in"]
LOSS_EVENTS = ["sells", "loses", "uses", "give_out"]
# How the solution restates an event (its "echo" verb); several tokens allowed.
ECHO = {
    "buys": "buys", "finds": "finds", "wins": "wins", "give_in": "gets",
    "sells": "sells", "loses": "loses", "uses": "uses", "give_out": "gives away",
}
# Generic same-class synonyms, used instead of the echo a minority of the time.
GAIN_SYNONYMS = [("gains", 0.10), ("gets", 0.08), ("adds", 0.04)]
LOSS_SYNONYMS = [("loses", 0.08), ("gives up", 0.06), ("spends", 0.04)]

# Weighted style choices: the first entry is the canonical wording.
START_STYLES = [("{N} starts with {a} .", 0.70), ("At first {p} has {a} .", 0.20),
                ("{N} has {a} at first .", 0.10)]
MID_OPENERS = [("Then", 0.65), ("Next ,", 0.25), ("After that ,", 0.10)]
FIRST_OPENERS = [("First ,", 0.75), ("To start ,", 0.20), ("", 0.05)]
LAST_OPENERS = [("Finally ,", 0.60), ("Then", 0.30), ("Last ,", 0.10)]
CONNECTIVES = [(", so", 0.75), (":", 0.15), (", and", 0.10)]
FINAL_STYLES = [("So {p} has {r} .", 0.70), ("The answer is {r} .", 0.20), ("", 0.10)]


@dataclass(frozen=True)
class Style:
    """A house style: the weights of every free choice in a solution. Same words, other odds."""

    start: list
    first: list
    mid: list
    last: list
    connective: list
    final: list
    gain_synonyms: list
    loss_synonyms: list
    larger_first: float  # P(larger operand first | addition whose second operand is larger)
    restate_after_loss: float  # P("Now he has r ." after a non-final loss step)
    restate_after_gain: float


# The target's data. The draft learns the same problems written in another house style (as a
# small model tuned on a different corpus would): wherever the two styles' favourite choices
# differ, SD sees a mismatch that is harmless — wording, and *digits* too (the draft writes
# the smaller operand first and restates totals more often), so "reject every digit" is not
# the answer. Harmful mismatches stay: result digits and operation verbs of the wrong class.
TARGET_STYLE = Style(START_STYLES, FIRST_OPENERS, MID_OPENERS, LAST_OPENERS, CONNECTIVES,
                     FINAL_STYLES, GAIN_SYNONYMS, LOSS_SYNONYMS, larger_first=0.85,
                     restate_after_loss=0.7, restate_after_gain=0.25)
DRAFT_STYLE = Style(
    start=[("At first {p} has {a} .", 0.70), ("{N} starts with {a} .", 0.20),
           ("{N} has {a} at first .", 0.10)],
    first=[("To start ,", 0.75), ("First ,", 0.20), ("", 0.05)],
    mid=[("Next ,", 0.65), ("Then", 0.25), ("After that ,", 0.10)],
    last=[("Last ,", 0.60), ("Finally ,", 0.30), ("Then", 0.10)],
    connective=[(":", 0.75), (", so", 0.15), (", and", 0.10)],
    final=[("The answer is {r} .", 0.70), ("So {p} has {r} .", 0.20), ("", 0.10)],
    gain_synonyms=[("gets", 0.45), ("gains", 0.10), ("adds", 0.05)],
    loss_synonyms=[("gives up", 0.30), ("loses", 0.20), ("spends", 0.05)],
    larger_first=0.15, restate_after_loss=0.95, restate_after_gain=0.8)

DATA_SOURCE = "spd_arith"
ANSWER_RE = re.compile(r"####\s*(-?\d+)")


def digits(n: int) -> str:
    """23 -> '2 3': one token per digit in running text."""
    return " ".join(str(n))


def _pick(rng: random.Random, weighted):
    r = rng.random()
    acc = 0.0
    for value, w in weighted:
        acc += w
        if r < acc:
            return value
    return weighted[-1][0]


def _clean(text: str) -> str:
    return " ".join(text.split())


@dataclass
class Problem:
    name: str
    pronoun: str  # "he" / "she"
    item: str
    start: int
    events: list[str]  # event keys, e.g. "buys", "give_out"
    operands: list[int]
    friend: str
    question: str = ""
    solution: str = ""
    steps: list[tuple[int, str, int, int]] = field(default_factory=list)  # (x, op, b, result)

    @property
    def answer(self) -> int:
        return self.steps[-1][3]


def _event_sentence(p: Problem, i: int, ev: str, b: int) -> str:
    # Items are named once (first sentence); later sentences stay short: tokens are training time.
    subj = p.pronoun.capitalize() if i == 0 else f"Then {p.pronoun}"
    obj = "him" if p.pronoun == "he" else "her"
    n = digits(b)
    if ev == "give_in":
        return f"{'Then ' if i else ''}{p.friend} gives {obj} {n} ."
    if ev == "give_out":
        return f"{subj} gives {p.friend} {n} ."
    return f"{subj} {ev} {n} ."


def make_problem(rng: random.Random) -> Problem:
    male = rng.random() < 0.5
    name = rng.choice(MALE if male else FEMALE)
    friend = rng.choice([n for n in MALE + FEMALE if n != name])
    item = rng.choice(ITEMS)
    n_steps = rng.choice([2, 3])
    start = rng.randint(1, MAX_OPERAND)
    events, operands, steps = [], [], []
    x = start
    for _ in range(n_steps):
        # Losses need something to lose; keep results non-negative by construction.
        gain = x == 0 or (x < MAX_TOTAL and rng.random() < 0.5)
        if gain:
            ev, b = rng.choice(GAIN_EVENTS), rng.randint(1, min(MAX_OPERAND, MAX_TOTAL - x))
            r = x + b
        else:
            ev, b = rng.choice(LOSS_EVENTS), rng.randint(1, min(x, MAX_OPERAND))
            r = x - b
        events.append(ev)
        operands.append(b)
        steps.append((x, "+" if gain else "-", b, r))
        x = r
    p = Problem(name, "he" if male else "she", item, start, events, operands, friend, steps=steps)
    p.question = _question(p)
    p.solution = _solution(p, rng)
    return p


def _question(p: Problem) -> str:
    parts = [f"{p.name} has {digits(p.start)} {p.item} ."]
    parts += [_event_sentence(p, i, ev, b) for i, (ev, b) in enumerate(zip(p.events, p.operands))]
    parts.append(f"How many {p.item} does {p.pronoun} have now ?")
    return _clean(" ".join(parts))


def _solution(p: Problem, rng: random.Random, style: Style = TARGET_STYLE) -> str:
    fmt = dict(N=p.name, p=p.pronoun, a=digits(p.start), items=p.item)
    out = [_pick(rng, style.start).format(**fmt)]
    last = len(p.steps) - 1
    for i, ((x, op, b, r), ev) in enumerate(zip(p.steps, p.events)):
        opener = _pick(rng, style.first if i == 0 else style.last if i == last else style.mid)
        syn = _pick(rng, (style.gain_synonyms if op == "+" else style.loss_synonyms) + [(None, 1.0)])
        verb = syn or ECHO[ev]
        # The order of an addition's operands is free: a harmless digit mismatch when the two
        # models order them differently.
        if op == "+" and b > x and rng.random() < style.larger_first:
            eq = f"{digits(b)} + {digits(x)} = {digits(r)}"
        else:
            eq = f"{digits(x)} {op} {digits(b)} = {digits(r)}"
        conn = _pick(rng, style.connective)
        pron = p.pronoun if opener else p.pronoun.capitalize()
        out.append(f"{opener} {pron} {verb} {digits(b)} {conn} {eq} .")
        # Optional restated running total (harmless either way).
        restate = style.restate_after_loss if op == "-" else style.restate_after_gain
        if i < last and rng.random() < restate:
            out.append(f"Now {p.pronoun} has {digits(r)} .")
    fmt.update(r=digits(p.answer))
    final = _pick(rng, style.final).format(**fmt)
    out.append(final)
    out.append(f"#### {p.answer}")
    return _clean(" ".join(out))


def restyle(problems: list[Problem], style: Style, seed: int, share: float = 1.0) -> list[Problem]:
    """The same problems, a ``share`` of them (chosen at random) with solutions re-written in
    ``style``; deterministic from seed."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    rng = random.Random(seed)
    # share == 1 draws nothing extra, so a full restyle is the same stream as before shares.
    return [replace(p, solution=_solution(p, rng, style)) if share == 1.0 or rng.random() < share
            else p for p in problems]


def generate(n: int, seed: int) -> list[Problem]:
    """n problems, a pure function of (n, seed)."""
    rng = random.Random(seed)
    return [make_problem(rng) for _ in range(n)]


def vocabulary() -> list[str]:
    """Every word the generator can emit (sorted), plus whole numbers 0..MAX_TOTAL for the
    final line. Built from the tables above, not from sampled data, so it never depends on luck."""
    words: set[str] = set(str(i) for i in range(MAX_TOTAL + 1))
    tables = [START_STYLES, MID_OPENERS, FIRST_OPENERS, LAST_OPENERS, CONNECTIVES, FINAL_STYLES,
              GAIN_SYNONYMS, LOSS_SYNONYMS]
    for table in tables:
        for text, _ in table:
            words.update(text.split())
    words.update(w for v in ECHO.values() for w in v.split())
    words.update(e for e in GAIN_EVENTS + LOSS_EVENTS if not e.startswith("give"))
    words.update(MALE + FEMALE + ITEMS)
    words.update("he she He She him her gives Then has . , : ? + - = #### How many does have now Now"
                 .split())
    return sorted(w for w in words if not w.startswith("{"))


def check_solution(p: Problem) -> bool:
    """Re-evaluate the arithmetic from the problem itself (independent of the generator state)."""
    x = p.start
    for ev, b in zip(p.events, p.operands):
        x = x + b if ev in GAIN_EVENTS else x - b
        if x < 0:
            return False
    m = ANSWER_RE.search(p.solution)
    return m is not None and int(m.group(1)) == x == p.answer
