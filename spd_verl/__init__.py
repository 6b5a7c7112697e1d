"""spd_verl: train speculative-decoding judges with GRPO inside verl.

Importing this package is cheap and starts nothing: the heavy components are resolved lazily by
name, and verl registrations happen in :mod:`spd_verl.verl_ext.register` (loaded by verl's
``verl.plugins`` entry point in every process).
"""

__version__ = "0.1.0"

_LAZY = {
    "SpeculativeDecoder": "spd_verl.spd",
    "ScoringModel": "spd_verl.scoring_model",
    "ScoringConfig": "spd_verl.scoring_model",
    "SpeculativeDecodingRollout": "spd_verl.verl_ext.rollout",
    "SPDRewardManager": "spd_verl.verl_ext.reward_manager",
    "SPDRayTrainer": "spd_verl.verl_ext.trainer",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spd_verl' has no attribute {name!r}")
