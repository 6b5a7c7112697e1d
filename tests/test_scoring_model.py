import pytest
import torch
from transformers import AutoModel

from spd_verl.scoring_model import (ScoringModel, add_lora, decision_log_probs, export_judge, load_judge)
from spd_verl.spd import NUM_FEATURES, BernoulliPolicy, SpeculativeDecoder, decision_tensors
from tiny import perturbed, random_prompts, tiny_llama


@pytest.fixture(scope="module")
def models():
    target = tiny_llama(layers=2, hidden=64, seed=0)
    return target, perturbed(target, scale=0.006)


def _noisy_lora_judge(draft, seed=0):
    judge = add_lora(ScoringModel.from_backbone(draft, init_accept_prob=0.5), rank=4, alpha=8)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in judge.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return judge.eval()


def _finished_batch(prompts, res):
    """Right-padded prompt+response sequences with decision tensors aligned to the input ids."""
    R = max(len(r) for r in res.responses)
    P = max(len(p) for p in prompts)
    dec = decision_tensors(res.decisions, R)
    B, L = len(prompts), P + R
    t = dict(input_ids=torch.zeros(B, L, dtype=torch.long), attention_mask=torch.zeros(B, L, dtype=torch.long),
             draft_tokens=torch.zeros(B, L, dtype=torch.long), target_tokens=torch.zeros(B, L, dtype=torch.long),
             features=torch.zeros(B, L, NUM_FEATURES), mask=torch.zeros(B, L, dtype=torch.bool), old=torch.zeros(B, L),
             actions=torch.zeros(B, L))
    for b, (p, r) in enumerate(zip(prompts, res.responses)):
        n, m = len(p), len(r)
        t["input_ids"][b, :n + m] = torch.tensor(p + r)
        t["attention_mask"][b, :n + m] = 1
        for k_src, k_dst in [("draft_tokens", "draft_tokens"), ("target_tokens", "target_tokens"),
                             ("features", "features"), ("old_logits", "old"), ("actions", "actions")]:
            t[k_dst][b, n:n + R] = dec[k_src][b]
        t["mask"][b, n:n + R] = dec["decision_mask"][b].bool()
    return t


def test_replay_invariant(models):
    """One forward over the finished sequences reproduces every rollout-time decision logit."""
    target, draft = models
    judge = _noisy_lora_judge(draft)
    prompts = random_prompts(6, seed=1)
    res = SpeculativeDecoder(draft, target, judge=judge, num_speculative_tokens=3).generate(
        prompts, BernoulliPolicy(seed=0), max_new_tokens=30)
    t = _finished_batch(prompts, res)
    assert t["mask"].sum() == res.stats["mismatches"] > 10
    assert 0 < res.stats["accepted_mismatches"] < res.stats["mismatches"]
    with torch.no_grad():
        logits = judge.decision_logits(t["input_ids"], t["draft_tokens"], t["target_tokens"], t["features"],
                                       attention_mask=t["attention_mask"])
    assert torch.allclose(logits[t["mask"]], t["old"][t["mask"]], atol=1e-5)
    logp, ent = decision_log_probs(logits[t["mask"]], t["actions"][t["mask"]])
    p = torch.sigmoid(logits[t["mask"]])
    a = t["actions"][t["mask"]]
    assert torch.allclose(logp, torch.log(torch.where(a > 0, p, 1 - p)), atol=1e-5)
    assert torch.allclose(ent, -(p * p.log() + (1 - p) * (1 - p).log()), atol=1e-5)


def test_init_prob_and_backbone_weights(models):
    _, draft = models
    judge = ScoringModel.from_backbone(draft, init_accept_prob=0.8)
    assert torch.equal(judge.model.embed_tokens.weight, draft.model.embed_tokens.weight)
    ids = torch.tensor([random_prompts(1, max_len=20)[0] * 2])
    logits = judge.decision_logits(ids, ids, ids.flip(1), torch.randn(1, ids.shape[1], NUM_FEATURES))
    assert torch.allclose(torch.sigmoid(logits[:, 1:]), torch.tensor(0.8), atol=1e-6)
    with pytest.raises(ValueError, match="init_accept_prob"):
        ScoringModel.from_backbone(draft, init_accept_prob=1.0)


def test_a_judge_with_fewer_features_reads_the_first_columns(models):
    """Feature columns are only ever appended (FEATURE_NAMES): a judge built with the first four
    (before the look-ahead columns existed) scores the full feature tensor as it scored its four."""
    _, draft = models
    judge = ScoringModel.from_backbone(draft, num_features=4)
    with torch.no_grad():
        judge.score_head.weight.normal_(0, 0.5)
    ids = torch.tensor([random_prompts(1, max_len=20, seed=2)[0] * 2])
    feats = torch.randn(1, ids.shape[1], NUM_FEATURES)
    with torch.no_grad():
        torch.testing.assert_close(judge.decision_logits(ids, ids, ids.flip(1), feats),
                                   judge.decision_logits(ids, ids, ids.flip(1), feats[..., :4]))
    assert NUM_FEATURES > 4 and judge.score_head.in_features == 5 * draft.config.hidden_size + 4


def test_only_lora_and_head_train(models):
    _, draft = models
    judge = add_lora(ScoringModel.from_backbone(draft), rank=64, alpha=32)  # the seed's setting
    trainable = [n for n, p in judge.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "score_head" in n for n in trainable)
    assert any("score_head" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert not any("lora" in n and "score_head" in n for n in trainable)  # head trains fully, no LoRA on it


def test_save_load_round_trip(models, tmp_path):
    _, draft = models
    judge = _noisy_lora_judge(draft)
    ids = torch.tensor([random_prompts(1, max_len=20, seed=4)[0] * 2])
    feats = torch.randn(1, ids.shape[1], NUM_FEATURES)
    with torch.no_grad():
        ref = judge.decision_logits(ids, ids, ids.roll(1, 1), feats)
    export_judge(judge, tmp_path / "judge")
    loaded = load_judge(tmp_path / "judge")
    with torch.no_grad():
        assert torch.allclose(loaded.decision_logits(ids, ids, ids.roll(1, 1), feats), ref, atol=1e-6)
    # plain ScoringModel round trip is exact, and the Auto classes know the model type
    loaded.save_pretrained(tmp_path / "plain")
    again = AutoModel.from_pretrained(tmp_path / "plain")
    assert isinstance(again, ScoringModel)
    for (n1, p1), (n2, p2) in zip(loaded.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    # the PEFT adapter alone loads onto a fresh base too
    from peft import PeftModel
    base = ScoringModel.from_backbone(draft)
    peft_judge = PeftModel.from_pretrained(base, tmp_path / "judge" / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(peft_judge.decision_logits(ids, ids, ids.roll(1, 1), feats), ref, atol=1e-6)


def test_missing_judge_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no judge at"):
        load_judge(tmp_path / "nope")
