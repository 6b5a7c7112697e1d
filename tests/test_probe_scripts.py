"""The rules of scripts/probe_context_rules.py (README figures, session 9), on the committed demo
world, the checkpoint lookup scripts/calibrate_checkpoints.py shares with spd-train, and the fresh
problems and record reading of scripts/fresh_check.py (session 17)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from spd_verl.eval.data import load_rows, prompt_ids
from spd_verl.spd import RejectAll, SpeculativeDecoder
from spd_verl.world import load_world
from spd_verl.world.oracle import NonDigitRule

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def probe():
    return _script("probe_context_rules")


@pytest.fixture(scope="module")
def world():
    return load_world()


@pytest.fixture(scope="module")
def decode(world):
    rows = load_rows(world.split("val"), 24)
    prompts = [prompt_ids(world.tokenizer, r["prompt"]) for r in rows]
    dec = SpeculativeDecoder(world.draft, world.target, num_speculative_tokens=6)

    def run(policy):
        torch.manual_seed(0)
        return dec.generate(prompts, policy=policy, max_new_tokens=96, eos_token_id=world.eos_token_id)

    return run


def test_uncapped_rule_is_the_non_digit_rule(probe, world, decode):
    assert decode(probe.CappedNonDigit(world.tokenizer)).responses == decode(NonDigitRule(world.tokenizer)).responses


@pytest.mark.parametrize("cap", [1, 2])
def test_cap_bounds_accepts_per_sequence(probe, world, decode, cap):
    res = decode(probe.CappedNonDigit(world.tokenizer, cap=cap))
    accepts = [sum(rec.actions) for rec in res.decisions]
    assert max(accepts) == cap  # reached by some sequence, exceeded by none
    free = [sum(rec.actions) for rec in decode(NonDigitRule(world.tokenizer)).decisions]
    assert sum(accepts) < sum(free)


def test_cooldown_spaces_accepts(probe, world, decode):
    res = decode(probe.CappedNonDigit(world.tokenizer, cooldown=16))
    for rec in res.decisions:
        taken = [p for p, a in zip(rec.positions, rec.actions) if a]
        assert all(b - a > 16 for a, b in zip(taken, taken[1:]))
    assert any(len([a for a in rec.actions if a]) > 1 for rec in res.decisions)


def test_lookahead_bar_bounds(probe, world, decode):
    loose = decode(probe.LookaheadNonDigit(world.tokenizer, world.target, max_entropy=1e9))
    assert loose.responses == decode(NonDigitRule(world.tokenizer)).responses
    strict = decode(probe.LookaheadNonDigit(world.tokenizer, world.target, max_entropy=0.0))
    assert strict.responses == decode(RejectAll()).responses


def test_small_first_sum_reads_the_prefix(probe, world):
    rule = probe.OperandOrderNonDigit(world.tokenizer)
    q = "<s> Q : Mia has 8 pens . She buys 4 2 . Then she buys 4 8 . How many pens does she have now ? A :"

    def small_first(answer):
        return rule.small_first_sum(world.tokenizer.encode(f"{q} {answer}", add_special_tokens=False))

    assert small_first("At first she has 8 . First , she gets 4 2")  # 8 + 42
    assert not small_first("At first she has 8 . First , she gets 4 2 : 8 + 4 2 = 5 0 . Next , she gets 4 8")
    assert not small_first("At first she has 8 . First , she loses 4 2")  # a difference, not a sum
    assert not small_first("At first she has 8 . First")  # no number before the ":"


def test_operand_order_rule_rejects_only_colons(probe, world, decode):
    free = decode(NonDigitRule(world.tokenizer)).decisions
    ordered = decode(probe.OperandOrderNonDigit(world.tokenizer)).decisions
    colon = world.tokenizer.convert_tokens_to_ids(":")
    differ = 0
    for a, b in zip(free, ordered):
        # Identical up to the first decision where the rules differ; there the draft offered ":".
        for d, x, y in zip(a.draft_tokens, a.actions, b.actions):
            if x != y:
                assert d == colon and x == 1 and y == 0
                differ += 1
                break
    assert differ  # some ":" in these problems opens a small-first sum


def test_judge_exports_in_step_order(tmp_path):
    from spd_verl.train import judge_exports, latest_judge

    (tmp_path / "global_step_10").mkdir()
    with pytest.raises(FileNotFoundError, match="no judge export under"):
        judge_exports(tmp_path)
    for step in (10, 2, 30):
        (tmp_path / f"global_step_{step}" / "judge").mkdir(parents=True)
        (tmp_path / f"global_step_{step}" / "judge" / "config.json").write_text("{}")
    (tmp_path / "global_step_40").mkdir()  # saved without an export: not a judge
    assert [s for s, _ in judge_exports(tmp_path)] == [2, 10, 30]
    assert latest_judge(tmp_path) == tmp_path / "global_step_30" / "judge"


def test_equation_errors_by_operand_order(probe):
    texts = ["At first she has 8 . First , she gets 4 2 : 8 + 4 2 = 4 0 . Next , she loses 3 : 4 0 - 3 = 3 7 .",
             "First , he finds 3 5 , so 3 5 + 2 2 = 5 7 . So he has 5 7 . #### 57"]
    assert probe.equation_errors(texts) == {"sum, larger first": [1, 0], "sum, smaller first": [1, 1],
                                            "difference": [1, 0]}


def test_fresh_rows_are_disjoint_and_deterministic(probe, world):
    rows = probe.fresh_rows(world, 30, seed=5)
    assert len(rows) == 30 and rows == probe.fresh_rows(world, 30, seed=5)
    held = {r["prompt"][0]["content"] for s in ("train", "val", "test", "calib") for r in load_rows(world.split(s))}
    assert not held & {r["prompt"][0]["content"] for r in rows}
    assert all(r["ground_truth"].lstrip("-").isdigit() for r in rows)


@pytest.mark.parametrize("args, message", [
    (["--grid", "0,0.5"], "--grid"),
    (["--grid", "0.02,1.0"], "--grid"),
    (["--min-runs", "1,9", "--gamma", "8"], "--min-runs"),
])
def test_calibrate_checkpoints_rejects_bad_settings(tmp_path, capsys, args, message):
    cal = _script("calibrate_checkpoints")
    with pytest.raises(SystemExit) as exc:
        cal.main([str(tmp_path), *args])
    assert message in f"{exc.value}{capsys.readouterr().err}"  # argparse reports on stderr


@pytest.fixture(scope="module")
def fresh_check():
    return _script("fresh_check")


def test_fresh_check_draws_problems_no_model_saw(fresh_check, world):
    probs = fresh_check.fresh_problems(40, seed=11)
    assert len(probs) == 40 and [p.question for p in probs] == [p.question for p in fresh_check.fresh_problems(40, 11)]
    committed = {r["prompt"][0]["content"] for s in ("train", "val", "test", "calib") for r in load_rows(world.split(s))}
    assert committed <= fresh_check.held_questions()  # the whole training draw, not only the committed part
    assert not fresh_check.held_questions() & {p.question for p in probs}
    with pytest.raises(ValueError, match="only 0 of 10 fresh problems are disjoint"):
        fresh_check.fresh_problems(10, seed=1)  # generator seed 1 is the world's training draw


def test_fresh_check_reads_both_record_formats(fresh_check, tmp_path):
    pick = dict(name="judge@0.4", setting=0.4, min_run=1, accuracy=0.975, tau=5.0)
    run = tmp_path / "runX"
    run.mkdir()
    held = [dict(name="reject_all"), dict(name="judge@0.2"), dict(name="judge@0.4", accuracy=0.99)]
    (run / "held_out_eval.json").write_text(json.dumps(dict(judge="J", gamma=8, calibration_pick=pick, held_out=held)))
    (tmp_path / "recal.json").write_text(json.dumps(dict(gamma=10, checkpoints=[
        dict(step=60, judge="K", pick=pick, held_out=None)])))
    (a,), (b,) = fresh_check.picks(run / "held_out_eval.json"), fresh_check.picks(tmp_path / "recal.json")
    assert (a["name"], a["judge"], a["gamma"], a["held_out"]["accuracy"]) == ("runX", "J", 8, 0.99)
    assert (b["name"], b["judge"], b["gamma"], b["held_out"]) == ("recal step 60", "K", 10, None)
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="neither spd-train's held_out_eval.json nor a calibrate_checkpoints.py"):
        fresh_check.picks(tmp_path / "other.json")
    (run / "held_out_eval.json").write_text(json.dumps(dict(judge="J", gamma=8, calibration_pick=None, held_out=held)))
    with pytest.raises(ValueError, match=r"no calibrated pick for \['runX'\]"):
        fresh_check.picks(run / "held_out_eval.json")


def test_lost_answers_lists_what_each_pick_loses_against_lossless(world, tmp_path, capsys):
    """scripts/lost_answers.py (session 21): per pick, the problems it answers wrongly where lossless
    SD is right (lost) and the reverse (gained); their balance is the accuracy difference."""
    from spd_verl.scoring_model import ScoringModel, export_judge

    script = _script("lost_answers")
    export_judge(ScoringModel.from_backbone(world.draft), tmp_path / "judge")  # P(accept) 0.5 everywhere
    for run, setting in (("accepts_all", 0.4), ("rejects_all", 0.6)):
        (tmp_path / run).mkdir()
        pick = dict(name=f"judge@{setting}", setting=setting, min_run=1, accuracy=0.9, tau=5.0)
        (tmp_path / run / "held_out_eval.json").write_text(json.dumps(dict(
            judge=str(tmp_path / "judge"), gamma=8, calibration_pick=pick, held_out=[dict(name="reject_all")])))
    records = [str(tmp_path / run / "held_out_eval.json") for run in ("accepts_all", "accepts_all", "rejects_all")]
    script.main(records + ["--split", "val", "--limit", "24", "--out", str(tmp_path / "lost.json")])
    res = json.loads((tmp_path / "lost.json").read_text())
    base = set(res["lossless_wrong"]["8"])
    a, a2, r = res["picks"]
    assert a == a2 and a["lost"] and not set(a["lost"]) & base  # accepting every draft token loses answers
    assert set(a["wrong"]) == base - set(a["gained"]) | set(a["lost"])
    assert len(a["wrong"]) == round(24 * (1 - a["accuracy"]))
    assert (r["wrong"], r["lost"], r["gained"]) == (sorted(base), [], [])  # rejecting every mismatch is lossless SD
    assert res["lost_by_every_pick"] == []
    assert "| accepts_all: judge@0.4 (γ 8) |" in capsys.readouterr().out
