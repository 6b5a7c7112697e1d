"""The ``spd`` rollout's settings: verl's RolloutConfig plus the speculative-decoding keys.

verl instantiates ``actor_rollout_ref.rollout`` through its ``_target_`` and rejects unknown keys,
so the SPD keys live on a subclass that ``configs/spd_demo.yaml`` names as the target:

    actor_rollout_ref.rollout._target_: spd_verl.verl_ext.config.SPDRolloutConfig

Then ``actor_rollout_ref.rollout.draft_model_path=...`` etc. are ordinary overrides. Bad values
fail when the config is built, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from verl.workers.config import RolloutConfig

KEY = "actor_rollout_ref.rollout"
DECISION_MODES = ("sample", "threshold")


@dataclass
class SPDRolloutConfig(RolloutConfig):
    """Speculative decoding with a judge (DESIGN.md §3).

    draft_model_path / target_model_path: frozen Hugging Face causal LMs sharing one tokenizer.
    num_speculative_tokens: γ, draft tokens proposed per block.
    decision_mode: how training rollouts decide mismatches — ``sample`` (accept ~ Bernoulli(σ(s/T)),
        T = sampling temperature) or ``threshold``. Requests with temperature 0 (verl's validation
        default, ``val_kwargs.temperature=0``) always use the threshold rule.
    score_threshold: accept iff σ(s) > score_threshold in threshold mode.
    min_accept_run: the run gate (spd.RunGated; 1 = none): an accept must keep a run of at least this
        many draft tokens in its block, in both modes. Training behind it, the mismatches the gate
        rejects whatever the judge samples are not decisions (decision mask 0, no gradient), so the
        judge learns where its choice is carried out; deploy it behind the same gate.
    draft_temperature: 0 = greedy draft.
    batch_window_ms: the server collects requests arriving within this window into one batch.
    max_batch_size: at most this many sequences per engine call.
    cpu_threads: torch threads of the server when it runs on CPU (Ray starts actors with
        OMP_NUM_THREADS=1); None leaves torch's setting alone.
    """

    draft_model_path: Optional[str] = None
    target_model_path: Optional[str] = None
    num_speculative_tokens: int = 4
    decision_mode: str = "sample"
    score_threshold: float = 0.5
    min_accept_run: int = 1
    draft_temperature: float = 0.0
    batch_window_ms: float = 20.0
    max_batch_size: int = 256
    cpu_threads: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        validate_spd_settings(self)


def check_int_at_least_1(value, key: str, nullable: bool = False) -> None:
    """``value`` is an int >= 1 (bools are not), or None when ``nullable``; the error names ``key``."""
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be an integer >= 1{' or null' if nullable else ''}, got {value!r}")


def check_min_run(value, key: str, gamma: int) -> None:
    """A run gate is an int in [1, γ]: an accept keeps at most γ draft tokens of its block, so a
    longer gate would never accept (lossless SD under another name)."""
    check_int_at_least_1(value, key)
    if value > gamma:
        raise ValueError(f"{key} must be <= num_speculative_tokens ({gamma}): an accept keeps at most "
                         f"{gamma} draft tokens of its block, so {value} would never accept; got {value!r}")


def validate_spd_settings(cfg) -> None:
    """Range checks of the SPD keys (paths are checked where the models are loaded)."""
    check_int_at_least_1(cfg.num_speculative_tokens, f"{KEY}.num_speculative_tokens")
    th = cfg.score_threshold
    if isinstance(th, bool) or not isinstance(th, (int, float)) or not 0.0 < float(th) < 1.0:
        raise ValueError(f"{KEY}.score_threshold must be in the open interval (0, 1), got {th!r}")
    check_min_run(cfg.min_accept_run, f"{KEY}.min_accept_run", cfg.num_speculative_tokens)
    if cfg.decision_mode not in DECISION_MODES:
        raise ValueError(f"{KEY}.decision_mode must be one of {DECISION_MODES}, got {cfg.decision_mode!r}")
    if cfg.draft_temperature < 0:
        raise ValueError(f"{KEY}.draft_temperature must be >= 0, got {cfg.draft_temperature!r}")
    if cfg.batch_window_ms < 0:
        raise ValueError(f"{KEY}.batch_window_ms must be >= 0, got {cfg.batch_window_ms!r}")
    if cfg.max_batch_size < 1:
        raise ValueError(f"{KEY}.max_batch_size must be >= 1, got {cfg.max_batch_size!r}")
    check_int_at_least_1(getattr(cfg, "cpu_threads", None), f"{KEY}.cpu_threads", nullable=True)
