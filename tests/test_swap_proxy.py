"""The swap proxy (spd_verl.eval.swap_proxy): its bank's labels, the judge's logits on it, the score."""

from pathlib import Path

import pandas as pd
import pytest
import torch

from spd_verl.eval import load_rows
from spd_verl.eval.swap_proxy import SwapBank, build_swap_bank, judge_logits, swap_score
from spd_verl.reward import is_correct
from spd_verl.scoring_model import ScoringModel
from spd_verl.spd import RejectAll, SpeculativeDecoder

GAMMA, MAX_NEW = 8, 96  # the demo world's: its target solves its problems, so swaps can lose answers


@pytest.fixture(scope="module")
def bank_world():
    from spd_verl.world import load_world

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    world = load_world()
    rows = load_rows(world.split("calib"), limit=10)
    bank = build_swap_bank(world.draft, world.target, world.tokenizer, rows, GAMMA, MAX_NEW, world.eos_token_id,
                           batch_size=64)
    judge = ScoringModel.from_backbone(world.draft)
    with torch.no_grad():  # mostly the target's log-prob of the draft token (a judge that ranks), plus noise
        judge.score_head.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
        judge.score_head.weight[0, 5 * judge.config.hidden_size] = 1.0
    yield dict(world=world, tokenizer=world.tokenizer, target=world.target, draft=world.draft, rows=rows, bank=bank,
               judge=judge.eval())
    torch.set_num_threads(n)


def hand_bank(harmful, runs, problems=4):
    n = len(harmful)
    z = torch.zeros(n, dtype=torch.long)
    return SwapBank(prompts=[[1]] * problems, responses=[[4]] * problems, seq=z, positions=z, draft_tokens=z,
                    target_tokens=z, features=torch.zeros(n, 7), runs=torch.tensor(runs),
                    harmful=torch.tensor(harmful), gamma=GAMMA)


def test_score_reads_the_harmless_tokens_bought_before_each_harmful_swap():
    bank = hand_bank([False, True, False, False], [2, 5, 3, 1])  # harmless tokens: 2 + 3 + 1 = 6
    # h = 0 .. ceil(0.25 * 4) = 1: G(0) = 2 (the swap above the harmful one), G(1) = 6 (all of them)
    assert swap_score(torch.tensor([3.0, 2.0, 1.0, 0.0]), bank, budget=0.25) == pytest.approx((2 + 6) / 2 / 6)
    assert swap_score(torch.tensor([3.0, 2.0, 1.0, 0.0]), bank, budget=0.01) == pytest.approx((2 + 6) / 2 / 6)
    assert swap_score(torch.tensor([0.0, -1.0, 0.0, 0.0]), bank, budget=0.25) == 1.0  # harmful one ranked last
    assert swap_score(torch.tensor([0.0, 1.0, 0.0, 0.0]), bank, budget=0.25) == pytest.approx((0 + 6) / 2 / 6)
    # a tie goes to the harmful swap: no credit for a harmless one the judge cannot tell apart
    assert swap_score(torch.tensor([2.0, 2.0, 1.0, 0.0]), bank, budget=0.25) == pytest.approx((0 + 6) / 2 / 6)
    # two harmful ones, budget for one: G(0) = 0, G(1) = 1 (the swap between them)
    two = hand_bank([True, False, True, False], [1, 1, 1, 1])
    assert swap_score(torch.tensor([3.0, 2.0, 1.0, 0.0]), two, budget=0.25) == pytest.approx((0 + 1) / 2 / 2)


def test_score_errors_name_the_problem():
    bank = hand_bank([False, True], [2, 5])
    with pytest.raises(ValueError, match=r"\(3,\) logits for a bank of 2 mismatches"):
        swap_score(torch.zeros(3), bank)
    with pytest.raises(ValueError, match="budget must be > 0"):
        swap_score(torch.zeros(2), bank, budget=0)
    with pytest.raises(ValueError, match="NaN logits"):
        swap_score(torch.tensor([0.0, float("nan")]), bank)
    with pytest.raises(ValueError, match="no harmless swap that keeps a draft token"):
        swap_score(torch.zeros(2), hand_bank([True, False], [2, 0]))


def test_bank_labels_are_the_single_swaps_decoded_losslessly(bank_world):
    w = bank_world
    bank, tok, rows = w["bank"], w["tokenizer"], w["rows"]
    assert len(bank) > 50 and bank.n_problems == 10 and bank.features.shape == (len(bank), 7)
    assert bool(bank.harmful.any()) and not bool(bank.harmful.all())
    dec = SpeculativeDecoder(w["draft"], w["target"], num_speculative_tokens=GAMMA)
    lossless = dec.generate(bank.prompts, policy=RejectAll(), max_new_tokens=MAX_NEW,
                            eos_token_id=tok.eos_token_id).responses
    assert lossless == bank.responses
    for k in range(0, len(bank), max(1, len(bank) // 8)):  # a spread of mismatches, decoded one at a time
        i, p, d = int(bank.seq[k]), int(bank.positions[k]), int(bank.draft_tokens[k])
        assert bank.responses[i][p] == int(bank.target_tokens[k]) != d
        tail = dec.generate([bank.prompts[i] + bank.responses[i][:p] + [d]], policy=RejectAll(),
                            max_new_tokens=MAX_NEW - p - 1, eos_token_id=tok.eos_token_id).responses[0]
        ok = is_correct(tok.decode(bank.responses[i], skip_special_tokens=True), rows[i]["ground_truth"])
        swapped = is_correct(tok.decode(bank.responses[i][:p] + [d] + tail, skip_special_tokens=True),
                             rows[i]["ground_truth"])
        assert bool(bank.harmful[k]) == (ok and not swapped)
    with pytest.raises(ValueError, match="needs at least one problem"):
        build_swap_bank(w["draft"], w["target"], tok, [], GAMMA, MAX_NEW, tok.eos_token_id)


def test_judge_logits_match_one_sequence_at_a_time(bank_world):
    bank, judge = bank_world["bank"], bank_world["judge"]
    batched = judge_logits(judge, bank, batch_size=5)
    assert torch.allclose(batched, judge_logits(judge, bank, batch_size=64), atol=1e-5)
    for k in range(0, len(bank), max(1, len(bank) // 6)):
        i, p = int(bank.seq[k]), int(bank.positions[k])
        ids = torch.tensor([bank.prompts[i] + bank.responses[i]])
        d, t = torch.zeros_like(ids), torch.zeros_like(ids)
        f = torch.zeros(1, ids.shape[1], 7)
        q = len(bank.prompts[i]) + p
        d[0, q], t[0, q], f[0, q] = bank.draft_tokens[k], bank.target_tokens[k], bank.features[k]
        with torch.no_grad():
            alone = judge.decision_logits(ids, d, t, f)[0, q]
        assert torch.allclose(batched[k], alone, atol=1e-5)
    # a judge that knows the labels ranks perfectly; its inverse is ranked at the bottom
    assert swap_score(-bank.harmful.float(), bank) == 1.0
    assert swap_score(bank.harmful.float(), bank) <= swap_score(batched, bank) < 1.0


def _three_judges(bank_world, tmp_path):
    """Judges saved at steps 10, 20, 30 (10 and 30 the same flat judge, 20 one that ranks), test and
    val files, and a config that calibrates the proxy's top one."""
    from omegaconf import OmegaConf

    from spd_verl.scoring_model import export_judge

    w = bank_world
    flat = ScoringModel.from_backbone(w["draft"])  # one logit everywhere: ties go to the harmful swaps
    paths = {}
    for step, judge in ((10, flat), (20, w["judge"]), (30, flat)):
        paths[step] = tmp_path / f"global_step_{step}" / "judge"
        export_judge(judge, paths[step])
    world = w["world"]
    test, val = tmp_path / "test.parquet", tmp_path / "val.parquet"
    pd.read_parquet(world.split("test")).head(2).to_parquet(test)
    pd.read_parquet(world.split("calib")).head(10).to_parquet(val)  # the bank's problems
    cfg = OmegaConf.create(dict(
        actor_rollout_ref=dict(rollout=dict(draft_model_path=str(world.path / "draft"),
                                            target_model_path=str(world.path / "target"), score_threshold=0.5,
                                            num_speculative_tokens=GAMMA)),
        data=dict(max_response_length=MAX_NEW), spd=dict(eval=dict(proxy_keep=1, proxy_problems=10,
                                                                    batch_size=64))))
    return paths, test, val, cfg


def test_held_out_eval_calibrates_the_judges_the_proxy_ranks_highest(bank_world, tmp_path, capsys):
    """spd.eval.proxy_keep = k: every candidate judge is scored on the swap bank, only the top k are
    calibrated; the record keeps every score."""
    import json

    from spd_verl.train import held_out_eval

    paths, test, val, cfg = _three_judges(bank_world, tmp_path)
    held_out_eval(cfg, paths[30], test, None, calibration_file=val, out_json=tmp_path / "k1.json",
                  earlier=[(10, paths[10]), (20, paths[20])])
    record = json.loads((tmp_path / "k1.json").read_text())
    scores = {r["step"]: r["score"] for r in record["swap_proxy"]}
    assert scores[10] == scores[30] < scores[20]  # the same judge twice; the ranking one is ahead
    assert [c["judge"] for c in record["candidates"]] == [str(paths[20])] and record["judge"] == str(paths[20])
    assert list(record["eval_seconds"]) == ["swap_proxy", "calibration", "held_out"]
    out = capsys.readouterr().out
    assert "| global_step_20's judge | " in out and f"calibrating the judge {paths[10]}" not in out
    cfg.spd.eval.proxy_keep = 2  # the tie between 10 and 30 goes to the later
    held_out_eval(cfg, paths[30], test, None, calibration_file=val, out_json=tmp_path / "k2.json",
                  earlier=[(10, paths[10]), (20, paths[20])])
    record = json.loads((tmp_path / "k2.json").read_text())
    assert [c["judge"] for c in record["candidates"]] == [str(paths[20]), str(paths[30])]
    capsys.readouterr()
    cfg.spd.eval.proxy_keep = 1  # no more judges than it keeps: no bank is built
    held_out_eval(cfg, paths[20], test, None, calibration_file=val, out_json=tmp_path / "alone.json")
    alone = json.loads((tmp_path / "alone.json").read_text())
    assert "swap_proxy" not in alone and "swap_proxy" not in alone["eval_seconds"]
    assert "swap proxy:" not in capsys.readouterr().out


def test_held_out_eval_calibrates_further_down_the_ranking_below_the_floor(bank_world, tmp_path, capsys):
    """spd.eval.proxy_more = m with a tau_floor: while no calibrated judge reaches the floor at the
    bar, the proxy's next-ranked judge is calibrated too, up to m more; without a floor, never."""
    import json

    from spd_verl.train import held_out_eval

    paths, test, val, cfg = _three_judges(bank_world, tmp_path)
    cfg.spd.eval.update(proxy_more=1, tau_floor=50.0)  # a floor no judge reaches
    fine = tmp_path / "calib.parquet"
    pd.read_parquet(val).to_parquet(fine)
    earlier = [(10, paths[10]), (20, paths[20])]
    held_out_eval(cfg, paths[30], test, None, calibration_file=val, fine_file=fine, out_json=tmp_path / "m.json",
                  earlier=earlier)
    record = json.loads((tmp_path / "m.json").read_text())
    # 20 ranks first; 10 and 30 tie behind it and the tie goes to the later, so 30 is next
    assert [c["judge"] for c in record["candidates"]] == [str(paths[20]), str(paths[30])]
    assert "calibrating the proxy's next judge, global_step_30's judge" in capsys.readouterr().out
    cfg.spd.eval.tau_floor = None
    held_out_eval(cfg, paths[30], test, None, calibration_file=val, fine_file=fine, out_json=tmp_path / "n.json",
                  earlier=earlier)
    assert [c["judge"] for c in json.loads((tmp_path / "n.json").read_text())["candidates"]] == [str(paths[20])]


def test_eval_proxy_settings_are_checked():
    from omegaconf import OmegaConf

    from spd_verl.train import eval_proxy

    cfg = OmegaConf.create(dict(spd=dict(eval=dict())))
    assert eval_proxy(cfg) == (None, 400, 0.025)
    cfg.spd.eval.update(proxy_keep=2, proxy_problems=50, proxy_budget=0.1)
    assert eval_proxy(cfg) == (2, 50, 0.1)
    for key, bad, msg in (("proxy_keep", 0, "proxy_keep must be an integer >= 1 or null"),
                          ("proxy_problems", None, "proxy_problems must be an integer >= 1"),
                          ("proxy_budget", 0, r"proxy_budget must be a number in \(0, 1\]"),
                          ("proxy_budget", "x", r"proxy_budget must be a number in \(0, 1\]")):
        c = OmegaConf.create(dict(spd=dict(eval={key: bad})))
        with pytest.raises(ValueError, match=msg):
            eval_proxy(c)
    from spd_verl.train import eval_proxy_more

    assert eval_proxy_more(cfg) == 0 and eval_proxy_more(OmegaConf.create(dict(spd=dict(eval=dict(proxy_more=2))))) == 2
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="spd.eval.proxy_more must be an integer >= 0 or null"):
            eval_proxy_more(OmegaConf.create(dict(spd=dict(eval=dict(proxy_more=bad)))))


def test_swap_proxy_script_scores_every_saved_judge(bank_world, tmp_path, capsys):
    import importlib.util
    import json

    from spd_verl.scoring_model import export_judge

    spec = importlib.util.spec_from_file_location(
        "swap_proxy_script", Path(__file__).resolve().parents[1] / "scripts" / "swap_proxy.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for step in (5, 10):
        export_judge(bank_world["judge"], tmp_path / "ckpt" / f"global_step_{step}" / "judge")
    args = [str(tmp_path / "ckpt"), "--problems", "10", "--bank", str(tmp_path / "bank.pt"), "--budgets", "0.1,0.5"]
    script.main(args + ["--out", str(tmp_path / "a.json")])
    assert "bank: " in capsys.readouterr().out and (tmp_path / "bank.pt").exists()
    script.main(args + ["--out", str(tmp_path / "b.json")])  # the saved bank, not rebuilt
    assert "bank: " not in capsys.readouterr().out
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a == b and [j["step"] for j in a["judges"]] == [5, 10] and a["mismatches"] == len(bank_world["bank"])
    expected = swap_score(judge_logits(bank_world["judge"], bank_world["bank"]), bank_world["bank"], 0.1)
    assert a["judges"][0]["scores"]["0.1"] == pytest.approx(expected)
    with pytest.raises(SystemExit, match="built at γ 8, not --gamma 6"):
        script.main(args + ["--gamma", "6"])
    with pytest.raises(SystemExit, match="built on 10 problems, not --problems 20"):
        script.main([str(tmp_path / "ckpt"), "--problems", "20", "--bank", str(tmp_path / "bank.pt")])


def test_bank_is_the_same_from_forked_workers(bank_world):
    w = bank_world
    two = build_swap_bank(w["draft"], w["target"], w["tokenizer"], w["rows"], GAMMA, MAX_NEW,
                          w["world"].eos_token_id, batch_size=64, workers=2)
    one = w["bank"]
    assert two.prompts == one.prompts and two.responses == one.responses
    for key in ("seq", "positions", "draft_tokens", "target_tokens", "runs", "harmful"):
        assert torch.equal(getattr(two, key), getattr(one, key)), key
    # The features are log-probs of batched forwards: smaller batches move their last bits only.
    torch.testing.assert_close(two.features, one.features, rtol=0, atol=1e-5)
