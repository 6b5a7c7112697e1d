"""The world card: what the built world offers a judge, measured (DESIGN.md §8).

For each γ it runs the SD engine with reject_all (lossless), accept_all, the non-digit hand rule
and the single-swap oracle on the test split, and classifies every lossless mismatch with the
single-swap test (harmless = the target still reaches the right answer from the swapped prefix).
"""

from __future__ import annotations

import time

import torch

from spd_verl.world.oracle import NonDigitRule, SingleSwapOracle, digit_token_mask, is_correct
from spd_verl.world.train import greedy_generate


def _accuracy(tokenizer, responses, ground_truths) -> float:
    ok = [is_correct(tokenizer.decode(r, skip_special_tokens=True), g)
          for r, g in zip(responses, ground_truths)]
    return sum(ok) / max(1, len(ok))


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _model_info(model) -> dict:
    c = model.config
    return dict(params=_n_params(model), layers=c.num_hidden_layers, hidden=c.hidden_size,
                heads=c.num_attention_heads, vocab_size=c.vocab_size)


@torch.no_grad()
def compute_card(world, prompts: list[list[int]], ground_truths: list[str],
                 gammas=(4, 6, 8), max_new_tokens: int = 128, log=print) -> dict:
    from spd_verl.spd import AcceptAll, RejectAll, SpeculativeDecoder

    tok, eos = world.tokenizer, world.eos_token_id
    t0 = time.time()
    card = dict(
        draft=_model_info(world.draft), target=_model_info(world.target),
        vocab_size=len(tok), test_problems=len(prompts), max_new_tokens=max_new_tokens,
        draft_accuracy=_accuracy(tok, greedy_generate(world.draft, prompts, max_new_tokens),
                                 ground_truths),
        target_accuracy=_accuracy(tok, greedy_generate(world.target, prompts, max_new_tokens),
                                  ground_truths),
        gammas={},
    )
    is_digit = digit_token_mask(tok)
    for gamma in gammas:
        dec = SpeculativeDecoder(world.draft, world.target, num_speculative_tokens=gamma)
        oracle = SingleSwapOracle(world.target, tok, ground_truths, max_new_tokens, eos)
        rules = {"reject_all": RejectAll(), "accept_all": AcceptAll(),
                 "non_digit": NonDigitRule(tok), "oracle": oracle}
        rows, lossless = {}, None
        for name, policy in rules.items():
            res = dec.generate(prompts, policy=policy, max_new_tokens=max_new_tokens,
                               eos_token_id=eos)
            s = res.stats
            rows[name] = dict(
                tau=s["tau"], accuracy=_accuracy(tok, res.responses, ground_truths),
                mismatches_per_seq=s["mismatches"] / len(prompts),
                accepted_mismatch_rate=s["accepted_mismatch_rate"],
                response_length=s["mean_response_length"])
            if name == "reject_all":
                lossless = res
            log(f"  γ={gamma} {name:11s} τ={s['tau']:.2f} acc={rows[name]['accuracy']:.3f} "
                f"mm/seq={rows[name]['mismatches_per_seq']:.2f}  ({time.time() - t0:.0f}s)")
        g = dict(rules=rows)
        g["headroom"] = rows["oracle"]["tau"] / rows["reject_all"]["tau"]
        gain = rows["oracle"]["tau"] - rows["reject_all"]["tau"]
        g["non_digit_gain_share"] = ((rows["non_digit"]["tau"] - rows["reject_all"]["tau"]) / gain
                                     if gain > 0 else float("nan"))
        g.update(_classify(world, oracle, lossless, prompts, is_digit))
        card["gammas"][str(gamma)] = g
    card["card_seconds"] = time.time() - t0
    return card


def _classify(world, oracle: SingleSwapOracle, res, prompts, is_digit, sample: int = 400) -> dict:
    """Single-swap test on the mismatches of the lossless run (a fixed random sample of at most
    `sample`: each test is a greedy rollout), split by token class."""
    prefixes, drafts, positions, rows, targets = [], [], [], [], []
    for b, rec in enumerate(res.decisions):
        for p, d, t in zip(rec.positions, rec.draft_tokens, rec.target_tokens):
            prefixes.append(prompts[b] + res.responses[b][:p])
            drafts.append(d)
            targets.append(t)
            positions.append(p)
            rows.append(b)
    if not drafts:
        return dict(harmless_share=float("nan"))
    total = len(drafts)
    if total > sample:
        keep = sorted(torch.randperm(total, generator=torch.Generator().manual_seed(0))[:sample].tolist())
        prefixes, drafts, positions, rows, targets = (
            [xs[i] for i in keep] for xs in (prefixes, drafts, positions, rows, targets))
    harmless = oracle.harmless(prefixes, drafts, positions, rows)
    digit = [bool(is_digit[d] or is_digit[t]) for d, t in zip(drafts, targets)]
    n = len(drafts)
    nd = sum(digit)

    def share(sel):
        sel = list(sel)
        return sum(sel) / max(1, len(sel))

    return dict(
        lossless_mismatches=total,
        classified_mismatches=n,
        harmless_share=sum(harmless) / n,
        digit_mismatch_share=nd / n,
        harmless_share_digit=share(h for h, dg in zip(harmless, digit) if dg),
        harmless_share_nondigit=share(h for h, dg in zip(harmless, digit) if not dg),
    )


def _f(v, spec: str) -> str:
    """Format a figure; "n/a" where the card lacks it (a partial card)."""
    return "n/a" if v is None or (isinstance(v, float) and v != v) else format(v, spec)


def format_card(card: dict) -> str:
    d, t = card["draft"], card["target"]
    lines = [
        "# spd_verl demo world card",
        "",
        f"- target: {t['params']:,} params, {t['layers']} layers x {t['hidden']} hidden; "
        f"greedy accuracy on test {_f(card['target_accuracy'], '.1%')}",
        f"- draft:  {d['params']:,} params, {d['layers']} layers x {d['hidden']} hidden; "
        f"greedy accuracy on test {_f(card['draft_accuracy'], '.1%')}",
        f"- vocab size {card['vocab_size']} (shared); {card['test_problems']} test problems; "
        f"max_new_tokens {card['max_new_tokens']}",
        "- oracle = single-swap test (knows the ground truth, so its accuracy can exceed the "
        "target's); non_digit = accept unless the draft or target token is a number",
    ]
    if card.get("note"):
        lines.append(f"- NOTE: {card['note']}")
    lines.append("")
    for gamma, g in card["gammas"].items():
        lines += [f"## γ = {gamma}", "",
                  "| rule | τ | accuracy | mismatches/seq | accepted-mismatch rate | length |",
                  "|---|---|---|---|---|---|"]
        for name, r in g["rules"].items():
            lines.append(f"| {name} | {_f(r.get('tau'), '.2f')} | {_f(r.get('accuracy'), '.1%')} | "
                         f"{_f(r.get('mismatches_per_seq'), '.2f')} | "
                         f"{_f(r.get('accepted_mismatch_rate'), '.1%')} | "
                         f"{_f(r.get('response_length'), '.1f')} |")
        lines += [
            "",
            f"- oracle headroom (oracle τ / lossless τ): {_f(g.get('headroom'), '.2f')}x",
            f"- non-digit rule captures {_f(g.get('non_digit_gain_share'), '.0%')} of the "
            f"oracle's τ gain",
            f"- lossless mismatches: {_f(g.get('lossless_mismatches'), 'd')} (single-swap tested: "
            f"{_f(g.get('classified_mismatches'), 'd')}), harmless "
            f"{_f(g.get('harmless_share'), '.1%')}; digit mismatches "
            f"{_f(g.get('digit_mismatch_share'), '.1%')} of all, of which harmless "
            f"{_f(g.get('harmless_share_digit'), '.1%')}; non-digit harmless "
            f"{_f(g.get('harmless_share_nondigit'), '.1%')}",
            "",
        ]
    return "\n".join(lines)
