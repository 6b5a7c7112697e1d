"""Both shipped configs compose on top of verl's own and accept the design card's keys as overrides."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONFIGS = Path(__file__).parents[1] / "configs"
SEED_OVERRIDES = [
    "actor_rollout_ref.model.lora_rank=64", "actor_rollout_ref.model.lora_alpha=32",
    "actor_rollout_ref.model.target_modules=all-linear", "actor_rollout_ref.rollout.n=5",
    "actor_rollout_ref.rollout.score_threshold=0.7", "actor_rollout_ref.rollout.num_speculative_tokens=6",
    "actor_rollout_ref.rollout.draft_model_path=/d", "actor_rollout_ref.rollout.target_model_path=/t",
    "actor_rollout_ref.model.path=/d", "algorithm.adv_estimator=grpo", "actor_rollout_ref.actor.optim.lr=3e-6",
    "data.train_files=/x.parquet", "data.val_files=/y.parquet", "trainer.n_gpus_per_node=4",
    "spd.reward.alpha=0.25", "spd.reward.kind=tau_bonus",
]


def _compose(name, overrides=()):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name=name, overrides=list(overrides))


@pytest.mark.parametrize("name", ["spd_demo", "spd_gsm8k"])
def test_config_composes_with_seed_overrides(name):
    from verl.utils.config import omega_conf_to_dataclass

    cfg = _compose(name, SEED_OVERRIDES)
    assert cfg.actor_rollout_ref.rollout.name == "spd"
    assert cfg.reward.reward_manager.name == "spd"
    assert cfg.trainer.v1.trainer_mode == "spd"
    assert cfg.actor_rollout_ref.model.lora_rank == 64
    rollout = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    assert (rollout.score_threshold, rollout.num_speculative_tokens, rollout.n) == (0.7, 6, 5)
    assert (cfg.spd.reward.alpha, cfg.spd.reward.kind) == (0.25, "tau_bonus")
    assert "ppo_epochs" in OmegaConf.to_container(cfg.actor_rollout_ref.actor)  # verl's defaults came along


@pytest.mark.parametrize("override,message", [
    ("actor_rollout_ref.rollout.score_threshold=1.5", "score_threshold must be in the open interval"),
    ("actor_rollout_ref.rollout.num_speculative_tokens=0", "num_speculative_tokens must be an integer >= 1"),
])
def test_bad_rollout_settings_fail_naming_the_key(override, message):
    from verl.utils.config import omega_conf_to_dataclass

    cfg = _compose("spd_gsm8k", [override])
    from hydra.errors import InstantiationException

    with pytest.raises((ValueError, InstantiationException), match=message):
        omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)


def test_demo_eval_settings():
    """The demo's held-out evaluation: γ 8 with the run gates 1, 3, 4 and 5; a gate longer than the
    evaluation's γ names the key before anything runs."""
    from spd_verl.train import eval_gamma, eval_min_runs

    cfg = _compose("spd_demo")
    assert (eval_gamma(cfg), eval_min_runs(cfg, eval_gamma(cfg))) == (8, [1, 3, 5])
    assert cfg.actor_rollout_ref.rollout.min_accept_run == 1  # training's validation is not gated
    cfg = _compose("spd_demo", ["spd.eval.num_speculative_tokens=4"])
    with pytest.raises(ValueError, match=r"spd.eval.min_runs must be <= num_speculative_tokens \(4\)"):
        eval_min_runs(cfg, eval_gamma(cfg))


def test_eval_batch_size():
    """spd.eval.batch_size: the demo's 400 is taken; null is spd-eval's 32; a bad one names the key."""
    from spd_verl.train import eval_batch_size

    assert eval_batch_size(_compose("spd_demo")) == 400
    assert eval_batch_size(_compose("spd_demo", ["spd.eval.batch_size=null"])) == 32
    for bad in ("0", "2.5", "true"):
        with pytest.raises(ValueError, match=r"spd.eval.batch_size must be an integer >= 1 or null"):
            eval_batch_size(_compose("spd_demo", [f"spd.eval.batch_size={bad}"]))


def test_demo_calibration_margin():
    """spd.eval.fine_tol: the demo's half-point margin; null is the target's 1 point; a margin inside
    it is taken as given; one outside [0, 0.01] (or not a number) names the key before anything runs."""
    from spd_verl.train import eval_fine_tol

    assert eval_fine_tol(_compose("spd_demo")) == 0.005
    assert eval_fine_tol(_compose("spd_demo", ["spd.eval.fine_tol=null"])) == 0.01
    assert eval_fine_tol(_compose("spd_demo", ["spd.eval.fine_tol=0.0025"])) == 0.0025
    for bad in ("0.02", "-0.001", "true", "abc"):
        with pytest.raises(ValueError, match=r"spd.eval.fine_tol must be a number in \[0, 0.01\]"):
            eval_fine_tol(_compose("spd_demo", [f"spd.eval.fine_tol={bad}"]))


def test_eval_tau_floor_setting():
    """spd.eval.tau_floor: a speed-up > 1 over lossless SD, or null (the most τ); anything else names
    the key before anything runs."""
    from spd_verl.train import eval_tau_floor

    assert eval_tau_floor(_compose("spd_demo")) == 1.35
    assert eval_tau_floor(_compose("spd_demo", ["spd.eval.tau_floor=null"])) is None
    assert eval_tau_floor(_compose("spd_demo", ["spd.eval.tau_floor=1.35"])) == 1.35
    for bad in ("1.0", "0.9", "true", "abc"):
        with pytest.raises(ValueError, match=r"spd.eval.tau_floor is a speed-up over lossless SD and must be a "
                                             r"number > 1"):
            eval_tau_floor(_compose("spd_demo", [f"spd.eval.tau_floor={bad}"]))


def test_demo_chooses_the_step_with_the_swap_proxy():
    """The demo saves a judge every 5 steps, scores all on the swap proxy and calibrates the best two."""
    from spd_verl.train import eval_judges, eval_proxy, eval_proxy_more

    cfg = _compose("spd_demo")
    assert cfg.trainer.save_freq == 5 and eval_proxy(cfg) == (2, 400, 0.025) and eval_proxy_more(cfg) == 2
    exports = [(s, f"global_step_{s}/judge") for s in range(5, 65, 5)]
    assert eval_judges(cfg, exports) == exports
    with pytest.raises(ValueError, match=r"spd.eval.proxy_keep must be an integer >= 1 or null"):
        eval_proxy(_compose("spd_demo", ["spd.eval.proxy_keep=0"]))
