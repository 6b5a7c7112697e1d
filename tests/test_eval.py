"""spd-eval on a tiny random world (seconds, no world build)."""

import csv
import json
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from spd_verl.eval import build_rules, evaluate, load_rows, mark_pareto, pareto_front, prompt_ids, verdicts
from spd_verl.eval.__main__ import main
from spd_verl.eval.sweep import COLUMNS, reference_rules
from spd_verl.scoring_model import ScoringModel, export_judge, load_judge
from spd_verl.spd import AcceptAll, Policy, RejectAll
from tiny import perturbed, tiny_llama

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "Q", "A", ":", "####", "+", "-", "=", "is", "the", "answer"] + \
    [str(d) for d in range(10)] + [f"w{i}" for i in range(26)]  # 50 tokens
TEMPLATE = ("{{ bos_token }}{% for m in messages %}Q : {{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %} A :{% endif %}")
FAST = ["--gamma", "3", "--max-new-tokens", "12", "--batch-size", "4", "--thresholds", "0.3,0.7",
        "--target-prob-eps", "0.1,0.3", "--typical-eps", "0.2", "--no-progress"]


def make_tokenizer():
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", chat_template=TEMPLATE, clean_up_tokenization_spaces=False)


def export_biased_judge(backbone, path, bias):
    judge = ScoringModel.from_backbone(backbone)
    with torch.no_grad():
        judge.score_head.weight.zero_()
        judge.score_head.bias.fill_(bias)
    export_judge(judge, path)
    return path


def write_rows(path, n, data_source="tiny", seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        a, b = torch.randint(0, 10, (2,), generator=g).tolist()
        rows.append(dict(prompt=[{"role": "user", "content": f"{a} + {b} w{i % 26}"}],
                         reward_model={"ground_truth": str(a + b), "style": "rule"}, data_source=data_source))
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: threading only adds overhead (and 10x slowdowns on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(one_thread, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_world")
    tokenizer = make_tokenizer()
    target = tiny_llama(layers=2, hidden=64, seed=0, vocab=len(WORDS))
    draft = perturbed(target, scale=0.01)
    target.save_pretrained(root / "target")
    tokenizer.save_pretrained(root / "target")
    draft.save_pretrained(root / "draft")
    untrained = ScoringModel.from_backbone(draft)
    with torch.no_grad():  # a judge with some spread so the thresholds differ
        untrained.score_head.weight.normal_(0, 0.5)
    export_judge(untrained, root / "judge")
    return dict(root=root, tokenizer=tokenizer, target=target, draft=draft,
                data=write_rows(root / "test.parquet", 6),
                judge_accept=export_biased_judge(draft, root / "judge_plus20", 20.0),
                judge_reject=export_biased_judge(draft, root / "judge_minus20", -20.0))


def cli_args(world, out, judge="judge", extra=()):
    r = world["root"]
    j = ["--no-judge"] if judge is None else ["--judge", str(r / judge)]
    return j + ["--draft", str(r / "draft"), "--target", str(r / "target"), "--data", str(world["data"]),
                "--out", str(out), *FAST, *extra]


# ---------------------------------------------------------------- pure functions
def test_pareto_front_hand_made():
    pts = [(1.0, 0.9), (2.0, 0.8), (1.5, 0.95), (2.0, 0.7), (3.0, 0.1), (1.5, 0.95), (0.5, 0.95)]
    assert pareto_front(pts) == [(1.5, 0.95), (2.0, 0.8), (3.0, 0.1)]
    assert pareto_front([]) == []
    assert pareto_front([(1, 1)]) == [(1, 1)]
    rows = [dict(rule="x", tau=1.0, accuracy=1.0), dict(rule="x", tau=2.0, accuracy=1.0),
            dict(rule="y", tau=1.5, accuracy=0.5)]
    assert pareto_front(rows) == [rows[1]]  # dicts come back as given
    mark_pareto(rows)
    assert [r["pareto"] for r in rows] == [False, True, True]  # per family


def _r(rule, tau, acc, setting=None):
    return dict(rule=rule, setting=setting, name=rule, tau=tau, accuracy=acc)


def test_verdicts():
    rows = [_r("reject_all", 2.0, 0.90), _r("accept_all", 4.0, 0.10),
            _r("judge", 3.0, 0.895, 0.5), _r("judge", 3.6, 0.70, 0.2), _r("judge", 2.1, 0.90, 0.9),
            _r("target_prob", 2.5, 0.90, 0.1), _r("target_prob", 3.5, 0.85, 0.3),
            _r("oracle", 3.5, 0.91)]
    v = {x["baseline"]: x for x in verdicts(rows, tol=0.01)}
    assert list(v) == ["reject_all", "accept_all", "target_prob", "oracle"]
    assert v["reject_all"]["judge_best_tau"] == 3.0 and v["reject_all"]["outcome"] == "judge wins"
    assert v["accept_all"]["baseline_best_tau"] is None and v["accept_all"]["outcome"] == "judge wins"
    assert v["target_prob"]["baseline_best_tau"] == 2.5
    assert v["oracle"]["outcome"] == "judge loses" and "67% of the oracle" in v["oracle"]["text"]
    assert v["target_prob"]["text"] == ("at accuracy ≥ lossless − 1 point: judge best τ 3.000 vs target_prob "
                                        "best τ 2.500 (judge wins)")
    assert verdicts([r for r in rows if r["rule"] != "judge"]) == []
    with pytest.raises(ValueError, match="reject_all"):
        verdicts([r for r in rows if r["rule"] != "reject_all"])


def test_prompt_ids_plain_ints(world):
    ids = prompt_ids(world["tokenizer"], [{"role": "user", "content": "3 + 4"}])
    assert isinstance(ids, list) and all(type(t) is int for t in ids)
    assert world["tokenizer"].convert_ids_to_tokens(ids) == ["<s>", "Q", ":", "3", "+", "4", "A", ":"]


# ---------------------------------------------------------------- the CLI
def test_cli_writes_well_formed_outputs(world, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(cli_args(world, out)) == 0
    stdout = capsys.readouterr().out
    names = ["judge@0.3", "judge@0.7", "reject_all", "accept_all", "target_prob@0.1", "target_prob@0.3",
             "typical@0.2"]

    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == names
    for r in table:
        for col in COLUMNS:
            assert col in r and (r[col] != "" or col == "setting"), (r["name"], col)
        assert r["pareto"] in ("True", "False")
        assert r["n"] == "6" and 1.0 <= float(r["tau"]) <= 4.0  # τ ≤ γ + 1
        assert abs(float(r["target_forwards_per_token"]) * float(r["tau"]) - 1) < 1e-9
        assert 0 <= float(r["accuracy"]) <= 1 and 0 <= float(r["accepted_mismatch_rate"]) <= 1
    by = {r["name"]: r for r in table}
    assert float(by["reject_all"]["accepted_mismatch_rate"]) == 0.0
    assert float(by["accept_all"]["accepted_mismatch_rate"]) == 1.0
    assert by["reject_all"]["setting"] == "" and float(by["judge@0.3"]["setting"]) == 0.3

    doc = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in doc["rows"]] == names
    assert [v["baseline"] for v in doc["verdicts"]] == ["reject_all", "accept_all", "target_prob", "typical"]
    s = doc["settings"]
    assert s["n"] == 6 and s["gamma"] == 3 and s["max_new_tokens"] == 12 and s["judge"].endswith("judge")
    assert s["lossless_tau"] == by["reject_all"]["tau"] or abs(s["lossless_tau"] - float(by["reject_all"]["tau"])) < 1e-9

    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    for n in names:
        assert n in stdout
    assert stdout.count("at accuracy ≥ lossless − 1 point: judge best τ") == 4


def test_cli_no_judge_and_limit(world, tmp_path, capsys):
    out = tmp_path / "nj"
    assert main(cli_args(world, out, judge=None, extra=["--limit", "3"])) == 0
    doc = json.loads((out / "results.json").read_text())
    assert not any(r["rule"] == "judge" for r in doc["rows"]) and doc["verdicts"] == []
    assert doc["settings"]["n"] == 3 and doc["settings"]["judge"] is None
    assert "no judge evaluated" in capsys.readouterr().out


# ---------------------------------------------------------------- threshold extremes
def _same_metrics(a, b):
    skip = {"rule", "setting", "name", "wall_time_s"}
    return {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


@pytest.mark.parametrize("which,baseline", [("judge_accept", AcceptAll()), ("judge_reject", RejectAll())])
def test_threshold_extremes_reduce_to_baselines(world, which, baseline):
    judge = load_judge(world[which])
    rows = load_rows(world["data"])
    rules = [r for r in build_rules(thresholds=[0.5], target_prob_eps=[], typical_eps=[])
             if r.family in ("judge", baseline.name)]
    got = evaluate(rules, world["draft"], world["target"], judge, world["tokenizer"], rows, gamma=3,
                   max_new_tokens=16, batch_size=4, progress=False, keep_outputs=True)
    j, b = got
    assert j["name"] == "judge@0.5" and b["name"] == baseline.name
    assert j["response_ids"] == b["response_ids"] and j["outputs"] == b["outputs"]
    assert _same_metrics(j, b)
    assert j["mismatches"] > 0  # the extremes were actually exercised


def test_batch_size_does_not_change_results(world):
    rows = load_rows(world["data"])
    rules = build_rules(with_judge=False, target_prob_eps=[0.2], typical_eps=[])
    a = evaluate(rules, world["draft"], world["target"], None, world["tokenizer"], rows, gamma=3,
                 max_new_tokens=16, batch_size=1, progress=False)
    b = evaluate(rules, world["draft"], world["target"], None, world["tokenizer"], rows, gamma=3,
                 max_new_tokens=16, batch_size=32, progress=False)
    assert all(_same_metrics(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------- reference rules (oracle / hand rule)
class _FakeOracle(Policy):
    needs_prefix = True
    name = "oracle"
    seen = []

    def __init__(self, target, tokenizer, ground_truths, max_new_tokens, eos_token_id):
        _FakeOracle.seen.append(list(ground_truths))

    def decide(self, ctx):
        assert ctx.prefixes is not None and len(ctx.prefixes) == len(ctx.rows)
        return torch.zeros_like(ctx.draft_tokens, dtype=torch.bool)


class _FakeHand(Policy):
    name = "hand_rule"

    def __init__(self, tokenizer):
        pass

    def decide(self, ctx):
        return torch.ones_like(ctx.draft_tokens, dtype=torch.bool)


def test_reference_rules_on_demo_world(world, tmp_path, monkeypatch, capsys):
    data = write_rows(tmp_path / "arith.parquet", 5, data_source="spd_arith", seed=1)
    fake = types.ModuleType("spd_verl.world.oracle")
    fake.SingleSwapOracle, fake.NonDigitRule = _FakeOracle, _FakeHand
    monkeypatch.setitem(sys.modules, "spd_verl.world.oracle", fake)
    _FakeOracle.seen.clear()
    out = tmp_path / "ref"
    args = cli_args(world, out)
    args[args.index("--data") + 1] = str(data)
    assert main(args) == 0
    doc = json.loads((out / "results.json").read_text())
    by = {r["name"]: r for r in doc["rows"]}
    assert by["oracle"]["rule"] == "oracle" and by["hand_rule"]["rule"] == "hand_rule"
    assert by["oracle"]["tau"] == by["reject_all"]["tau"] and by["hand_rule"]["tau"] == by["accept_all"]["tau"]
    gts = [r["ground_truth"] for r in load_rows(data)]
    assert _FakeOracle.seen == [gts[:4], gts[4:]]  # one oracle per batch, with that batch's answers
    assert "oracle_headroom" in doc["settings"]
    assert any(v["baseline"] == "oracle" for v in doc["verdicts"])

    # Module absent: a printed note, and the rest still runs.
    monkeypatch.setitem(sys.modules, "spd_verl.world.oracle", None)
    rows = load_rows(data)
    notes = []
    assert reference_rules(rows, world["target"], world["tokenizer"], 12, 2, log=notes.append) == []
    assert notes and "oracle" in notes[0] and "skipped" in notes[0]
    # Not the demo world: no reference rows, no note.
    notes.clear()
    assert reference_rules(load_rows(world["data"]), world["target"], world["tokenizer"], 12, 2,
                           log=notes.append) == [] and notes == []


# ---------------------------------------------------------------- bad input
def test_missing_judge_path(world, tmp_path, capsys):
    missing = tmp_path / "nope"
    args = cli_args(world, tmp_path / "o")
    args[args.index("--judge") + 1] = str(missing)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no judge at" in err and str(missing) in err


def test_judge_path_holding_a_plain_llama(world, tmp_path, capsys):
    args = cli_args(world, tmp_path / "o")
    args[args.index("--judge") + 1] = str(world["root"] / "draft")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not a ScoringModel export" in err and "'llama'" in err


def test_judge_required_unless_no_judge(world, tmp_path, capsys):
    args = cli_args(world, tmp_path / "o")
    i = args.index("--judge")
    del args[i:i + 2]
    assert main(args) == 2
    assert "--no-judge" in capsys.readouterr().err


def test_judge_vocab_mismatch(world, tmp_path, capsys):
    other = tiny_llama(layers=1, hidden=32, seed=5, vocab=len(WORDS) + 10)
    bad = tmp_path / "bad_judge"
    export_judge(ScoringModel.from_backbone(other), bad)
    args = cli_args(world, tmp_path / "o")
    args[args.index("--judge") + 1] = str(bad)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and f"vocab_size={len(WORDS) + 10}" in err and f"vocab_size={len(WORDS)}" in err


def test_empty_eval_set(world, tmp_path, capsys):
    empty = tmp_path / "empty.parquet"
    pd.read_parquet(world["data"]).head(0).to_parquet(empty)
    args = cli_args(world, tmp_path / "o")
    args[args.index("--data") + 1] = str(empty)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "empty" in err and str(empty) in err
    with pytest.raises(ValueError, match="empty"):
        evaluate(build_rules(with_judge=False), world["draft"], world["target"], None, world["tokenizer"], [])


def test_missing_data_and_models(world, tmp_path, capsys):
    for flag, needle in (("--data", "no eval data at"), ("--draft", "no draft model at"),
                         ("--target", "no target model at")):
        args = cli_args(world, tmp_path / "o")
        args[args.index(flag) + 1] = str(tmp_path / "missing")
        if flag == "--target":
            args += ["--tokenizer", str(world["root"] / "target")]
        assert main(args) == 2
        assert needle in capsys.readouterr().err


def test_bad_sweep_values_rejected(world, tmp_path):
    with pytest.raises(SystemExit):
        main(cli_args(world, tmp_path / "o", extra=["--thresholds", "0.5,1.5"]))


def test_demo_world_defaults_absent(monkeypatch, tmp_path, capsys):
    import spd_verl.eval.data as data

    monkeypatch.setattr(data, "world_dir", lambda: tmp_path / "no_world")
    assert main(["--no-judge", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "demo world is not available" in err and "spd-world" in err


def test_tokenizer_defaults_to_sibling_dir(tmp_path):
    from spd_verl.eval.data import resolve_world_defaults

    (tmp_path / "target").mkdir()
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{}")
    p = resolve_world_defaults(tmp_path / "d", tmp_path / "target", None, tmp_path / "x.parquet")
    assert p["tokenizer"] == tmp_path / "tokenizer"
    (tmp_path / "target" / "tokenizer_config.json").write_text("{}")
    p = resolve_world_defaults(tmp_path / "d", tmp_path / "target", None, tmp_path / "x.parquet")
    assert p["tokenizer"] == tmp_path / "target"


# ---------------------------------------------------------------- threshold calibration
def test_pick_threshold_and_refine_grid():
    from spd_verl.eval.calibrate import pick_threshold, refine_grid

    rows = [_r("reject_all", 2.0, 0.95), _r("typical", 4.0, 0.95, 0.3),  # only judge rows compete
            _r("judge", 4.0, 0.80, 0.5), _r("judge", 3.2, 0.945, 0.9), _r("judge", 3.0, 0.95, 0.95),
            _r("judge", 2.0, 0.95, 0.99)]
    pick = pick_threshold(rows, tol=0.01)
    assert pick["setting"] == 0.9  # most τ within 1 point of lossless (0.945 ≥ 0.94)
    assert pick_threshold(rows, tol=0.0)["setting"] == 0.95
    assert refine_grid(rows, pick, points=4) == [0.58, 0.66, 0.74, 0.82]  # between 0.5 (failed) and 0.9
    assert refine_grid(rows, pick_threshold(rows[:1] + rows[2:3], tol=0.2)) == []  # the lowest setting
    # equal τ: the higher (more conservative) threshold
    tie = [_r("reject_all", 2.0, 0.9), _r("judge", 2.0, 0.9, 0.5), _r("judge", 2.0, 0.9, 0.7)]
    assert pick_threshold(tie)["setting"] == 0.7
    assert pick_threshold([_r("reject_all", 2.0, 0.95), _r("judge", 4.0, 0.5, 0.5)]) is None
    assert refine_grid(rows, None) == []
    with pytest.raises(ValueError, match="reject_all"):
        pick_threshold(rows[1:])
    with pytest.raises(ValueError, match="judge rows"):
        pick_threshold(rows[:2])
    with pytest.raises(ValueError, match="tol"):
        pick_threshold(rows, tol=-0.1)


def test_cli_calibrate_on_validation_data(world, tmp_path, capsys):
    from spd_verl.eval.calibrate import COARSE_GRID

    val = write_rows(tmp_path / "val.parquet", 5)
    out = tmp_path / "cal"
    assert main(cli_args(world, out, extra=["--calibrate-on", str(val), "--thresholds", "0.5"])) == 0
    cal = json.loads((out / "results.json").read_text())["settings"]["calibration"]
    assert cal["n"] == 5 and cal["tol"] == 0.01
    # the grid from its floor up to the first threshold that keeps the bar (higher ones give less τ)
    assert [t for t in COARSE_GRID if t in cal["thresholds"]] == [t for t in COARSE_GRID if t <= cal["threshold"]]
    assert cal["accuracy"] >= cal["lossless_accuracy"] - 0.01  # the pick met the bar on the calibration set
    names = [r["name"] for r in json.loads((out / "results.json").read_text())["rows"]]
    assert f"judge@{cal['threshold']:g}" in names and "judge@0.5" in names  # the pick joined the held-out sweep
    assert f"calibrated judge@{cal['threshold']:g} (on val.parquet): held-out accuracy" in capsys.readouterr().out


def test_cli_run_gates(world, tmp_path, capsys):
    """--min-runs: every accepting rule once per gate, the calibration choosing the judge's gate too;
    the ungated rows are the plain sweep's, and a gate longer than γ is refused."""
    val = write_rows(tmp_path / "val.parquet", 5)
    out = tmp_path / "gated"
    args = ["--thresholds", "0.5", "--target-prob-eps", "0.1", "--typical-eps", "0.3", "--no-reference"]
    assert main(cli_args(world, tmp_path / "plain", extra=args)) == 0
    assert main(cli_args(world, out, extra=args + ["--min-runs", "1,2", "--calibrate-on", str(val)])) == 0
    res = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    for name in ("judge@0.5 run>=2", "accept_all run>=2", "target_prob@0.1 run>=2", "typical@0.3 run>=2"):
        assert rows[name]["min_run"] == 2
    assert rows["accept_all run>=2"]["accepted_mismatches"] < rows["accept_all"]["accepted_mismatches"]
    plain = {r["name"]: r for r in json.loads((tmp_path / "plain" / "results.json").read_text())["rows"]}
    for name, r in plain.items():
        assert (rows[name]["correct"], rows[name]["emitted_tokens"]) == (r["correct"], r["emitted_tokens"])
    cal = res["settings"]["calibration"]
    assert cal["min_runs"] == [1, 2] and cal["min_run"] in (1, 2) and res["settings"]["min_runs"] == [1, 2]
    picked = f"judge@{cal['threshold']:g}" + (" run>=2" if cal["min_run"] == 2 else "")
    assert picked in rows and f"calibrated {picked} (on val.parquet)" in capsys.readouterr().out
    assert main(cli_args(world, tmp_path / "bad", extra=["--min-runs", "1,9"])) == 2
    assert "--min-runs [9] exceed --gamma" in capsys.readouterr().err


def test_cli_calibration_refuses_the_test_set_and_needs_a_judge(world, tmp_path, capsys):
    assert main(cli_args(world, tmp_path / "a", extra=["--calibrate-on", str(world["data"])])) == 2
    assert "is the evaluated --data: calibrate on validation data" in capsys.readouterr().err
    assert main(cli_args(world, tmp_path / "b", judge=None, extra=["--calibrate-on", str(world["data"])])) == 2
    assert "--calibrate-on chooses a judge threshold: pass --judge DIR" in capsys.readouterr().err


def test_spd_train_held_out_eval_adds_the_calibrated_threshold(world, tmp_path, capsys):
    from omegaconf import OmegaConf

    from spd_verl.train import _val_file, held_out_eval

    r = world["root"]
    cfg = OmegaConf.create(dict(
        actor_rollout_ref=dict(rollout=dict(draft_model_path=str(r / "draft"), target_model_path=str(r / "target"),
                                            score_threshold=0.5, num_speculative_tokens=3)),
        data=dict(max_response_length=12, val_files=[str(tmp_path / "val.parquet")])))
    val = write_rows(_val_file(cfg), 5)
    rows = held_out_eval(cfg, r / "judge", world["data"], None, calibration_file=val)
    out = capsys.readouterr().out
    assert rows[0]["rule"] == "reject_all" and rows[1]["name"] == "judge@0.5"
    assert f"calibration on {val}" in out and "held-out (6 problems, γ 3): reject_all acc" in out
    if len(rows) == 3:  # the calibrated threshold differs from 0.5
        assert f"judge@{rows[2]['setting']:g} (chosen on val.parquet) acc" in out
    else:
        assert len(rows) == 2 and "chosen on" not in out
    cfg.data.val_files = ["a.parquet", "b.parquet"]
    with pytest.raises(ValueError, match="data.val_files has 2: pass --calibration-file"):
        _val_file(cfg)


def test_held_out_eval_chooses_among_saved_judges(world, tmp_path, capsys):
    """spd-train with spd.eval.steps: every listed judge is calibrated on the same held-in sets and
    the pick with the most τ there is evaluated held out, next to the last judge at the config's
    threshold; the record names both judges and keeps every candidate's calibration."""
    from omegaconf import OmegaConf

    from spd_verl.train import held_out_eval

    r = world["root"]
    cfg = OmegaConf.create(dict(
        actor_rollout_ref=dict(rollout=dict(draft_model_path=str(r / "draft"), target_model_path=str(r / "target"),
                                            score_threshold=0.5, num_speculative_tokens=3)),
        data=dict(max_response_length=12)))
    val = write_rows(tmp_path / "val.parquet", 5)
    accept, reject = Path(world["judge_accept"]), Path(world["judge_reject"])
    rows = held_out_eval(cfg, reject, world["data"], None, calibration_file=val, out_json=tmp_path / "h.json",
                         earlier=[(10, accept)])
    record = json.loads((tmp_path / "h.json").read_text())
    lossless_acc = next(r for r in record["candidates"][1]["coarse"] if r["rule"] == "reject_all")["accuracy"]
    picks = [c["pick"] for c in record["candidates"]]
    assert [c["judge"] for c in record["candidates"]] == [str(accept), str(reject)]
    assert picks[1]["accepted_mismatches"] == 0 and picks[0]["accepted_mismatches"] > 0
    assert picks[0]["accuracy"] >= lossless_acc - 0.01 and picks[0]["tau"] > picks[1]["tau"]  # the accepting judge wins
    assert (record["judge"], record["last_judge"], record["calibration_pick"]) == (str(accept), str(reject), picks[0])
    assert [r["name"] for r in rows] == ["reject_all", "judge@0.5", picks[0]["name"]]
    assert rows[1]["accepted_mismatches"] == 0 and rows[2]["accepted_mismatches"] > 0  # each row decoded its own judge
    out = capsys.readouterr().out
    assert f"calibrating the judge {accept}" in out and f"chosen judge: {accept.name} at {picks[0]['name']}" in out
    assert f"{picks[0]['name']} ({accept.name}, chosen on val.parquet) acc" in out
    # equal picks: the later judge
    held_out_eval(cfg, reject, world["data"], None, calibration_file=val, out_json=tmp_path / "tie.json",
                  earlier=[(10, reject)])
    assert json.loads((tmp_path / "tie.json").read_text())["judge"] == str(reject)
    assert "chosen on val.parquet)" in capsys.readouterr().out  # the last judge's own pick: no judge named


def test_eval_judges_reads_spd_eval_steps(tmp_path):
    from omegaconf import OmegaConf

    from spd_verl.train import eval_judges

    exports = [(30, tmp_path / "a"), (60, tmp_path / "b")]
    cfg = OmegaConf.create(dict(spd=dict(eval=dict(steps=None))))
    assert eval_judges(cfg, exports) == exports[1:]
    cfg.spd.eval.steps = "all"
    assert eval_judges(cfg, exports) == exports
    cfg.spd.eval.steps = [60, 30]
    assert eval_judges(cfg, exports) == exports and eval_judges(cfg, []) == []  # before training: the form only
    cfg.spd.eval.steps = [30, 40, 50]
    with pytest.raises(ValueError, match=r"spd.eval.steps \[40, 50\]: no judge export for those steps \(saved: \[30, 60\]\)"):
        eval_judges(cfg, exports)
    for bad in ([], "last", [30, True], 30):
        cfg.spd.eval.steps = bad
        with pytest.raises(ValueError, match="spd.eval.steps must be null, 'all' or a non-empty list of training steps"):
            eval_judges(cfg, [])


def test_held_out_eval_at_another_gamma(world, tmp_path, capsys):
    """spd.eval.num_speculative_tokens sets the γ of the held-out evaluation (and its calibration),
    independently of the rollout's; a bad value names the key before anything is decoded."""
    from omegaconf import OmegaConf

    from spd_verl.eval.data import eos_token_id, load_rows
    from spd_verl.eval.sweep import Rule, evaluate
    from spd_verl.spd import RejectAll
    from spd_verl.train import eval_gamma, held_out_eval

    r = world["root"]
    # the target as its own draft: every token is accepted, so τ grows with γ
    cfg = OmegaConf.create(dict(
        actor_rollout_ref=dict(rollout=dict(draft_model_path=str(r / "target"), target_model_path=str(r / "target"),
                                            score_threshold=0.5, num_speculative_tokens=3)),
        data=dict(max_response_length=12), spd=dict(eval=dict(num_speculative_tokens=None))))
    assert eval_gamma(cfg) == 3
    cfg.spd.eval.num_speculative_tokens = 5
    rows = held_out_eval(cfg, r / "judge", world["data"], None, out_json=tmp_path / "h.json")
    kw = dict(max_new_tokens=12, eos_token_id=eos_token_id(world["tokenizer"], world["target"]), progress=False)
    at = {g: evaluate([Rule.fixed("reject_all", RejectAll())], world["target"], world["target"], None,
                      world["tokenizer"], load_rows(world["data"]), gamma=g, **kw)[0]["tau"] for g in (3, 5)}
    assert at[3] != at[5]  # the check below can tell the two γ apart
    assert rows[0]["tau"] == pytest.approx(at[5])
    assert "γ 5" in capsys.readouterr().out and json.loads((tmp_path / "h.json").read_text())["gamma"] == 5
    for bad in (0, 2.5, "8", True):
        cfg.spd.eval.num_speculative_tokens = bad
        with pytest.raises(ValueError, match="spd.eval.num_speculative_tokens must be an integer >= 1"):
            held_out_eval(cfg, r / "judge", world["data"], None)


def test_held_out_eval_chooses_a_run_gate(world, tmp_path, capsys):
    """spd.eval.min_runs: the calibration chooses the gate with the threshold, and the held-out table
    has the config's operating point (behind rollout.min_accept_run) next to the chosen one."""
    from omegaconf import OmegaConf

    from spd_verl.train import eval_min_runs, held_out_eval

    r = world["root"]
    cfg = OmegaConf.create(dict(
        actor_rollout_ref=dict(rollout=dict(draft_model_path=str(r / "draft"), target_model_path=str(r / "target"),
                                            score_threshold=0.5, num_speculative_tokens=3, min_accept_run=2)),
        data=dict(max_response_length=12), spd=dict(eval=dict(min_runs=None))))
    assert eval_min_runs(cfg, 3) == [2]  # null: the rollout's gate alone
    cfg.spd.eval.min_runs = [1, 3]
    val = write_rows(tmp_path / "val.parquet", 5)
    rows = held_out_eval(cfg, r / "judge", world["data"], None, calibration_file=val, out_json=tmp_path / "h.json")
    record = json.loads((tmp_path / "h.json").read_text())
    pick = record["calibration_pick"]
    assert record["min_runs"] == [1, 3] and pick["min_run"] in (1, 3)
    assert {row["min_run"] for row in record["calibration_coarse"] if row["rule"] == "judge"} == {1, 3}
    assert rows[1]["name"] == "judge@0.5 run>=2"
    if len(rows) == 3:
        assert rows[2]["name"] == pick["name"] and f"{pick['name']} (chosen on val.parquet) acc" in capsys.readouterr().out
    assert record["fine_tol"] == 0.01  # spd.eval.fine_tol absent: the target's bar
    cfg.spd.eval.tau_floor = 1.3
    with pytest.raises(ValueError, match="spd.eval.tau_floor chooses on the calib split: no calib.parquet beside"):
        held_out_eval(cfg, r / "judge", world["data"], None, calibration_file=val)
    cfg.spd.eval.tau_floor = None
    for bad, match in (([4], "must be <= num_speculative_tokens"), ([0], "must be an integer >= 1"),
                       ([], "must be a non-empty list"), (2, "must be a non-empty list")):
        cfg.spd.eval.min_runs = bad
        with pytest.raises(ValueError, match=f"spd.eval.min_runs {match}"):
            held_out_eval(cfg, r / "judge", world["data"], None)


def test_spd_train_rejects_a_bad_eval_gamma_before_training(tmp_path, monkeypatch):
    import subprocess

    from spd_verl import train

    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("main_ppo started"))
    with pytest.raises(ValueError, match=r"spd.eval.num_speculative_tokens must be an integer >= 1 .* got 0"):
        train.main(["--out", str(tmp_path), "spd.eval.num_speculative_tokens=0"])
    with pytest.raises(ValueError, match=r"spd.eval.fine_tol must be a number in \[0, 0.01\] .* got 0.05"):
        train.main(["--out", str(tmp_path), "spd.eval.fine_tol=0.05"])
    with pytest.raises(ValueError, match=r"spd.eval.tau_floor is a speed-up over lossless SD .* got 0.9"):
        train.main(["--out", str(tmp_path), "spd.eval.tau_floor=0.9"])


def test_fine_window():
    from spd_verl.eval.calibrate import COARSE_GRID, fine_window, pick_threshold

    def sweep(cliff, tau_at=lambda t: 5.0 - t):  # the judge accepts nothing from `cliff` up
        rows = [_r("reject_all", 3.3, 0.99)]
        for t in COARSE_GRID:
            rows.append(_r("judge", 3.3, 0.99, t) if t >= cliff else _r("judge", tau_at(t), 0.95, t))
        return rows

    graded = [_r("judge", 4.2, 0.985, 0.8) if r.get("setting") == 0.8 else r  # 0.8 keeps the bar, τ 4.2
              for r in sweep(0.9)]
    pick = pick_threshold(graded)
    assert pick["setting"] == 0.8
    assert fine_window(graded, pick) == [0.7, 0.75, 0.8, 0.85, 0.9]
    # accepts nothing from 0.6 up: the pick reports 0.99 (ties: conservative), the window
    # centres on 0.6, where the crossing is
    cliff = sweep(0.6)
    assert pick_threshold(cliff)["setting"] == 0.99
    assert fine_window(cliff, pick_threshold(cliff)) == [0.5, 0.55, 0.6, 0.65, 0.7]
    # a conservative judge (session 19, run J1): every setting from 0.01 up keeps the bar, so the pick
    # and the window reach below 0.02, where the old grid stopped
    timid = [{**r, "accuracy": 0.99} if (r["setting"] or 0) >= 0.01 else r for r in sweep(2.0)]
    assert pick_threshold(timid)["setting"] == 0.01
    assert fine_window(timid, pick_threshold(timid)) == [0.005, 0.00875, 0.0125, 0.01625, 0.02]
    low = [_r("reject_all", 3.3, 0.99), _r("judge", 4.0, 0.99, 0.02), _r("judge", 3.5, 0.99, 0.05)]
    assert fine_window(low, pick_threshold(low), points=3) == [0.02, 0.035, 0.05]  # lowest: from itself
    none = sweep(2.0)  # never keeps the bar
    assert pick_threshold(none) is None and fine_window(none, None, points=2) == [0.97, 0.99]
    one = [_r("reject_all", 3.3, 0.99), _r("judge", 3.3, 0.99, 0.5)]
    assert fine_window(one, pick_threshold(one)) == [0.5]
    with pytest.raises(ValueError, match="at least 2 points"):
        fine_window(graded, None, points=1)


def test_two_stage_calibration_picks_on_the_fine_set(world, tmp_path, capsys):
    """Coarse grid on val, then reject_all + the fine window on the larger set, where the pick is made;
    spd-train finds calib.parquet beside the val file and says where the threshold was chosen."""
    from omegaconf import OmegaConf

    from spd_verl.eval.calibrate import calibrate, fine_window, pick_threshold
    from spd_verl.eval.data import load_rows
    from spd_verl.train import fine_calibration_file, held_out_eval

    r = world["root"]
    val, calib = write_rows(tmp_path / "val.parquet", 4), write_rows(tmp_path / "calib.parquet", 6, seed=1)
    judge = load_judge(r / "judge")
    grid = (0.1, 0.5, 0.9)
    pick, coarse, fine = calibrate(world["draft"], world["target"], judge, world["tokenizer"], load_rows(val),
                                   grid=grid, fine_rows=load_rows(calib), fine_points=3, gamma=3,
                                   max_new_tokens=12, progress=False)
    assert {x["n"] for x in coarse} == {4} and all(x["n"] == 6 for x in fine)
    assert [x["name"] for x in fine][0] == "reject_all"
    # each stage stops at its first threshold that keeps the bar (and reuses a silent one's row above)
    assert [x["setting"] for x in coarse[1:]] == [t for t in grid if t <= pick_threshold(coarse)["setting"]]
    window = fine_window(coarse, pick_threshold(coarse), 3, grid=grid)
    assert [x["setting"] for x in fine[1:]] == [t for t in window if t <= pick["setting"]]
    assert pick == pick_threshold(fine)

    assert fine_calibration_file(val, world["data"]) == calib
    assert fine_calibration_file(calib, world["data"]) is None  # it is the calibration file itself
    assert fine_calibration_file(None, world["data"]) is None
    cfg = OmegaConf.create(dict(
        actor_rollout_ref=dict(rollout=dict(draft_model_path=str(r / "draft"), target_model_path=str(r / "target"),
                                            score_threshold=0.5, num_speculative_tokens=3)),
        data=dict(max_response_length=12)))
    rows = held_out_eval(cfg, r / "judge", world["data"], None, calibration_file=val, fine_file=calib,
                         out_json=tmp_path / "eval" / "held_out.json")
    out = capsys.readouterr().out
    assert f"coarse stage on {val} (4 rows)" in out and f"calibration on {calib} (6 rows)" in out
    saved = json.loads((tmp_path / "eval" / "held_out.json").read_text())
    assert [x["name"] for x in saved["held_out"]] == [x["name"] for x in rows]
    assert saved["held_out"][0]["tau"] == pytest.approx(rows[0]["tau"])
    assert {x["n"] for x in saved["calibration_coarse"]} == {4} and {x["n"] for x in saved["calibration_fine"]} == {6}
    assert saved["fine_calibration_file"] == str(calib)
    assert set(saved["eval_seconds"]) == {"calibration", "held_out"} and min(saved["eval_seconds"].values()) > 0
    assert "evaluation wall time: calibration " in out
    if len(rows) == 3:
        assert f"(chosen on calib.parquet) acc" in out
    with pytest.raises(ValueError, match="is the held-out test file"):
        held_out_eval(cfg, r / "judge", world["data"], None, calibration_file=val, fine_file=world["data"])


def fake_sweep(decoded: list, table):
    """A stand-in for spd_verl.eval.sweep.evaluate on the rows "val" (lossless 99.3% / 3.8) and "big"
    (98.5% / 3.7): one row per call, a judge rule's from ``table(rows, rule)`` -> (accuracy, τ,
    accepted mismatches, of 100); every call is recorded in ``decoded`` as (rows, rule name)."""
    def fake(rules, draft, target, judge, tok, rows, **kw):
        rule = rules[0]
        decoded.append((rows, rule.name))
        if rule.name == "reject_all":
            acc, tau = (0.993, 3.8) if rows == "val" else (0.985, 3.7)
            return [dict(rule="reject_all", setting=None, min_run=1, name="reject_all", accuracy=acc, tau=tau, n=150,
                         accepted_mismatches=0)]
        acc, tau, accepted = table(rows, rule)
        return [dict(rule="judge", setting=rule.setting, min_run=rule.min_run, name=rule.name, accuracy=acc,
                     tau=tau, accepted_mismatches=accepted, accepted_mismatch_rate=accepted / 100)]
    return fake


def test_fine_stage_walks_up_the_grid_when_the_window_fails(monkeypatch):
    """Run Q's shape: on val, 0.3-0.5 tie (a plateau) and the window centres on 0.3; on the larger set
    nothing from 0.2 to 0.4 keeps the bar. The grid above the window is tried in order until a
    threshold keeps it (0.6 here), and nothing above that is decoded."""
    import spd_verl.eval.sweep as sweep_mod
    from spd_verl.eval.calibrate import calibrate

    # (accuracy, τ, accepted mismatches) per threshold, on val and on the larger set
    val = {0.2: (0.96, 5.4, 9), 0.3: (0.987, 5.0, 8), 0.4: (0.987, 5.0, 8), 0.5: (0.987, 5.0, 8),
           0.6: (0.993, 4.9, 7), 0.7: (0.993, 3.8, 0)}
    big = {0.2: (0.958, 5.4, 9), 0.25: (0.97, 4.9, 8), 0.3: (0.97, 4.85, 8), 0.35: (0.97, 4.85, 8),
           0.4: (0.97, 4.85, 8), 0.5: (0.97, 4.85, 8), 0.6: (0.98, 4.8, 7), 0.7: (0.985, 3.7, 0)}
    decoded = []
    monkeypatch.setattr(sweep_mod, "evaluate",
                        fake_sweep(decoded, lambda rows, rule: (val if rows == "val" else big)[rule.setting]))
    pick, coarse, fine = calibrate(None, None, object(), None, "val", grid=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
                                   fine_rows="big", fine_points=5)
    assert [r["setting"] for r in fine[1:]] == [0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6]
    assert pick["setting"] == 0.6 and pick["accuracy"] == 0.98
    assert ("big", "judge@0.7") not in decoded
    # without a walk the bar is still kept when the window holds a passing threshold
    big[0.4] = (0.976, 4.85, 8)
    decoded.clear()
    pick, _, fine = calibrate(None, None, object(), None, "val", grid=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
                              fine_rows="big", fine_points=5)
    assert pick["setting"] == 0.4 and [r["setting"] for r in fine[1:]] == [0.2, 0.25, 0.3, 0.35, 0.4]


def test_calibration_chooses_the_run_gate_too(monkeypatch):
    """min_runs=(1, 5): the coarse grid runs once per gate, each gate up to its own first threshold
    that keeps the bar. The fine stage sweeps each gate's window around that gate's coarse pick (up to
    the first that keeps the bar there), so the larger set decides the gate: here val prefers no
    gate, the larger set gate 5."""
    import spd_verl.eval.sweep as sweep_mod
    from spd_verl.eval.calibrate import calibrate, summary

    val = {1: {0.1: (0.95, 5.0, 9), 0.2: (0.987, 4.8, 5), 0.3: (0.993, 3.8, 0)},
           5: {0.1: (0.987, 4.6, 6), 0.2: (0.993, 4.0, 3), 0.3: (0.993, 3.9, 1), 0.5: (0.993, 3.8, 0)}}
    big = {1: {0.1: (0.95, 5.0, 9), 0.15: (0.96, 4.8, 8), 0.2: (0.97, 4.5, 6), 0.25: (0.98, 4.0, 3),
               0.3: (0.985, 3.7, 0)},
           5: {0.1: (0.97, 4.7, 6), 0.125: (0.98, 4.5, 5), 0.15: (0.98, 4.4, 5), 0.175: (0.985, 4.1, 4),
               0.2: (0.985, 4.0, 3)}}
    decoded = []
    monkeypatch.setattr(sweep_mod, "evaluate", fake_sweep(
        decoded, lambda rows, rule: (val if rows == "val" else big)[rule.min_run][rule.setting]))
    pick, coarse, fine = calibrate(None, None, object(), None, "val", grid=(0.1, 0.2, 0.3, 0.5),
                                   fine_rows="big", fine_points=5, min_runs=(1, 5))
    assert [name for rows, name in decoded if rows == "val"] == ["reject_all", "judge@0.1", "judge@0.2",
                                                                "judge@0.1 run>=5"]
    # gate 1's window around 0.2 reaches up to the grid's 0.3, which val never decoded
    assert [r["name"] for r in fine[1:]] == ["judge@0.1", "judge@0.15", "judge@0.2", "judge@0.25",
                                             "judge@0.1 run>=5", "judge@0.125 run>=5"]
    assert (pick["setting"], pick["min_run"], pick["tau"]) == (0.125, 5, 4.5)  # gate 1 keeps the bar at τ 4.0 only
    out = summary(pick, coarse, fine, 0.01)
    assert (out["threshold"], out["min_run"], out["coarse"]["threshold"], out["coarse"]["min_run"]) == (0.125, 5, 0.2, 1)
    with pytest.raises(ValueError, match="min_runs must be integers >= 1"):
        calibrate(None, None, object(), None, "val", min_runs=(0,))
    # A margin inside the bar on the larger set (fine_tol 0: lossless accuracy there): the coarse
    # stage and its windows are the same, the pick is the more conservative 0.175 behind gate 5.
    pick, coarse_m, fine_m = calibrate(None, None, object(), None, "val", grid=(0.1, 0.2, 0.3, 0.5),
                                       fine_rows="big", fine_points=5, min_runs=(1, 5), fine_tol=0.0)
    assert coarse_m == coarse
    assert [r["name"] for r in fine_m[1:]] == ["judge@0.1", "judge@0.15", "judge@0.2", "judge@0.25", "judge@0.3",
                                               "judge@0.1 run>=5", "judge@0.125 run>=5", "judge@0.15 run>=5",
                                               "judge@0.175 run>=5"]
    assert (pick["setting"], pick["min_run"], pick["tau"]) == (0.175, 5, 4.1)
    assert summary(pick, coarse_m, fine_m, 0.01, 0.0)["tol"] == 0.0
    with pytest.raises(ValueError, match=r"fine_tol must be in \[0, tol=0.01\]"):
        calibrate(None, None, object(), None, "val", fine_rows="big", fine_tol=0.02)


def test_calibration_stops_at_the_first_threshold_that_keeps_the_bar(monkeypatch):
    """Above a gate's first threshold that keeps the bar, τ only falls, so nothing there is decoded:
    the pick is the one a full sweep makes (stop_at_bar=False), for fewer decodes in both stages."""
    import spd_verl.eval.sweep as sweep_mod
    from spd_verl.eval.calibrate import calibrate

    grid = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
    # accuracy rises and τ falls with the threshold; val passes from 0.3 (bar 0.983), big from 0.3 (0.975)
    val = {t: (min(0.993, 0.95 + 0.15 * t), 5.5 - 2 * t, int(10 - 10 * t)) for t in grid}
    big = lambda t: (min(0.985, 0.94 + 0.12 * t), 5.4 - 2 * t, int(10 - 10 * t))  # noqa: E731
    decoded = []
    monkeypatch.setattr(sweep_mod, "evaluate", fake_sweep(
        decoded, lambda rows, rule: val[rule.setting] if rows == "val" else big(rule.setting)))
    kw = dict(grid=grid, fine_rows="big", fine_points=5, fine_tol=0.01)
    full, coarse_full, fine_full = calibrate(None, None, object(), None, "val", stop_at_bar=False, **kw)
    n_full = len(decoded)
    decoded.clear()
    pick, coarse, fine = calibrate(None, None, object(), None, "val", **kw)
    assert (pick["setting"], pick["tau"]) == (full["setting"], full["tau"])
    assert [r["setting"] for r in coarse[1:]] == [0.1, 0.2, 0.3]  # 0.4-0.6 give less τ: not decoded
    assert [r["setting"] for r in coarse_full[1:]] == list(grid)
    # the window spans the grid step above the coarse pick (0.4) though val never decoded it
    assert [r["setting"] for r in fine_full[1:]] == [0.2, 0.25, 0.3, 0.35, 0.4]
    assert [r["setting"] for r in fine[1:]] == [0.2, 0.25, 0.3] and len(decoded) == n_full - 5


def test_fine_stage_bisects_a_cliff(monkeypatch):
    """Session 24's first demo judge: its scores crowd into a band inside one window step (52% of the
    mismatches accepted at 0.8375, 4% at 0.875). The step is bisected until the accepted-mismatch
    rate falls by at most CLIFF_RESOLUTION across the crossing; a step without a cliff is left alone."""
    import spd_verl.eval.sweep as sweep_mod
    from spd_verl.eval.calibrate import calibrate

    grid = (0.2, 0.4, 0.6, 0.8)
    # on "big", 70 of 100 mismatches accepted up to 0.65, 4 from 0.7; passing (bar 0.98) takes <= 10
    rate = lambda t: 0.7 if t <= 0.65 else max(0.04, 0.7 * (0.7 - t) / 0.05)  # noqa: E731
    val = {0.2: (0.95, 5.0, 7), 0.4: (0.95, 5.0, 7), 0.6: (0.95, 5.0, 7), 0.8: (0.993, 3.8, 0)}
    decoded = []
    monkeypatch.setattr(sweep_mod, "evaluate", fake_sweep(decoded, lambda rows, rule: val[rule.setting] if rows == "val"
                                                          else (0.985 - 0.05 * rate(rule.setting),
                                                                3.7 + 2 * rate(rule.setting), 100 * rate(rule.setting))))
    kw = dict(grid=grid, fine_rows="big", fine_points=5, fine_tol=0.005)
    pick, _, fine = calibrate(None, None, object(), None, "val", **kw)
    assert [r["setting"] for r in fine[1:]] == [0.6, 0.65, 0.7, 0.675, 0.6875, 0.69375]
    assert pick["setting"] == 0.69375 and pick["tau"] == pytest.approx(3.7 + 2 * 0.0875)
    plain, _, fine = calibrate(None, None, object(), None, "val", cliff_steps=0, **kw)
    assert plain["setting"] == 0.7 and [r["setting"] for r in fine[1:]] == [0.6, 0.65, 0.7]
    capped, _, fine = calibrate(None, None, object(), None, "val", cliff_steps=1, **kw)
    assert capped["setting"] == 0.7 and [r["setting"] for r in fine[1:]] == [0.6, 0.65, 0.7, 0.675]
    # a gentle slope (the rate falls 0.2 across the step) is not a cliff
    rate = lambda t: 0.2 if t <= 0.65 else max(0.04, 0.2 * (0.7 - t) / 0.05)  # noqa: E731
    _, _, fine = calibrate(None, None, object(), None, "val", **kw)
    assert [r["setting"] for r in fine[1:]] == [0.6, 0.65, 0.7]
    with pytest.raises(ValueError, match="cliff_steps must be an integer >= 0"):
        calibrate(None, None, object(), None, "val", cliff_steps=-1, **kw)


def test_pick_threshold_with_a_speed_up_floor():
    """tau_floor r: the rows that keep the bar with τ ≥ r × lossless τ compete on accuracy (ties: τ);
    when none is that fast, the most τ, as without a floor."""
    from spd_verl.eval.calibrate import pick_threshold

    rows = [_r("reject_all", 4.0, 0.98), _r("judge", 6.0, 0.96, 0.3), _r("judge", 5.6, 0.972, 0.4),
            _r("judge", 5.5, 0.976, 0.45), _r("judge", 5.3, 0.978, 0.5), _r("judge", 5.3, 0.978, 0.55),
            _r("judge", 5.1, 0.98, 0.6)]
    assert pick_threshold(rows, tol=0.01)["setting"] == 0.4  # the most τ within a point
    assert pick_threshold(rows, tol=0.01, tau_floor=1.3)["setting"] == 0.55  # τ ≥ 5.2: 0.5/0.55 tie, the higher
    assert pick_threshold(rows, tol=0.01, tau_floor=1.375)["setting"] == 0.45  # τ ≥ 5.5
    assert pick_threshold(rows, tol=0.01, tau_floor=1.45)["setting"] == 0.4  # none that fast keeps the bar
    assert pick_threshold(rows, tol=0.0, tau_floor=1.3)["setting"] == 0.6  # only 0.6 keeps lossless accuracy
    for bad in (1.0, 0.5, True, "1.3"):
        with pytest.raises(ValueError, match="tau_floor is a speed-up over lossless SD and must be a number > 1"):
            pick_threshold(rows, tau_floor=bad)


def test_fine_stage_climbs_to_the_speed_up_floor(monkeypatch):
    """With tau_floor, thresholds above the most-τ pick are decoded at its gate, up the window and
    the grid while τ stays above the floor, then the step where it fell below is bisected; the pick
    is the most accurate setting at or above the floor. A floor above the pick's τ decodes nothing more."""
    import spd_verl.eval.sweep as sweep_mod
    from spd_verl.eval.calibrate import calibrate, reports, summary

    grid = (0.2, 0.4, 0.6, 0.8)
    val = {0.2: (0.95, 5.6, 9), 0.4: (0.99, 5.0, 6), 0.6: (0.993, 4.4, 3), 0.8: (0.993, 3.8, 0)}
    # "big": lossless 98.5% / 3.7, so the bar is 98.0%; val's pick 0.4 puts the window at 0.2 ... 0.6
    big = {0.2: (0.975, 5.7, 60), 0.3: (0.981, 5.3, 50), 0.4: (0.982, 4.9, 40), 0.45: (0.984, 4.7, 35),
           0.475: (0.983, 4.6, 32), 0.5: (0.985, 4.5, 30), 0.6: (0.985, 4.1, 20)}
    decoded = []
    monkeypatch.setattr(sweep_mod, "evaluate", fake_sweep(
        decoded, lambda rows, rule: (val if rows == "val" else big)[rule.setting]))
    kw = dict(grid=grid, fine_rows="big", fine_points=5, fine_tol=0.005)
    plain, _, fine = calibrate(None, None, object(), None, "val", **kw)
    assert plain["setting"] == 0.3 and [r["setting"] for r in fine[1:]] == [0.2, 0.3]
    # floor 1.25 x 3.7 = 4.625: up the window to 0.4 (τ 4.9) and 0.5 (4.5, too slow), then bisect: 0.45
    # (4.7) and 0.475 (4.6, too slow); of 0.3, 0.4 and 0.45 the most accurate is 0.45
    pick, coarse, fine = calibrate(None, None, object(), None, "val", tau_floor=1.25, **kw)
    assert [r["setting"] for r in fine[1:]] == [0.2, 0.3, 0.4, 0.5, 0.45, 0.475]
    assert (pick["setting"], pick["tau"]) == (0.45, 4.7)
    out = summary(pick, coarse, fine, 0.01, 0.005, tau_floor=1.25)
    assert (out["threshold"], out["tau_floor"], out["fastest"]["threshold"]) == (0.45, 1.25, 0.3)
    text = reports(pick, coarse, fine, 0.01, "val", "big", fine_tol=0.005, tau_floor=1.25)
    assert "the most accurate with τ ≥ 1.25x lossless (4.625); the most τ: judge@0.3 (98.1%, τ 5.300)" in text
    capped, _, fine = calibrate(None, None, object(), None, "val", tau_floor=1.25, climb_steps=1, **kw)
    assert capped["setting"] == 0.4 and [r["setting"] for r in fine[1:]] == [0.2, 0.3, 0.4]
    fast, _, fine = calibrate(None, None, object(), None, "val", tau_floor=1.5, **kw)  # 5.55 > the pick's 5.3
    assert fast["setting"] == 0.3 and [r["setting"] for r in fine[1:]] == [0.2, 0.3]
    assert "none reaches τ ≥ 1.5x lossless (5.550), so the most τ" in reports(
        fast, coarse, fine, 0.01, "val", "big", fine_tol=0.005, tau_floor=1.5)
    with pytest.raises(ValueError, match="tau_floor needs fine_rows"):
        calibrate(None, None, object(), None, "val", tau_floor=1.3)
    with pytest.raises(ValueError, match="climb_steps must be an integer >= 0"):
        calibrate(None, None, object(), None, "val", climb_steps=-1, **kw)


def test_cli_calibrate_fine_needs_calibrate_on(world, tmp_path, capsys):
    calib = write_rows(tmp_path / "calib.parquet", 3)
    assert main(cli_args(world, tmp_path / "a", extra=["--calibrate-fine", str(calib)])) == 2
    assert "--calibrate-fine is the second stage of --calibrate-on" in capsys.readouterr().err
    assert main(cli_args(world, tmp_path / "b", extra=["--calibrate-on", str(calib),
                                                       "--calibrate-fine", str(world["data"])])) == 2
    assert "--calibrate-fine" in capsys.readouterr().err
    assert main(cli_args(world, tmp_path / "c", extra=["--calibrate-on", str(calib), "--fine-tol", "0.005"])) == 2
    assert "--fine-tol is the bar of the --calibrate-fine stage" in capsys.readouterr().err
    assert main(cli_args(world, tmp_path / "d", extra=["--calibrate-on", str(calib), "--tau-floor", "1.3"])) == 2
    assert "--tau-floor chooses on the --calibrate-fine stage" in capsys.readouterr().err


def test_calibrate_skips_thresholds_above_one_that_accepts_nothing(world, tmp_path, monkeypatch):
    """Thresholds above one that accepted no mismatch are not decoded, and the row they reuse equals
    what decoding them gives (the claim the shortcut rests on)."""
    import spd_verl.eval.sweep as sweep_mod
    from spd_verl.eval.calibrate import calibrate, report, reused
    from spd_verl.eval.data import load_rows
    from spd_verl.spd import ThresholdPolicy

    judge = ScoringModel.from_backbone(world["draft"]).eval()
    with torch.no_grad():  # P(accept) spread a little around 0.5: 0.9 and above accept nothing
        judge.score_head.weight.normal_(0, 0.02)
    rows = load_rows(write_rows(tmp_path / "val.parquet", 4))
    models = (world["draft"], world["target"], judge, world["tokenizer"], rows)
    kw = dict(gamma=3, max_new_tokens=24, progress=False)
    decoded = []
    real = sweep_mod.evaluate
    monkeypatch.setattr(sweep_mod, "evaluate", lambda rules, *a, **k: decoded.extend(r.name for r in rules)
                        or real(rules, *a, **k))
    grid = (0.02, 0.3, 0.5, 0.9, 0.99, 0.999999)
    pick, results, fine = calibrate(*models, grid=grid, refine_points=0, stop_at_bar=False, **kw)
    assert fine == []
    by = {r["setting"]: r for r in results if r["rule"] == "judge"}
    assert sorted(by) == sorted(grid) and by[0.02]["accepted_mismatches"] > 0
    first = min(t for t in grid if by[t]["accepted_mismatches"] == 0)
    skipped = [t for t in grid if t > first]
    assert skipped, "the fixture judge should accept nothing before the top of the grid"
    assert all(by[t]["reused_from"] == f"judge@{first:g}" and f"judge@{t:g}" not in decoded for t in skipped)
    assert all(f"judge@{t:g}" in decoded for t in grid if t <= first)
    # decoding a skipped threshold gives the reused row, wall time aside
    direct = real([sweep_mod.Rule.fixed("judge", ThresholdPolicy(skipped[-1]), skipped[-1])], *models, **kw)[0]
    drop = {"wall_time_s", "reused_from"}
    assert {k: v for k, v in direct.items() if k not in drop} == \
        {k: v for k, v in by[skipped[-1]].items() if k not in drop}
    assert f"not decoded: judge@{skipped[0]:g}" in report(pick, results, 0.01, "val.parquet")
    with pytest.raises(ValueError, match="accepted 3 mismatches"):
        reused({**by[first], "accepted_mismatches": 3}, 0.99)


def test_workers_do_not_change_results(world):
    """Forked decoding processes (spd.eval.workers / --workers): every row and response as in one process."""
    rows = load_rows(world["data"])
    judge = load_judge(world["root"] / "judge")
    rules = build_rules(thresholds=[0.3, 0.7], target_prob_eps=[0.2], typical_eps=[], min_runs=(1, 2))
    kw = dict(gamma=3, max_new_tokens=16, batch_size=4, progress=False, keep_outputs=True)
    one = evaluate(rules, world["draft"], world["target"], judge, world["tokenizer"], rows, **kw)
    two = evaluate(rules, world["draft"], world["target"], judge, world["tokenizer"], rows, workers=2, **kw)
    assert [r["name"] for r in two] == [r["name"] for r in one]
    for a, b in zip(one, two):
        assert _same_metrics(a, b) and a["response_ids"] == b["response_ids"] and a["outputs"] == b["outputs"]
    assert any(r["accepted_mismatches"] for r in one)  # the judge rules accepted something


def test_cli_rejects_bad_workers(world, tmp_path, capsys):
    assert main(cli_args(world, tmp_path / "o", extra=["--workers", "0"])) != 0
    assert "--workers must be an integer >= 1" in capsys.readouterr().err
