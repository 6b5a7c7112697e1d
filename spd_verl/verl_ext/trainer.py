"""SPDRayTrainer: verl's synchronous V1 PPO trainer (``trainer.v1.trainer_mode=spd``) plus

- SPD metrics every step (``spd/*``: τ, mismatches, accepted-mismatch rate, target forwards per
  token, response length, accuracy) and over validation (``val-spd/*``; validation requests use
  verl's ``val_kwargs`` — temperature 0 → the threshold rule);
- a Hugging Face export of the judge at every checkpoint (``global_step_N/judge``, loadable with
  ``spd_verl.scoring_model.load_judge``), written right after the weight sync so it holds exactly
  the weights just checkpointed;
- a check that every dataset row has ``reward_model.ground_truth``;
- a replay buffer that polls for finished rollouts every ``REPLAY_POLL_INTERVAL_S`` instead of
  verl's 2 s (see ``_build_replay_buffer``);
- with ``spd.credit.branches`` > 0, the per-decision credit (``credit.py``) added to verl's GRPO
  advantage at the branched decisions. verl 0.9.1's advantage estimators see only the rewards,
  the mask and the group index, so this happens right after verl's ``_compute_advantage``.

GRPO advantages, PPO loss, KL, checkpointing and resume are verl's.
"""

from __future__ import annotations

import logging
import os

import ray
import torch
import transfer_queue as tq
from tensordict import TensorDict
from verl.trainer.ppo.v1 import PPOTrainerSync, register_trainer

from .credit import add_credit, center_soft_terms, credit_config_from
from .engine import fit_to_length
from .keys import CREDIT_BRANCHED_KEY, CREDIT_KEY, CREDIT_SOFT_KEY
from .metrics import rows_from_extra_fields, rows_from_reward_infos, spd_summary

logger = logging.getLogger(__name__)

TRAINER_MODE = "spd"
JUDGE_EXPORT_DIR = "judge"
# verl's sync ReplayBuffer.sample() sleeps 2 s between looks at TransferQueue, so every generation
# phase (training and validation) is rounded up to a multiple of 2 s: on the demo world, where a
# step's rollouts take ~6-9 s, that was ~1 s of idle time per step (gen timings of exactly 8.04,
# 10.05, 12.06 s). A look is one metadata read, cheap at this rate.
REPLAY_POLL_INTERVAL_S = 0.1


def check_ground_truth(dataset, split: str) -> None:
    """Fail early, naming the row, when a dataset row has no reward_model.ground_truth."""
    frame = getattr(dataset, "dataframe", None)
    if frame is None or "reward_model" not in frame.column_names:
        raise ValueError(f"{split} data has no reward_model column: every row needs reward_model.ground_truth")
    for i, rm in enumerate(frame["reward_model"]):
        if not isinstance(rm, dict) or rm.get("ground_truth") is None or str(rm.get("ground_truth")) == "":
            row = frame[i]
            raise ValueError(f"{split} data row {i} (data_source={row.get('data_source')!r}, "
                             f"extra_info={row.get('extra_info')!r}) has no reward_model.ground_truth "
                             f"(got reward_model={rm!r}); files: {getattr(dataset, 'data_files', '?')}")


@register_trainer(TRAINER_MODE)
class SPDRayTrainer(PPOTrainerSync):
    """Trains the speculative-decoding judge with verl's GRPO; see module docstring."""

    _pending_export: str | None = None

    # verl keys its synchronous behaviour (sync replay buffer, dataloader batching, no
    # TransferQueue checkpoint/re-issue on resume) on ``self.trainer_mode == "sync"``, read from
    # ``trainer.v1.trainer_mode`` — which for this class is its registered name. It *is* the sync
    # trainer, so the attribute always reads "sync".
    @property
    def trainer_mode(self) -> str:
        return "sync"

    @trainer_mode.setter
    def trainer_mode(self, value: str) -> None:
        if value not in (TRAINER_MODE, "sync"):
            raise ValueError(f"SPDRayTrainer is registered as trainer.v1.trainer_mode={TRAINER_MODE!r}, got {value!r}")

    def _build_replay_buffer(self):
        buffer = super()._build_replay_buffer()
        if not hasattr(buffer, "poll_interval"):
            raise RuntimeError(f"{type(buffer).__name__} has no poll_interval: verl's replay buffer changed, "
                               "review SPDRayTrainer._build_replay_buffer")
        buffer.poll_interval = REPLAY_POLL_INTERVAL_S
        return buffer

    def _init_dataloader(self):
        super()._init_dataloader()
        check_ground_truth(self.train_dataset, "train")
        check_ground_truth(self.val_dataset, "val")

    # ------------------------------------------------------------------ advantages
    def _compute_advantage(self, batch, metrics):
        batch = super()._compute_advantage(batch, metrics=metrics)
        cfg = credit_config_from(self.config)
        if not cfg.branches:
            return batch
        fields = ["advantages", "response_mask", CREDIT_KEY]
        if cfg.soft_center:
            fields += [CREDIT_SOFT_KEY, CREDIT_BRANCHED_KEY, "spd_actions"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        advs = data["advantages"].unbind(0)
        # verl's padding samples have 1-token responses: every per-position field is fitted to them
        per_row = {k: [fit_to_length(t, a.shape[0]) for t, a in zip(data[k].unbind(0), advs, strict=True)]
                   for k in fields[2:]}
        masks = data["response_mask"].unbind(0)
        credits = per_row[CREDIT_KEY]
        if cfg.soft_center:
            credits = self._centre_soft(credits, masks, per_row, cfg.soft_coef, metrics)
        rows, decisive = [], 0
        for adv, mask, credit in zip(advs, masks, credits, strict=True):
            rows.append(add_credit(adv, credit, mask, cfg.coef, only=cfg.mode == "only"))
            decisive += int(((credit != 0) & (mask != 0)).sum())
        metrics["spd/credit_decisions"] = decisive  # decisions whose advantage the credit moved
        out = TensorDict({"advantages": torch.nested.as_nested_tensor(rows, layout=torch.jagged)},
                         batch_size=len(batch))
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=out)

    @staticmethod
    def _centre_soft(credits, masks, per_row, soft_coef, metrics):
        """credits + the batch-centred soft terms (credit.center_soft_terms), row by row. Only real
        decisions count: a padding sample copies a real one's side tensors under a zero mask."""
        lengths = [c.shape[0] for c in credits]
        flat = {k: torch.cat([t.float() for t in per_row[k]]) for k in (CREDIT_SOFT_KEY, CREDIT_BRANCHED_KEY,
                                                                         "spd_actions")}
        branched = flat[CREDIT_BRANCHED_KEY] * torch.cat([m.float() for m in masks])
        terms, mean = center_soft_terms(flat[CREDIT_SOFT_KEY], flat["spd_actions"], branched, soft_coef)
        metrics["spd/credit_soft_mean_delta"] = mean  # Δ̄: how much riskier an accept was, on average
        return [c + t.to(c.dtype) for c, t in zip(credits, terms.split(lengths), strict=True)]

    # ------------------------------------------------------------------ metrics
    def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        super()._compute_metrics(batch, metrics, timing_raw, global_steps=global_steps, epoch=epoch)
        keep = [i for i, tag in enumerate(batch.tags) if not tag.get("is_padding", False)]
        if not keep:
            return
        keys = [batch.keys[i] for i in keep]
        data = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id,
                               select_fields=["extra_fields", "responses"])
        responses = data["responses"]
        lengths = responses.offsets().diff().tolist() if responses.is_nested else [responses.shape[1]] * len(keys)
        extra = list(data["extra_fields"].tolist() if hasattr(data["extra_fields"], "tolist") else data["extra_fields"])
        metrics.update(spd_summary(rows_from_extra_fields(extra, lengths), prefix="spd"))

    def _val_metrics_update(self, data_sources, sample_uids, reward_extra_infos_dict, sample_turns, **kwargs):
        metrics = super()._val_metrics_update(data_sources, sample_uids, reward_extra_infos_dict, sample_turns,
                                              **kwargs)
        metrics.update(spd_summary(rows_from_reward_infos(reward_extra_infos_dict), prefix="val-spd"))
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self):
        super()._save_checkpoint()
        step_dir = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        self._pending_export = os.path.abspath(os.path.join(step_dir, JUDGE_EXPORT_DIR))

    def on_step_end(self):
        super().on_step_end()  # syncs the just-updated actor into the rollout servers
        if self._pending_export:
            self.export_judge(self._pending_export)
            self._pending_export = None

    def export_judge(self, out_dir: str) -> str:
        """Write the current judge (the rollout server's synced copy) in Hugging Face format."""
        replicas = self.llm_server_manager.get_replicas()
        path = ray.get(replicas[0].server_handle.export_judge.remote(out_dir))
        logger.info("exported judge to %s", path)
        return path

