"""Every component is registered by verl's plugin loading alone (fresh process, only ``import verl``):
verl logs plugin import errors at debug level, so a broken registration would otherwise go unseen."""

import json
import os
import subprocess
import sys

CHECK = r"""
import json
import verl  # loads the spd_verl entry point, nothing else
from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls
from verl.plugin.platform import PlatformRegistry, get_platform
from verl.trainer.ppo.v1 import get_trainer_cls
from verl.workers.engine import EngineRegistry
from verl.workers.rollout.base import get_rollout_class
from verl.workers.rollout.replica import RolloutReplicaRegistry
import verl.workers.engine_workers as engine_workers

from spd_verl.verl_ext import register

out = {
    "platform": PlatformRegistry.get("cpu").__name__,
    "active_platform": get_platform().device_name,
    "rollout": get_rollout_class("spd", "async").__name__,
    "replica": RolloutReplicaRegistry.get("spd").__name__,
    "agent_loop": _agent_loop_registry["spd_agent"]["_target_"],
    "engine": EngineRegistry.get_engine_cls("spd_scoring", "fsdp2").__name__,
    "trainer": get_trainer_cls("spd").__name__,
    "reward": get_reward_manager_cls("spd").__name__,
    "resolver": __import__("omegaconf").OmegaConf.has_resolver("spd_world"),
    "gloo_fix": getattr(engine_workers.initialize_global_process_group_ray, "_spd_gloo_fix", False),
    "errors_on_second_call": register.register_all(),
}
print("RESULT" + json.dumps(out))
"""


def test_everything_registered_in_fresh_process():
    env = dict(os.environ, VERL_PLATFORM="cpu")
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT"):])
    assert out == {
        "platform": "PlatformCPU",
        "active_platform": "cpu",
        "rollout": "SpeculativeDecodingRollout",
        "replica": "SPDReplica",
        "agent_loop": "spd_verl.verl_ext.agent_loop.SPDAgentLoop",
        "engine": "SPDScoringEngine",
        "trainer": "SPDRayTrainer",
        "reward": "SPDRewardManager",
        "resolver": True,
        "gloo_fix": True,
        "errors_on_second_call": {},
    }
    assert "could not register" not in proc.stderr, proc.stderr[-3000:]


def test_continuous_token_fallback_warning_said_once(caplog):
    """verl warns on every agent-loop instance that Llama has no Continuous Token builder; the spd
    agent loop lets it through once per message. Fails if verl renames the logger or the message
    (then the filter would silently stop working) or starts to map llama itself."""
    import logging

    from verl.utils.tokenizer.continuous_token_wiring import infer_continuous_token_model_family

    from spd_verl.verl_ext import agent_loop

    caplog.set_level(logging.WARNING, logger=agent_loop.CONTINUOUS_TOKEN_LOGGER)
    for _ in range(3):
        infer_continuous_token_model_family(hf_model_type="llama")
        infer_continuous_token_model_family(hf_model_type="spd_test_model_type")
    said = [r.getMessage() for r in caplog.records if r.name == agent_loop.CONTINUOUS_TOKEN_LOGGER]
    assert [m for m in said if "'spd_test_model_type'" in m] == [
        "No model-specific Continuous Token builder is registered for config.json model_type='spd_test_model_type'; "
        "falling back to default."]
    assert len([m for m in said if "'llama'" in m]) <= 1  # at most once per process (an earlier test may have said it)
    assert str(infer_continuous_token_model_family(hf_model_type="llama")) in ("default", "ContinuousTokenModelFamily.DEFAULT")
