import math

import pytest
import torch

from spd_verl.scoring_model import ScoringModel
from spd_verl.spd import (AcceptAll, BernoulliPolicy, DecisionContext, RejectAll, RunGated, SpeculativeDecoder,
                          TargetProbPolicy, ThresholdPolicy, TypicalPolicy)
from spd_verl.spd.engine import decision_tensors, next_mismatch, run_features
from spd_verl.spd.policies import NUM_FEATURES, RUN_TOKENS, Policy
from tiny import EOS, greedy, perturbed, random_prompts, tiny_llama


@pytest.fixture(scope="module")
def models():
    target = tiny_llama(layers=2, hidden=64, seed=0)
    return target, perturbed(target, scale=0.006)


def _eos_inside(target, prompts):
    """(row, EOS id, length): a token the target first emits mid-generation for that row."""
    for i, p in enumerate(prompts):
        out = greedy(target, p, 40)
        for k in range(3, 40):
            if out[k] not in out[:k]:
                return i, out[k], k + 1
    raise AssertionError("no usable EOS candidate")


@pytest.mark.parametrize("gamma", [1, 3, 5])
@pytest.mark.parametrize("batch", [1, 8])
def test_reject_all_is_target_greedy(models, gamma, batch):
    target, draft = models
    prompts = random_prompts(batch, seed=gamma)
    row, eos, eos_len = _eos_inside(target, prompts)
    res = SpeculativeDecoder(draft, target, num_speculative_tokens=gamma).generate(
        prompts, RejectAll(), max_new_tokens=40, eos_token_id=eos)
    for p, r in zip(prompts, res.responses):
        assert r == greedy(target, p, 40, eos)
    assert res.responses[row][-1] == eos and len(res.responses[row]) == eos_len
    assert res.stats["accepted_mismatches"] == 0
    if batch > 1:  # both matches and mismatches were exercised
        assert 0 < res.stats["draft_acceptance_rate"] < 1


def test_reject_all_long_generation_with_cache_compaction(models):
    target, draft = models
    prompts = random_prompts(4, seed=11)
    res = SpeculativeDecoder(draft, target, num_speculative_tokens=4).generate(prompts, RejectAll(),
                                                                               max_new_tokens=120)
    for p, r in zip(prompts, res.responses):
        assert r == greedy(target, p, 120)


def test_sampled_draft_still_lossless_and_seeded(models):
    target, draft = models
    prompts = random_prompts(3, seed=5)
    run = lambda: SpeculativeDecoder(draft, target, num_speculative_tokens=3, draft_temperature=1.0,
                                     seed=123).generate(prompts, AcceptAll(), max_new_tokens=20)
    assert run().responses == run().responses
    res = SpeculativeDecoder(draft, target, num_speculative_tokens=3, draft_temperature=1.0, seed=1).generate(
        prompts, RejectAll(), max_new_tokens=20)
    for p, r in zip(prompts, res.responses):
        assert r == greedy(target, p, 20)


@pytest.mark.parametrize("gamma", [1, 3, 8])
def test_generate_lossless_equals_reject_all(models, gamma):
    """The target alone emits lossless SD's text, and the replay counts its mismatches and forwards."""
    target, draft = models
    prompts = random_prompts(8, seed=gamma)
    row, eos, eos_len = _eos_inside(target, prompts)
    limits = [40, 5, 40, 17, 40, 1, 40, 33]
    dec = SpeculativeDecoder(draft, target, num_speculative_tokens=gamma)
    sd = dec.generate(prompts, RejectAll(), max_new_tokens=limits, eos_token_id=eos)
    fast = dec.generate_lossless(prompts, max_new_tokens=limits, eos_token_id=eos)
    assert fast.responses == sd.responses
    assert fast.responses[row][-1] == eos and [len(r) for r in fast.responses][5] == 1
    assert fast.mismatches == [r.mismatches for r in sd.decisions] and sum(fast.mismatches) > 0
    assert fast.target_forwards == [r.target_forwards for r in sd.decisions]
    for a, b in zip(fast.target_logprobs, sd.target_logprobs):
        assert a == pytest.approx(b, abs=1e-5)
    with pytest.raises(ValueError, match="max_new_tokens has 2 limits for 8 prompts"):
        dec.generate_lossless(prompts, max_new_tokens=[3, 3])


def test_generate_lossless_with_a_sampled_draft_runs_lossless_sd(models):
    target, draft = models
    prompts = random_prompts(3, seed=5)
    make = lambda: SpeculativeDecoder(draft, target, num_speculative_tokens=3, draft_temperature=1.0, seed=9)  # noqa: E731
    fast = make().generate_lossless(prompts, max_new_tokens=20)
    sd = make().generate(prompts, RejectAll(), max_new_tokens=20)
    assert fast.responses == sd.responses == [greedy(target, p, 20) for p in prompts]
    assert fast.mismatches == [r.mismatches for r in sd.decisions]  # the sampled proposals' own count


@pytest.mark.parametrize("gamma", [1, 4])
def test_accept_all_semantics(models, gamma):
    target, draft = models
    prompts = random_prompts(4, seed=7)
    res = SpeculativeDecoder(draft, target, num_speculative_tokens=gamma).generate(prompts, AcceptAll(),
                                                                                   max_new_tokens=23)
    for p, r in zip(prompts, res.responses):
        seq, ref = list(p), []
        while len(ref) < 23:
            block = greedy(draft, seq, gamma)
            block += greedy(target, seq + block, 1)
            ref += block
            seq += block
        assert r == ref[:23]
    assert res.stats["accepted_mismatches"] == res.stats["mismatches"] > 0


def _run_gated_reference(draft, target, prompt, gamma, min_run, n):
    """AcceptAll behind RunGated, block by block from plain greedy calls: decide the mismatches from
    the block's end backwards; an accept needs the run to the next rejected one (or the end) >= min_run."""
    seq, out = list(prompt), []
    while len(out) < n:
        d = greedy(draft, seq, gamma)
        t = [greedy(target, seq + d[:j], 1)[0] for j in range(gamma + 1)]
        stop, rejected = gamma, []
        for j in reversed(range(gamma)):
            if d[j] != t[j] and stop - j < min_run:
                stop = j
                rejected.append(j)
        r = min(rejected, default=gamma)
        out += d[:r] + [t[r]]
        seq += d[:r] + [t[r]]
    return out[:n]


@pytest.mark.parametrize("min_run", [1, 2, 3, 5])
def test_run_gate_semantics(models, min_run):
    target, draft = models
    prompts = random_prompts(4, seed=7)
    dec = SpeculativeDecoder(draft, target, num_speculative_tokens=4)
    res = dec.generate(prompts, RunGated(AcceptAll(), min_run), max_new_tokens=23)
    for p, r in zip(prompts, res.responses):
        assert r == _run_gated_reference(draft, target, p, 4, min_run, 23)
    if min_run == 1:  # every run is >= 1: the gate changes nothing
        assert res.responses == dec.generate(prompts, AcceptAll(), max_new_tokens=23).responses
    elif min_run == 5:  # a run is at most γ = 4 draft tokens: lossless
        assert res.responses == [greedy(target, p, 23) for p in prompts]
    else:
        assert 0 < res.stats["accepted_mismatches"] < res.stats["mismatches"]


class _Coin(Policy):
    """Seeded coin flips, no judge: a stand-in for the sampled training rule."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def decide(self, ctx):
        return torch.rand(ctx.draft_tokens.shape, generator=self.g) < 0.5


def test_gated_sampling_records_forced_rejects_apart(models):
    """Behind the gate, the mismatches it rejects whatever the policy chose are recorded as forced:
    counted as mismatches, never accepted, and left out of the decision mask (no training signal)."""
    target, draft = models
    prompts = random_prompts(6, seed=11)
    dec = SpeculativeDecoder(draft, target, num_speculative_tokens=4)
    res = dec.generate(prompts, RunGated(AcceptAll(), 3), max_new_tokens=23)
    forced = [f for rec in res.decisions for f in rec.forced]
    actions = [a for rec in res.decisions for a in rec.actions]
    assert len(forced) == len(actions) == res.stats["mismatches"]
    assert actions == [1 - f for f in forced]  # AcceptAll: every reject is the gate's
    assert 0 < res.stats["forced_rejects"] == sum(forced) < len(forced)

    res = dec.generate(prompts, RunGated(_Coin(0), 3), max_new_tokens=23)
    recs = res.decisions
    assert all(a == 0 for rec in recs for a, f in zip(rec.actions, rec.forced) if f)
    chosen = [a for rec in recs for a, f in zip(rec.actions, rec.forced) if not f]
    assert 0 < sum(chosen) < len(chosen)  # the coin's own accepts and rejects both happen
    tensors = decision_tensors(recs, 23)
    assert tensors["decision_mask"].sum() == len(chosen) < res.stats["mismatches"]
    for b, rec in enumerate(recs):
        for p, f in zip(rec.positions, rec.forced):
            assert tensors["decision_mask"][b, p] == 1 - f
    # Without a gate nothing is forced.
    plain = dec.generate(prompts, _Coin(0), max_new_tokens=23)
    assert plain.stats["forced_rejects"] == 0 and all(not any(r.forced) for r in plain.decisions)


def test_run_features_by_hand():
    m = torch.tensor([[0, 1, 0, 1, 0, 0]], dtype=torch.bool)
    lp = torch.tensor([[-0.1, -5.0, -0.3, -4.0, -0.2, -0.6]])
    f = run_features(next_mismatch(m), lp)  # next mismatch per column: 1, 3, 3, 6, 6, 6
    assert f[0, :, 0].tolist() == [1, 2, 1, 3, 2, 1]
    assert f[0, :, 1].tolist() == [0, 0, 0, 1, 1, 1]
    # lowest target log-prob of the draft tokens strictly between the column and its next mismatch
    assert f[0, :, 2].tolist() == pytest.approx([0.0, -0.3, 0.0, -0.6, -0.6, 0.0])


def test_stored_features_look_down_the_block(models):
    """The recorded look-ahead columns agree with the run the gate reads: with AcceptAll behind
    RunGated(k), an accept happens exactly where the run to the next mismatch (or, through later
    accepts, further) is >= k, so every accepted mismatch whose run reaches the block's end has
    run_tokens >= k."""
    target, draft = models
    gamma = 4
    dec = SpeculativeDecoder(draft, target, num_speculative_tokens=gamma)
    res = dec.generate(random_prompts(6, seed=11), RunGated(AcceptAll(), 3), max_new_tokens=23)
    rows = [(f, a) for rec in res.decisions for f, a in zip(rec.features, rec.actions)]
    assert rows and all(len(f) == NUM_FEATURES for f, _ in rows)
    # runs: the look-ahead run (cut where the response ends, for an accept); a reject's is what an
    # accept would have kept
    for rec, resp in zip(res.decisions, res.responses):
        for r, f, p, a in zip(rec.runs, rec.features, rec.positions, rec.actions):
            assert r == min(int(f[4]), len(resp) - p) if a else 1 <= r <= f[4]
    assert res.stats["accepted_run_tokens"] == sum(r.accepted_run_tokens for r in res.decisions) > 0
    ends = [(f, a) for f, a in rows if f[5] == 1.0]
    assert ends and all(a == int(f[4] >= 3) for f, a in ends)
    assert all(1 <= f[4] <= gamma and f[6] <= 0 for f, _ in rows)


def test_next_mismatch_and_run_gate_by_hand():
    m = torch.tensor([[0, 1, 0, 1, 0, 0], [1, 1, 0, 0, 0, 1]], dtype=torch.bool)
    assert next_mismatch(m).tolist() == [[1, 3, 3, 6, 6, 6], [1, 5, 5, 5, 5, 6]]
    # Row 0: mismatches at positions 10, 12 of a block ending at 15; row 1: 20, 21, block end 26.
    ctx = DecisionContext(rows=torch.tensor([0, 0, 1, 1]), positions=torch.tensor([10, 12, 20, 21]),
                          draft_tokens=torch.tensor([5, 6, 7, 8]), target_tokens=torch.tensor([1, 2, 3, 4]),
                          logits=None, features=torch.zeros(4, NUM_FEATURES))
    ctx.features[:, RUN_TOKENS] = torch.tensor([2.0, 3.0, 1.0, 5.0])  # to the block's next mismatch or end
    assert RunGated(AcceptAll(), 3).decide(ctx).tolist() == [True, True, True, True]
    assert RunGated(AcceptAll(), 4).decide(ctx).tolist() == [False, False, True, True]

    class NotAt21(AcceptAll):
        def decide(self, ctx):
            return ctx.positions != 21

    # 21 rejected by the base rule: an accept at 20 would keep one token only.
    assert RunGated(NotAt21(), 2).decide(ctx).tolist() == [True, True, False, False]
    # ... so 20 is the gate's reject (forced), 21 the base rule's own (a decision).
    assert ctx.forced.tolist() == [False, False, True, False]
    RunGated(AcceptAll(), 4).decide(ctx)
    assert ctx.forced.tolist() == [True, True, False, False]
    assert RunGated(NotAt21(), 1).decide(ctx).tolist() == [True, True, True, False]
    assert RunGated(ThresholdPolicy(0.5), 2).needs_judge
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="min_run must be an integer >= 1"):
            RunGated(AcceptAll(), bad)


def test_identical_draft_gives_full_blocks(models):
    target, _ = models
    res = SpeculativeDecoder(target, target, num_speculative_tokens=4).generate(random_prompts(3), RejectAll(),
                                                                                max_new_tokens=25)
    assert res.stats["mismatches"] == 0
    assert all(len(r) == 25 for r in res.responses)
    assert res.stats["target_forwards"] == 3 * math.ceil(25 / 5)


def test_stats_and_records_consistent(models):
    target, draft = models
    prompts = random_prompts(6, seed=9)
    judge = ScoringModel.from_backbone(draft, init_accept_prob=0.5)
    res = SpeculativeDecoder(draft, target, judge=judge, num_speculative_tokens=3).generate(
        prompts, BernoulliPolicy(seed=0), max_new_tokens=30, eos_token_id=EOS)
    s = res.stats
    assert s["emitted_tokens"] == sum(map(len, res.responses))
    assert s["target_forwards"] == sum(r.target_forwards for r in res.decisions)
    assert s["tau"] == pytest.approx(s["emitted_tokens"] / s["target_forwards"])
    assert s["mismatches"] == sum(r.mismatches for r in res.decisions)
    assert 0 < s["accepted_mismatches"] < s["mismatches"]
    for resp, rec in zip(res.responses, res.decisions):
        assert len(resp) <= 30
        assert rec.positions == sorted(rec.positions) and all(p < len(resp) for p in rec.positions)
        for pos, d, t, a, lg in zip(rec.positions, rec.draft_tokens, rec.target_tokens, rec.actions, rec.logits):
            assert d != t
            assert resp[pos] == (d if a else t)
            assert lg == pytest.approx(0.0, abs=1e-6)  # untrained judge: P(accept) = init prob = 0.5


def test_bernoulli_seeded_reproducible(models):
    target, draft = models
    judge = ScoringModel.from_backbone(draft, init_accept_prob=0.5)
    dec = SpeculativeDecoder(draft, target, judge=judge, num_speculative_tokens=3)
    prompts = random_prompts(4)
    a = dec.generate(prompts, BernoulliPolicy(seed=4), max_new_tokens=20)
    b = dec.generate(prompts, BernoulliPolicy(seed=4), max_new_tokens=20)
    assert a.responses == b.responses
    assert [r.actions for r in a.decisions] == [r.actions for r in b.decisions]


def test_threshold_extremes_reduce_to_baselines(models):
    target, draft = models
    prompts = random_prompts(4, seed=2)
    dec_plain = SpeculativeDecoder(draft, target, num_speculative_tokens=3)
    for p0, baseline in [(0.999, AcceptAll()), (0.001, RejectAll())]:
        judge = ScoringModel.from_backbone(draft, init_accept_prob=p0)
        got = SpeculativeDecoder(draft, target, judge=judge, num_speculative_tokens=3).generate(
            prompts, ThresholdPolicy(0.5), max_new_tokens=20)
        assert got.responses == dec_plain.generate(prompts, baseline, max_new_tokens=20).responses


def test_nan_logit_is_a_counted_reject(models):
    target, draft = models
    judge = ScoringModel.from_backbone(draft)
    with torch.no_grad():
        judge.score_head.bias.fill_(float("nan"))
    prompts = random_prompts(3)
    res = SpeculativeDecoder(draft, target, judge=judge, num_speculative_tokens=3).generate(
        prompts, BernoulliPolicy(seed=0), max_new_tokens=15)
    assert res.stats["accepted_mismatches"] == 0 and res.stats["nan_logits"] > 0
    for p, r in zip(prompts, res.responses):
        assert r == greedy(target, p, 15)


def test_training_free_baselines_run(models):
    target, draft = models
    prompts = random_prompts(4)
    dec = SpeculativeDecoder(draft, target, num_speculative_tokens=3)
    lo = dec.generate(prompts, TargetProbPolicy(1e-6), max_new_tokens=20).stats
    hi = dec.generate(prompts, TargetProbPolicy(0.999), max_new_tokens=20).stats
    assert lo["accepted_mismatch_rate"] == 1.0 and hi["accepted_mismatch_rate"] == 0.0
    assert dec.generate(prompts, TypicalPolicy(0.3), max_new_tokens=20).stats["emitted_tokens"] > 0


def test_bad_input_errors(models):
    target, draft = models
    other = tiny_llama(layers=1, hidden=32, vocab=60)
    with pytest.raises(ValueError, match="draft vocab_size=60, target vocab_size=50"):
        SpeculativeDecoder(other, target)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeDecoder(draft, target, num_speculative_tokens=0)
    dec = SpeculativeDecoder(draft, target, num_speculative_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.generate([[9, 10]], RejectAll(), max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        dec.generate([[9, 10], []], RejectAll(), max_new_tokens=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        dec.generate([[9, 99]], RejectAll(), max_new_tokens=4)
    with pytest.raises(ValueError, match="needs a judge"):
        dec.generate([[9, 10]], ThresholdPolicy(0.5), max_new_tokens=4)
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"threshold must be in the open interval \(0, 1\)"):
            ThresholdPolicy(bad)


@pytest.mark.parametrize("policy", [RejectAll(), AcceptAll(), BernoulliPolicy(seed=3)], ids=lambda p: p.name)
def test_target_logprobs_replay_a_target_forward(models, policy):
    """target_logprobs[b][j] is the target's log-prob of emitted token j given everything before it,
    whichever policy decided: one plain target forward over prompt + response reproduces it."""
    target, draft = models
    prompts = random_prompts(4, seed=21)
    judge = ScoringModel.from_backbone(draft) if policy.needs_judge else None
    res = SpeculativeDecoder(draft, target, judge=judge, num_speculative_tokens=4).generate(
        prompts, policy, max_new_tokens=30)
    for p, r, lps in zip(prompts, res.responses, res.target_logprobs):
        assert len(lps) == len(r) > 0
        with torch.no_grad():
            lp = torch.log_softmax(target(torch.tensor([p + r])).logits[0].float(), dim=-1)
        ref = lp[len(p) - 1:-1].gather(1, torch.tensor(r)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(lps), ref, atol=1e-4, rtol=1e-4)
        if policy.name == "reject_all":  # lossless text is the target's argmax: its top-1 log-prob
            torch.testing.assert_close(torch.tensor(lps), lp[len(p) - 1:-1].max(-1).values, atol=1e-4, rtol=1e-4)


def test_preallocated_cache_changes_nothing(models, monkeypatch):
    """The in-place KV buffers (cache.GrowingLayer) against Hugging Face's DynamicCache: same
    responses, decision records, stats and log-probs, through growth, row removal and compaction,
    with the default capacities and with tight ones (regrowth every few slots)."""
    from spd_verl.spd import cache

    target, _ = models
    draft = perturbed(target, scale=0.1)  # a poor draft: many rejected slots, so compaction runs
    judge = ScoringModel.from_backbone(draft, init_accept_prob=0.5)
    with torch.no_grad():  # logits that depend on the judge's cached states; mostly rejects, so
        torch.manual_seed(0)  # holes pile up and compaction runs while several rows are active
        judge.score_head.weight.normal_(0.0, 0.05)
        judge.score_head.bias.fill_(-1.0)
    calls = {"grow": 0, "batch_select_indices": 0, "gather_slots": 0}
    for name in ("batch_select_indices", "gather_slots"):
        def counted(self, *args, _orig=getattr(cache.GrowingLayer, name), _name=name):
            calls[_name] += 1
            return _orig(self, *args)
        monkeypatch.setattr(cache.GrowingLayer, name, counted)

    def install(self, k, v, n, _orig=cache.GrowingLayer._install):
        calls["grow"] += self._k is not None and k.shape[2] > self._k.shape[2]
        return _orig(self, k, v, n)
    monkeypatch.setattr(cache.GrowingLayer, "_install", install)
    prompts = random_prompts(8, seed=4, max_len=20)
    limits = [40, 10, 30, 40, 20, 40, 5, 35]  # rows leave at different blocks

    def run(pre):
        dec = SpeculativeDecoder(draft, target, judge=judge, num_speculative_tokens=5, preallocate_cache=pre)
        return dec.generate(prompts, ThresholdPolicy(0.5), max_new_tokens=limits)

    old = run(False)
    assert 0 < old.stats["accepted_mismatches"] < old.stats["mismatches"]
    for tight in (False, True):
        if tight:
            monkeypatch.setattr(cache, "_capacity", lambda slots, device: slots + 3)
        calls.update(grow=0, batch_select_indices=0, gather_slots=0)
        new = run(True)
        assert calls["batch_select_indices"] and calls["gather_slots"], calls  # row removal, compaction
        assert calls["grow"] or not tight, calls
        assert new.responses == old.responses
        assert new.decisions == old.decisions  # judge logits included (no NaN: the judge ran)
        assert new.stats == old.stats
        assert new.target_logprobs == old.target_logprobs
