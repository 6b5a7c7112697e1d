import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from spd_verl.verl_ext.reward_manager import SPDRewardManager

WORDS = ["<pad>", "</s>", "####", "so", "it", "is"] + [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


def _item(tokenizer, text, gt, mismatches=4, accepted=2, forwards=5, truncated=False, reward_model=None,
          run_tokens=None):
    from verl import DataProto

    resp = tokenizer.encode(text) + [tokenizer.eos_token_id]
    R = 12
    responses = torch.zeros(1, R, dtype=torch.long)
    responses[0, :len(resp)] = torch.tensor(resp)
    prompts = torch.tensor([[3, 4]])
    mask = torch.cat([torch.ones(1, 2), (torch.arange(R) < len(resp)).float()[None]], dim=1).long()
    rm = {"style": "rule", "ground_truth": gt} if reward_model is None else reward_model
    return DataProto.from_dict(
        tensors={"responses": responses, "prompts": prompts, "attention_mask": mask},
        non_tensors={"reward_model": np.array([rm], dtype=object), "data_source": np.array(["spd_arith"]),
                     "extra_info": np.array([{"index": 17}], dtype=object),
                     "spd_mismatches": np.array([mismatches]), "spd_accepted_mismatches": np.array([accepted]),
                     "spd_target_forwards": np.array([forwards]), "spd_truncated": np.array([truncated]),
                     **({} if run_tokens is None else {"spd_accepted_run_tokens": np.array([run_tokens])})})


def test_run_single_reports_every_term(tokenizer):
    cfg = OmegaConf.create({"spd": {"reward": {"kind": "gated", "alpha": 1.0, "overlong_penalty": 0.5}}})
    mgr = SPDRewardManager(cfg, tokenizer, None)
    out = mgr.loop.run_until_complete(mgr.run_single(_item(tokenizer, "so it is 1 2 #### 1 2", "12")))
    info = out["reward_extra_info"]
    assert out["reward_score"] == pytest.approx(1.5)
    assert info["correct"] == 1.0 and info["acceptance_bonus"] == 0.5 and info["accepted_mismatch_rate"] == 0.5
    assert info["tau"] == pytest.approx(9 / 5)  # 8 words + EOS over 5 target forwards
    wrong = mgr.loop.run_until_complete(mgr.run_single(_item(tokenizer, "#### 1 3", "12", truncated=True)))
    assert wrong["reward_score"] == pytest.approx(-0.5) and wrong["reward_extra_info"]["overlong"] == 1.0


def test_run_single_gated_run_reads_the_accepted_run_tokens(tokenizer):
    cfg = OmegaConf.create({"spd": {"reward": {"kind": "gated_run", "alpha": 1.0}}})
    mgr = SPDRewardManager(cfg, tokenizer, None)
    out = mgr.loop.run_until_complete(mgr.run_single(_item(tokenizer, "so it is 1 2 #### 1 2", "12", run_tokens=3)))
    assert out["reward_score"] == pytest.approx(1 + 3 / 9) and out["reward_extra_info"]["accepted_run_tokens"] == 3
    with pytest.raises(ValueError, match="'gated_run' needs accepted_run_tokens"):
        mgr.loop.run_until_complete(mgr.run_single(_item(tokenizer, "#### 1 2", "12")))


def test_row_without_ground_truth_is_named(tokenizer):
    mgr = SPDRewardManager(OmegaConf.create({}), tokenizer, None)
    item = _item(tokenizer, "#### 1", None, reward_model={"style": "rule"})
    with pytest.raises(ValueError, match=r"without reward_model.ground_truth.*index=17"):
        mgr.loop.run_until_complete(mgr.run_single(item))
