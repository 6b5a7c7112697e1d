"""SPDRewardManager: verl reward-loop manager ``spd`` wrapping the reward core (spd_verl.reward).

Settings come from the top-level ``spd.reward`` section of the config (RewardConfig fields);
per-sequence decision counts come from the rollout's extra fields (``SPD_STAT_KEYS``).
"""

from __future__ import annotations

from omegaconf import OmegaConf

from verl import DataProto
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

from ..reward import RewardConfig, compute_spd_reward

# Written per sequence by the spd agent loop into non_tensor_batch.
SPD_STAT_KEYS = ("spd_mismatches", "spd_accepted_mismatches", "spd_target_forwards", "spd_truncated")
RUN_TOKENS_KEY = "spd_accepted_run_tokens"  # needed by the gated_run reward only


def reward_config_from(config) -> RewardConfig:
    section = OmegaConf.select(config, "spd.reward", default=None) if config is not None else None
    return RewardConfig(**(OmegaConf.to_container(section) if section is not None else {}))


class SPDRewardManager(RewardManagerBase):
    """Correctness of the final answer, gated efficiency bonus, length guard — each term logged."""

    def __init__(self, config, tokenizer, compute_score=None, reward_router_address=None,
                 reward_model_tokenizer=None, **kwargs):
        super().__init__(config, tokenizer, compute_score)
        self.reward_cfg = reward_config_from(config)
        self.gamma = OmegaConf.select(config, "actor_rollout_ref.rollout.num_speculative_tokens", default=None)

    async def run_single(self, data: DataProto) -> dict:
        item = data[-1]
        nt = item.non_tensor_batch
        rm = nt.get("reward_model")
        if not isinstance(rm, dict) or rm.get("ground_truth") is None:
            extra = nt.get("extra_info") or {}
            raise ValueError(f"dataset row without reward_model.ground_truth (data_source={nt.get('data_source')!r}, "
                             f"extra_info.index={extra.get('index') if isinstance(extra, dict) else None!r}, "
                             f"reward_model={rm!r}): every row needs the reference answer")
        # verl's agent-loop worker hands the rollout's extra_fields to the reward as
        # non_tensor_batch["tool_extra_fields"] (a dict per sample); accept top-level keys too.
        extra_fields = nt.get("tool_extra_fields")
        if isinstance(extra_fields, dict) and all(k in extra_fields for k in SPD_STAT_KEYS):
            nt = {**nt, **{k: extra_fields[k] for k in (*SPD_STAT_KEYS, RUN_TOKENS_KEY) if k in extra_fields}}
        missing = [k for k in SPD_STAT_KEYS if k not in nt]
        if missing:
            raise KeyError(f"SPDRewardManager needs the spd rollout's per-sequence fields {missing}; "
                           f"is actor_rollout_ref.rollout.name=spd with the spd agent loop?")
        response_ids = item.batch["responses"]
        length = int(item.batch["attention_mask"][-response_ids.shape[-1]:].sum())
        text = await self.loop.run_in_executor(
            None, lambda: self.tokenizer.decode(response_ids[:length], skip_special_tokens=True))
        terms = compute_spd_reward(
            text, rm["ground_truth"], mismatches=int(nt["spd_mismatches"]),
            accepted_mismatches=int(nt["spd_accepted_mismatches"]), target_forwards=int(nt["spd_target_forwards"]),
            response_length=length, hit_length_cap=bool(nt["spd_truncated"]), gamma=self.gamma, cfg=self.reward_cfg,
            accepted_run_tokens=None if nt.get(RUN_TOKENS_KEY) is None else int(nt[RUN_TOKENS_KEY]))
        return {"reward_score": terms["score"], "reward_extra_info": terms}


def register() -> None:
    from verl.experimental.reward_loop.reward_manager import register as register_reward_manager

    register_reward_manager("spd")(SPDRewardManager)  # idempotent for the same class
