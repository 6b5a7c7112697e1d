"""Bad input fails early with an error that names the problem."""

import shutil

import pytest
from omegaconf import OmegaConf

from conftest import VOCAB_SIZE, _llama, _rows, write_parquet

ROLLOUT = {"_target_": "spd_verl.verl_ext.config.SPDRolloutConfig", "name": "spd", "tensor_model_parallel_size": 1,
           "dtype": "float32", "response_length": 8, "prompt_length": 16}


def rollout_config(**kw):
    from verl.utils.config import omega_conf_to_dataclass

    return omega_conf_to_dataclass(OmegaConf.create({**ROLLOUT, **kw}))  # the way verl builds it


def model_config(path):
    from verl.utils.config import omega_conf_to_dataclass

    return omega_conf_to_dataclass(OmegaConf.create({
        "_target_": "verl.workers.config.HFModelConfig", "path": path, "lora_rank": 2,
        "override_config": {"attn_implementation": "sdpa"}}))


@pytest.mark.parametrize("key, value, match", [
    ("score_threshold", 0.0, "score_threshold must be in the open interval"),
    ("score_threshold", 1.0, "score_threshold must be in the open interval"),
    ("score_threshold", 1.5, "score_threshold must be in the open interval"),
    ("num_speculative_tokens", 0, "num_speculative_tokens must be an integer >= 1"),
    ("decision_mode", "greedy", "decision_mode must be one of"),
    ("cpu_threads", 0, "cpu_threads must be an integer >= 1 or null"),
    ("min_accept_run", 0, "min_accept_run must be an integer >= 1"),
    ("min_accept_run", 99, r"min_accept_run must be <= num_speculative_tokens \(\d+\)"),
])
def test_rollout_settings_out_of_range(key, value, match):
    from hydra.errors import InstantiationException  # how hydra wraps the dataclass's ValueError

    with pytest.raises((ValueError, InstantiationException), match=f"actor_rollout_ref.rollout.{match}"):
        rollout_config(**{key: value})


def test_valid_rollout_settings():
    cfg = rollout_config(score_threshold=0.7, num_speculative_tokens=6, decision_mode="threshold")
    assert (cfg.score_threshold, cfg.num_speculative_tokens, cfg.decision_mode) == (0.7, 6, "threshold")


@pytest.mark.parametrize("missing", ["draft_model_path", "target_model_path"])
def test_missing_model_path_is_named(tiny_world, missing):
    from spd_verl.verl_ext.server import SPDServer

    paths = {"draft_model_path": tiny_world["draft"], "target_model_path": tiny_world["target"]}
    paths[missing] = None
    with pytest.raises(ValueError, match=f"actor_rollout_ref.rollout.{missing} is not set"):
        SPDServer(rollout_config(**paths), model_config(tiny_world["draft"]))
    paths[missing] = "/nonexistent/model"
    with pytest.raises(ValueError, match=f"actor_rollout_ref.rollout.{missing}='/nonexistent/model'"):
        SPDServer(rollout_config(**paths), model_config(tiny_world["draft"]))


def test_draft_target_vocab_size_mismatch(tiny_world, tmp_path):
    from spd_verl.verl_ext.server import SPDServer

    other = _llama(seed=5, layers=1, hidden=32)
    other.resize_token_embeddings(VOCAB_SIZE + 3)
    other.save_pretrained(tmp_path / "draft")
    with pytest.raises(ValueError, match="vocabularies differ: vocab_size"):
        SPDServer(rollout_config(draft_model_path=str(tmp_path / "draft"), target_model_path=tiny_world["target"]),
                  model_config(tiny_world["draft"]))


def test_draft_target_tokenizer_mismatch(tiny_world, tmp_path):
    """Same vocab size, different token <-> id mapping: caught through the tokenizer files."""
    from transformers import AutoTokenizer

    from spd_verl.verl_ext.server import SPDServer

    target = tmp_path / "target"
    shutil.copytree(tiny_world["target"], target)
    tok = AutoTokenizer.from_pretrained(target)
    vocab = tok.get_vocab()
    swapped = dict(vocab, plus=vocab["minus"], minus=vocab["plus"])
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=swapped, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(target)
    with pytest.raises(ValueError, match="tokenizer mismatch between draft and target"):
        SPDServer(rollout_config(draft_model_path=tiny_world["draft"], target_model_path=str(target)),
                  model_config(tiny_world["draft"]))


def test_server_needs_spd_rollout_config(tiny_world):
    from verl.utils.config import omega_conf_to_dataclass

    from spd_verl.verl_ext.server import SPDServer

    plain = omega_conf_to_dataclass(OmegaConf.create({**ROLLOUT, "_target_": "verl.workers.config.RolloutConfig"}))
    with pytest.raises(TypeError, match="_target_=spd_verl.verl_ext.config.SPDRolloutConfig"):
        SPDServer(plain, model_config(tiny_world["draft"]))


def test_rollout_replica_must_be_one_process():
    from spd_verl.verl_ext.rollout import _check_single_process

    with pytest.raises(ValueError, match="tensor_model_parallel_size=1"):
        _check_single_process(rollout_config(tensor_model_parallel_size=2))


def test_dataset_row_without_ground_truth_is_named(tiny_world, tmp_path):
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from conftest import _tokenizer
    from spd_verl.verl_ext.trainer import check_ground_truth

    rows = _rows(3, 0) + _rows(1, 50, ground_truth=False) + _rows(2, 60)
    path = write_parquet(rows, tmp_path / "bad.parquet")
    cfg = OmegaConf.create({"max_prompt_length": 32, "filter_overlong_prompts": False, "return_raw_chat": True,
                            "cache_dir": str(tmp_path / "cache")})
    dataset = RLHFDataset(data_files=path, tokenizer=_tokenizer(), config=cfg)
    with pytest.raises(ValueError, match=r"train data row 3 \(data_source='spd_arith'.*'index': 50.*"
                                         r"has no reward_model.ground_truth"):
        check_ground_truth(dataset, "train")
    check_ground_truth(RLHFDataset(data_files=tiny_world["train"], tokenizer=_tokenizer(), config=cfg), "train")


def test_decisions_that_do_not_fit_the_response_are_refused():
    from spd_verl.verl_ext.agent_loop import decision_fields

    records = {"positions": [1, 9], "draft_tokens": [5, 6], "target_tokens": [7, 8], "actions": [1, 0],
               "logits": [0.1, -0.2], "features": [[0.0] * 4, [0.0] * 4]}
    with pytest.raises(ValueError, match=r"decision positions \[9\] outside the response \(length 5\)"):
        decision_fields(records, 5)
    fields = decision_fields(records, 10)
    assert fields["response_mask"] == [0, 1] + [0] * 7 + [1] and fields["spd_actions"][1] == 1.0
