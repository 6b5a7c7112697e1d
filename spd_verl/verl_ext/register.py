"""Register every spd_verl component in verl's registries.

verl imports this module in every process through the ``verl.plugins`` entry point (pyproject.toml),
so Ray workers have the components without any import on our side. Calling :func:`register_all`
again is a no-op. verl swallows plugin import errors at debug level, so each component is
registered separately and a failure is logged as a warning naming it (tests/test_verl_register.py
checks, in a fresh process, that all of them are there).

Components: platform ``cpu`` (selected by VERL_PLATFORM=cpu), rollout ``spd`` (adapter + replica),
agent loop ``spd_agent``, engine model_type ``spd_scoring``, trainer mode ``spd``, reward manager ``spd``,
and the config resolver ``${spd_world:<relative path>}`` (a path inside the packaged demo world).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

ROLLOUT_NAME = "spd"
AGENT_LOOP_NAME = "spd_agent"
ENGINE_MODEL_TYPE = "spd_scoring"
TRAINER_MODE = "spd"
REWARD_MANAGER_NAME = "spd"
ADAPTER_FQN = "spd_verl.verl_ext.rollout.SpeculativeDecodingRollout"
AGENT_LOOP_FQN = "spd_verl.verl_ext.agent_loop.SPDAgentLoop"


def _platform():
    from . import cpu_platform  # @PlatformRegistry.register("cpu") on import

    cpu_platform.install_gloo_backend_fix()


def _load_replica():
    from .rollout import SPDReplica

    return SPDReplica


def _rollout():
    # Both registries take names/loaders: the rollout modules load only where a rollout is built.
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    _ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = ADAPTER_FQN
    RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica)


def _agent_loop():
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry

    # What ``@register`` stores, without importing the loop class here.
    _agent_loop_registry[AGENT_LOOP_NAME] = {"_target_": AGENT_LOOP_FQN}


def _engine():
    from . import engine  # noqa: F401  (@EngineRegistry.register on import)


def _trainer():
    from . import trainer  # noqa: F401  (@register_trainer on import)


def _reward_manager():
    from .reward_manager import register

    register()


def world_path(relative: str = "") -> str:
    """``${spd_world:draft}`` -> <package>/assets/world/draft (configs/spd_demo.yaml's paths)."""
    from spd_verl.world import WORLD_DIR

    path = WORLD_DIR / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the demo world is not built (run `spd-world`), "
                                f"or pass the paths as overrides")
    return str(path)


def _resolver():
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("spd_world"):
        OmegaConf.register_new_resolver("spd_world", world_path)


COMPONENTS = {
    "platform cpu": _platform,
    f"rollout {ROLLOUT_NAME}": _rollout,
    f"agent loop {AGENT_LOOP_NAME}": _agent_loop,
    f"engine {ENGINE_MODEL_TYPE}": _engine,
    f"trainer mode {TRAINER_MODE}": _trainer,
    f"reward manager {REWARD_MANAGER_NAME}": _reward_manager,
    "config resolver spd_world": _resolver,
}
_done: set[str] = set()


def register_all() -> dict[str, str]:
    """Register what is not registered yet; returns {component: error} for failures."""
    errors = {}
    for name, fn in COMPONENTS.items():
        if name in _done:
            continue
        try:
            fn()
            _done.add(name)
        except Exception as e:  # keep registering the others; verl would hide the error
            errors[name] = f"{type(e).__name__}: {e}"
            logger.warning("spd_verl: could not register %s: %s", name, errors[name], exc_info=True)
    return errors


register_all()
