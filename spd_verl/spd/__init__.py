"""Judge-in-the-loop speculative decoding engine (no verl imports)."""

from .engine import DecisionRecord, SDResult, SpeculativeDecoder, decision_tensors
from .lossless import LosslessResult
from .policies import (FEATURE_NAMES, NUM_FEATURES, AcceptAll, BernoulliPolicy, DecisionContext, Policy, RejectAll,
                       RunGated, TargetProbPolicy, ThresholdPolicy, TypicalPolicy, run_gated)

__all__ = [
    "SpeculativeDecoder", "SDResult", "LosslessResult", "DecisionRecord", "decision_tensors", "Policy",
    "DecisionContext", "RejectAll", "AcceptAll", "ThresholdPolicy", "BernoulliPolicy", "TargetProbPolicy",
    "TypicalPolicy", "RunGated", "run_gated",
    "FEATURE_NAMES", "NUM_FEATURES",
]
