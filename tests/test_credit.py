"""Per-decision credit by branching (spd_verl/verl_ext/credit.py) and what it relies on:

- δ = correct(taken, lossless rest) − correct(flipped, lossless rest), from the right requests;
- the engine's per-prompt token limits (the server batches branches of different lengths);
- the server's lossless request mode equals RejectAll (the target's greedy decoding);
- the trainer adds coef · δ to verl's advantage at decision positions only.
"""

from __future__ import annotations

import asyncio
import math
import random
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from spd_verl.reward import RewardConfig
from spd_verl.verl_ext.credit import (UNCERTAIN_FLOOR, Continuation, CreditConfig, add_credit, branch_points,
                                      center_soft_terms,
                                      credit_config_from, decision_credit, number_token_ids, soft_risk,
                                      uncertainty_weights)
from spd_verl.verl_ext.keys import DECISIONS_KEY


def test_credit_config_from_and_errors():
    assert credit_config_from(OmegaConf.create({})) == CreditConfig(branches=0, coef=1.0)
    cfg = credit_config_from(OmegaConf.create({"spd": {"credit": {"branches": 3, "coef": 0.5}}}))
    assert (cfg.branches, cfg.coef) == (3, 0.5)
    with pytest.raises(ValueError, match="spd.credit.branches must be an integer >= 0"):
        CreditConfig(branches=-1)
    with pytest.raises(ValueError, match="spd.credit.coef must be > 0"):
        CreditConfig(branches=1, coef=0.0)
    with pytest.raises(ValueError, match="spd.credit.mode must be one of"):
        CreditConfig(branches=1, mode="replace")
    with pytest.raises(ValueError, match=r"unknown spd.credit keys \['brnaches'\]"):
        credit_config_from(OmegaConf.create({"spd": {"credit": {"brnaches": 2}}}))


def test_branch_points():
    rng = random.Random(0)
    chosen = branch_points(list(range(10)), 4, rng)
    assert len(chosen) == 4 and len(set(chosen)) == 4 and chosen == sorted(chosen)
    assert all(0 <= j < 10 for j in chosen)
    assert branch_points([3, 7], 4, rng) == [3, 7]
    assert branch_points([], 4, rng) == []


def test_branch_points_uncertain_pick():
    # Settled decisions (P(accept) ~ 0 or ~ 1) are rarely branched; undecided ones nearly always.
    w = uncertainty_weights([-12.0, 0.0, 12.0, 0.2, -12.0, 12.0])
    assert w[1] == pytest.approx(0.25) and w[0] == UNCERTAIN_FLOOR
    counts = [0] * 6
    rng = random.Random(1)
    for _ in range(2000):
        for j in branch_points(list(range(6)), 2, rng, w):
            counts[j] += 1
    assert min(counts[1], counts[3]) > 1600 and max(counts[0], counts[2], counts[4], counts[5]) < 200
    assert branch_points([4, 9], 3, rng, [0.1, 0.2]) == [4, 9]
    with pytest.raises(ValueError, match="one positive number per candidate"):
        branch_points([1, 2], 1, rng, [0.5, 0.0])
    with pytest.raises(ValueError, match="spd.credit.pick must be one of"):
        CreditConfig(branches=1, pick="random")


class _Tok:
    """Token ids are digits 0-9 plus 10 = '####'; decode joins them with spaces."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join("####" if i == 10 else str(i) for i in ids)


def _credit(generate, response, records, branches=2, seed=0, kind="correct_only", **kw):
    return asyncio.run(decision_credit(generate, _Tok(), [0, 0], response, records, "12", rollout_truncated=False,
                                       max_tokens=kw.pop("max_tokens", 8), branches=branches, rng=random.Random(seed),
                                       reward_cfg=RewardConfig(kind=kind), **kw))


def test_decision_credit_signs_and_requests():
    # Response "5 7 3 #### 1 2": decisions at position 0 (accepted draft 5, target 6) and
    # position 2 (rejected draft 4, target 3). The fake server answers "#### 1 2" after a prefix
    # ending in 5 or 3 and "#### 9" otherwise; the ground truth is 12.
    response = [5, 7, 3, 10, 1, 2]
    records = {"positions": [0, 2], "draft_tokens": [5, 4], "target_tokens": [6, 3], "actions": [1, 0]}
    calls = []

    async def generate(prompt_ids, params):
        calls.append((prompt_ids, params))
        return Continuation([10, 1, 2] if prompt_ids[-1] in (5, 3) else [10, 9], mismatches=1, truncated=False)

    # taken 5 keeps the answer, flipped 6 loses it: +1; taken 3 keeps it, flipped 4 loses it: +1.
    # No mismatch was accepted after either decision, so the rollout itself is the "taken" branch.
    assert _credit(generate, response, records) == {0: 1.0, 2: 1.0}
    assert [c[0] for c in calls] == [[0, 0, 6], [0, 0, 5, 7, 4]]
    assert all(p["spd_policy"] == "reject_all" and p["temperature"] == 0.0 for _, p in calls)
    assert [p["max_tokens"] for _, p in calls] == [7, 5]

    # Decision 2 accepted too: decision 0's "taken" branch must be re-decoded losslessly.
    calls.clear()
    both = dict(records, draft_tokens=[5, 3], target_tokens=[6, 4], actions=[1, 1])
    assert _credit(generate, response, both) == {0: 1.0, 2: 1.0}
    assert [c[0] for c in calls] == [[0, 0, 5], [0, 0, 6], [0, 0, 5, 7, 4]]

    # A decision at the last position of the budget is not branched.
    calls.clear()
    assert _credit(generate, response, records, max_tokens=3) == {0: 1.0}

    # A gate's forced reject is not the judge's decision: never branched.
    calls.clear()
    assert _credit(generate, response, dict(records, forced=[1, 0])) == {2: 1.0}
    assert [c[0] for c in calls] == [[0, 0, 5, 7, 4]]

    out_of_step = dict(records, draft_tokens=[8, 4])
    with pytest.raises(ValueError, match="decision at response position 0 says token 8 but the response has 5"):
        _credit(generate, response, out_of_step)
    with pytest.raises(ValueError, match="spd.credit needs reward kind 'gated', 'gated_run' or 'correct_only'"):
        _credit(generate, response, records, kind="tau_bonus", gamma=4)


def test_decision_credit_harmful_accept_and_gated_bonus():
    records = {"positions": [0], "draft_tokens": [5], "target_tokens": [6], "actions": [1]}

    async def generate(prompt_ids, params):  # after 5 the answer is 9, after 6 it is 12
        return Continuation([10, 9] if prompt_ids[-1] == 5 else [10, 1, 2], mismatches=0, truncated=False)

    # accepting draft 5 led to the wrong answer 9, the target's 6 would have given 12
    assert _credit(generate, [5, 10, 9], records) == {0: -1.0}

    async def harmless(prompt_ids, params):
        return Continuation([10, 1, 2], mismatches=0, truncated=False)

    # gated (alpha 0.5): both right; taken = 1 accepted of 1 mismatch (1.5), flipped = 0 of 1 (1.0)
    assert _credit(harmless, [5, 10, 1, 2], records, kind="gated") == {0: 0.5}


def test_decision_credit_gated_run_pays_the_tokens_an_accept_keeps():
    # Response "5 7 3 #### 1 2": accepted mismatch at 0 kept 3 draft tokens (5 7 3) before the block's
    # next mismatch; rejected one at 2 would have kept 1. Both branches stay right.
    records = {"positions": [0, 2], "draft_tokens": [5, 4], "target_tokens": [6, 3], "actions": [1, 0],
               "runs": [3, 1]}

    async def harmless(prompt_ids, params):
        return Continuation([10, 1, 2], mismatches=0, truncated=False)

    cfg = dict(kind="gated_run")
    out = _credit(harmless, [5, 7, 3, 10, 1, 2], records, **cfg)
    # decision 0: taken = 3 tokens bought of 6 (0.5 * 3/6 with alpha 0.5), flipped = 0 of 4 tokens ([6] + rest)
    # decision 2: taken (reject) = 3 of 6, flipped (accept, 1 more token) = 4 of 6
    assert out == {0: pytest.approx(0.5 * 3 / 6), 2: pytest.approx(0.5 * 3 / 6 - 0.5 * 4 / 6)}
    with pytest.raises(ValueError, match="'gated_run' needs the decision records' runs"):
        _credit(harmless, [5, 7, 3, 10, 1, 2], {k: v for k, v in records.items() if k != "runs"}, **cfg)


def test_decision_credit_policy_rest():
    # Response "5 7 3 #### 1 2" (right), decisions at 0 (accepted 5) and 2 (accepted 3) that kept 3 and 1
    # draft tokens. With rest='policy' the rollout is every taken branch and only the flipped ones are
    # requested, with the rollout's own sampling params; a continuation's accepts count in its reward.
    response = [5, 7, 3, 10, 1, 2]
    records = {"positions": [0, 2], "draft_tokens": [5, 3], "target_tokens": [6, 4], "actions": [1, 1],
               "runs": [3, 1]}
    calls = []

    async def generate(prompt_ids, params):
        calls.append((prompt_ids, params))
        if prompt_ids[-1] == 6:  # the policy, after the target's 6, accepts once more (2 tokens) and stays right
            return Continuation([7, 3, 10, 1, 2], mismatches=2, truncated=False, accepted=1, run_tokens=2)
        return Continuation([10, 9], mismatches=0, truncated=False)  # after the target's 4: wrong

    sampling = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 96}
    out = _credit(generate, response, records, kind="gated_run", rest="policy", policy_params=sampling)
    # rollout: right, 4 of 6 tokens bought (1 + 0.5 * 4/6). Flipped at 0: right, 2 of 6 bought; at 2: wrong.
    assert out == {0: pytest.approx(0.5 * 4 / 6 - 0.5 * 2 / 6), 2: pytest.approx(1 + 0.5 * 4 / 6)}
    assert [c[0] for c in calls] == [[0, 0, 6], [0, 0, 5, 7, 4]]
    assert all(p == {"temperature": 1.0, "top_p": 1.0, "max_tokens": m} for (_, p), m in zip(calls, (7, 5)))
    # The lossless rest re-decodes decision 0's taken branch instead (an accept came after it).
    calls.clear()
    lossless = _credit(generate, response, records, kind="gated_run")
    assert [c[0] for c in calls] == [[0, 0, 5], [0, 0, 6], [0, 0, 5, 7, 4]]
    assert lossless[0] == pytest.approx(0 - (1 + 0.5 * 2 / 6))  # taken "5 #### 9" is wrong there
    assert all(p["spd_policy"] == "reject_all" for _, p in calls)
    with pytest.raises(ValueError, match="rest='policy' needs the rollout's sampling params"):
        _credit(generate, response, records, kind="gated_run", rest="policy")
    with pytest.raises(ValueError, match="spd.credit.rest must be one of"):
        CreditConfig(branches=1, rest="greedy")


def test_soft_risk_and_number_tokens():
    tok = types.SimpleNamespace(get_vocab=lambda: {"Ġ12": 0, "▁3": 1, "7": 2, "gets": 3, ":": 4, "Ġ": 5, "x1": 6})
    assert number_token_ids(tok) == frozenset({0, 1, 2})
    lp = [-0.1, -2.0, -0.5]
    assert soft_risk([3, 0, 2], lp, frozenset({0, 2})) == pytest.approx(2 - math.exp(-2.0) - math.exp(-0.5))
    assert soft_risk([], [], frozenset({0})) == 0.0
    with pytest.raises(ValueError, match="2 target log-probs for 3 tokens"):
        soft_risk([3, 0, 2], lp[:2], frozenset({0}))
    with pytest.raises(ValueError, match="spd.credit.soft_coef must be a number >= 0"):
        CreditConfig(branches=1, soft_coef=-0.5)


def test_decision_credit_soft_risk():
    # One accepted harmless decision (both branches answer 12). The taken branch's arithmetic is
    # doubted (p = 0.5 on its "1", p = 0.9 on its "2"), the flipped one's is sure (p = 1):
    # soft term = -coef * (0.5 + 0.1 - 0).
    records = {"positions": [0], "draft_tokens": [5], "target_tokens": [6], "actions": [1], "logits": [0.0]}
    digits = frozenset(range(10))

    async def generate(prompt_ids, params):
        sure = prompt_ids[-1] == 6
        return Continuation([10, 1, 2], 0, False, [0.0, 0.0, 0.0] if sure else [0.0, math.log(0.5), math.log(0.9)])

    terms = {}
    # taken = the rollout itself (nothing accepted after it): its own log-probs after position 0
    got = _credit(generate, [5, 10, 1, 2], records, kind="correct_only", soft_coef=2.0, number_ids=digits,
                  response_target_logprobs=[-3.0, 0.0, math.log(0.5), math.log(0.9)], soft_terms=terms)
    assert got[0] == pytest.approx(-2.0 * 0.6) and terms[0] == pytest.approx(-1.2)
    # soft off: the same decision gets the plain reward difference, and no terms are reported
    terms.clear()
    assert _credit(generate, [5, 10, 1, 2], records, soft_terms=terms) == {0: 0.0} and terms == {}
    with pytest.raises(ValueError, match="soft_coef > 0 needs the rollout's target log-probs"):
        _credit(generate, [5, 10, 1, 2], records, soft_coef=1.0, number_ids=digits)
    # soft_center: the term is reported but left out of δ (the trainer adds it, centred)
    terms.clear()
    got = _credit(generate, [5, 10, 1, 2], records, kind="correct_only", soft_coef=2.0, number_ids=digits,
                  response_target_logprobs=[-3.0, 0.0, math.log(0.5), math.log(0.9)], soft_terms=terms,
                  soft_in_delta=False)
    assert got == {0: 0.0} and terms[0] == pytest.approx(-1.2)


def test_center_soft_terms():
    # Δ (accept − reject risk) of three branched decisions: 0.3 (accepted), 0.1 (rejected),
    # 0.2 (accepted); Δ̄ = 0.2. Term = -c·s·Δ with s = +1 accept / -1 reject, c = 2.
    c = 2.0
    actions = torch.tensor([1.0, 0.0, 0.0, 1.0])
    branched = torch.tensor([1.0, 1.0, 0.0, 1.0])
    delta = torch.tensor([0.3, 0.1, 0.0, 0.2])
    sign = 2 * actions - 1
    terms = -c * sign * delta * branched
    out, mean = center_soft_terms(terms, actions, branched, c)
    assert mean == pytest.approx(0.2)
    # centred: -c·s·(Δ − Δ̄): the riskier-than-average accept is pushed towards reject (-0.2), the
    # rejection of a safer-than-average wording towards accept (-0.2 for the reject), the average
    # accept not at all, the unbranched decision not at all
    assert out.tolist() == pytest.approx([-0.2, -0.2, 0.0, 0.0])
    # a decision as risky as the average accept gets no soft push either way; the plain term pushed
    # every one of them towards reject
    assert (terms * sign)[branched.bool()].lt(0).all()
    assert center_soft_terms(terms, actions, torch.zeros(4), c) == (pytest.approx(torch.zeros(4)), 0.0)
    with pytest.raises(ValueError, match="must be one flat shape"):
        center_soft_terms(terms, actions[:3], branched, c)
    with pytest.raises(ValueError, match="spd.credit.soft_center needs spd.credit.soft_coef > 0"):
        CreditConfig(branches=2, soft_center=True)
    with pytest.raises(ValueError, match="spd.credit.soft_center must be true or false"):
        CreditConfig(branches=2, soft_coef=1.0, soft_center="yes")


def test_add_credit():
    adv = torch.tensor([[0.5, 0.5, 0.5], [-1.0, -1.0, -1.0]])
    credit = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = add_credit(adv, credit, mask, coef=2.0)
    assert torch.equal(out, torch.tensor([[0.5, -1.5, 0.5], [1.0, -1.0, -1.0]]))
    assert torch.equal(add_credit(adv, credit, mask, coef=2.0, only=True),
                       torch.tensor([[0.0, -2.0, 0.0], [2.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="must have one shape"):
        add_credit(adv, credit[:, :2], mask, 1.0)


def test_engine_per_prompt_limits_equal_separate_calls(tiny_world):
    from transformers import AutoModelForCausalLM

    from spd_verl.spd import RejectAll, SpeculativeDecoder

    draft = AutoModelForCausalLM.from_pretrained(tiny_world["draft"]).eval()
    target = AutoModelForCausalLM.from_pretrained(tiny_world["target"]).eval()
    dec = SpeculativeDecoder(draft, target, num_speculative_tokens=3)
    prompts = [[1, 5, 6, 7], [1, 8, 9], [1, 10, 11, 12, 13]]
    limits = [2, 9, 5]
    together = dec.generate(prompts, RejectAll(), max_new_tokens=limits, eos_token_id=None).responses
    alone = [dec.generate([p], RejectAll(), max_new_tokens=m, eos_token_id=None).responses[0]
             for p, m in zip(prompts, limits)]
    assert together == alone
    assert [len(r) for r in together] == limits
    with pytest.raises(ValueError, match="max_new_tokens has 2 limits for 3 prompts"):
        dec.generate(prompts, RejectAll(), max_new_tokens=[3, 3])
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        dec.generate(prompts, RejectAll(), max_new_tokens=[3, 0, 3])


def test_server_lossless_requests_equal_reject_all(tiny_world):
    from test_verl_engine import make_server, model_config

    from spd_verl.spd import RejectAll

    server = make_server(tiny_world, model_config(tiny_world))
    prompts = [[1, 5, 6, 7], [1, 8, 9, 10]]

    async def run():
        outs = await asyncio.gather(*[
            server.generate(f"r{i}", prompt_ids=p, sampling_params={"temperature": 1.0, "spd_policy": "reject_all",
                                                                    "max_tokens": m})
            for i, (p, m) in enumerate(zip(prompts, (4, 12)))])
        return [o.token_ids for o in outs], outs

    got, outs = asyncio.run(run())
    ref = server.decoder.generate(prompts, RejectAll(), max_new_tokens=[4, 12], eos_token_id=server.eos_token_id)
    assert got == ref.responses
    # decoded by the target alone, with lossless SD's counts (the gated reward reads the mismatches)
    assert [o.extra_fields["spd_mismatches"] for o in outs] == [r.mismatches for r in ref.decisions]
    assert [o.extra_fields["spd_target_forwards"] for o in outs] == [r.target_forwards for r in ref.decisions]
    assert all(DECISIONS_KEY not in o.extra_fields for o in outs)  # nothing was decided
    # the soft risk's input: the target's log-prob of every returned token
    for o, lps in zip(outs, ref.target_logprobs):
        assert o.extra_fields["spd_target_logprobs"] == pytest.approx(lps, abs=1e-5)
    assert [len(o.extra_fields["spd_target_logprobs"]) for o in outs] == [len(g) for g in got]
    assert all(o.extra_fields["spd_decision_mode"] == "lossless" for o in outs)
    assert all(o.extra_fields["spd_accepted_mismatches"] == 0 for o in outs)
    with pytest.raises(ValueError, match="spd_policy='accept_all': the spd server knows only 'reject_all'"):
        asyncio.run(server.generate("x", prompt_ids=prompts[0], sampling_params={"spd_policy": "accept_all"}))


def test_trainer_adds_credit_to_verl_advantage(monkeypatch):
    """SPDRayTrainer._compute_advantage: verl's advantage + coef · credit at decisions, written back."""
    import spd_verl.verl_ext.trainer as trainer_mod
    from spd_verl.verl_ext.trainer import SPDRayTrainer

    nested = lambda rows: torch.nested.as_nested_tensor(rows, layout=torch.jagged)  # noqa: E731
    store = {
        "advantages": nested([torch.tensor([0.5, 0.5, 0.5]), torch.tensor([-1.0, -1.0])]),
        "response_mask": nested([torch.tensor([1, 0, 1]), torch.tensor([1, 1])]),
        "spd_credit": nested([torch.tensor([-1.0, 1.0, 1.0]), torch.tensor([0.0, 1.0])]),
    }
    written = {}
    fake_tq = types.SimpleNamespace(
        kv_batch_get=lambda keys, partition_id, select_fields: {k: store[k] for k in select_fields},
        kv_batch_put=lambda keys, partition_id, fields: written.update(fields=fields) or "batch-after")
    monkeypatch.setattr(trainer_mod, "tq", fake_tq)
    monkeypatch.setattr(trainer_mod.PPOTrainerSync, "_compute_advantage", lambda self, batch, metrics: batch)
    trainer = SPDRayTrainer.__new__(SPDRayTrainer)
    trainer.config = OmegaConf.create({"spd": {"credit": {"branches": 2, "coef": 0.5}}})
    batch = type("B", (), {"keys": ["a", "b"], "partition_id": "train", "__len__": lambda self: 2})()
    metrics = {}
    assert trainer._compute_advantage(batch, metrics) == "batch-after"
    rows = [r.tolist() for r in written["fields"]["advantages"].unbind(0)]
    assert rows == [[0.0, 0.5, 1.0], [-1.0, -0.5]]
    assert metrics["spd/credit_decisions"] == 3  # non-zero credit at a decision position

    trainer.config = OmegaConf.create({"spd": {"credit": {"branches": 0}}})
    written.clear()
    assert trainer._compute_advantage(batch, {}) is batch and not written

    # soft_center: the soft terms are centred over the batch's branched real decisions, then added.
    # Branched: row 0 pos 0 (accepted, Δ 0.4), row 1 pos 1 (rejected, Δ 0.0); row 0 pos 1 is
    # marked branched but masked out (a padding copy), so it must not move Δ̄ = 0.2.
    store.update({
        "spd_credit": nested([torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.0, 0.0])]),
        "spd_credit_soft": nested([torch.tensor([-0.4, -9.0, 0.0]), torch.tensor([0.0, 0.0])]),
        "spd_credit_branched": nested([torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.0, 1.0])]),
        "spd_actions": nested([torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.0, 0.0])]),
    })
    trainer.config = OmegaConf.create({"spd": {"credit": {"branches": 2, "coef": 1.0, "soft_coef": 1.0,
                                                          "soft_center": True}}})
    metrics = {}
    trainer._compute_advantage(batch, metrics)
    rows = [r.tolist() for r in written["fields"]["advantages"].unbind(0)]
    assert metrics["spd/credit_soft_mean_delta"] == pytest.approx(0.2)
    # row 0 pos 0: -(0.4 - 0.2) = -0.2; row 1 pos 1 (reject): +(0.0 - 0.2) = -0.2
    assert rows[0] == pytest.approx([0.5 - 0.2, 0.5, 0.5]) and rows[1] == pytest.approx([-1.0, -1.2])


def test_trainer_replay_buffer_polls_fast():
    """SPDRayTrainer shortens verl's 2 s replay-buffer poll; fails if verl's buffer stops reading
    ``poll_interval`` in its wait (the attribute would then be dead)."""
    import inspect

    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

    from spd_verl.verl_ext.trainer import REPLAY_POLL_INTERVAL_S, SPDRayTrainer

    assert "self.poll_interval" in inspect.getsource(ReplayBuffer._wait_for_next_poll)
    configs = str(Path(__file__).parents[1] / "configs")
    with initialize_config_dir(config_dir=configs, version_base=None):
        cfg = compose(config_name="spd_demo")
    trainer = SPDRayTrainer.__new__(SPDRayTrainer)
    trainer.config = cfg
    trainer.trainer_mode = cfg.trainer.v1.trainer_mode
    trainer._add_prompts_to_generate = lambda n: None
    buffer = trainer._build_replay_buffer()
    assert type(buffer) is ReplayBuffer  # the sync buffer: SPDRayTrainer is the sync trainer
    assert buffer.poll_interval == REPLAY_POLL_INTERVAL_S < 2.0
