"""Names shared by the spd rollout, agent loop, engine and metrics. No imports on purpose: verl
loads the plugin while these modules are being imported, so shared names must not form a cycle."""

# Per-sequence statistics the server puts in TokenOutput.extra_fields (reward manager, metrics).
STAT_KEYS = ("spd_mismatches", "spd_accepted_mismatches", "spd_target_forwards", "spd_truncated")
# The server's decision records in extra_fields; the agent loop turns them into batch tensors.
DECISIONS_KEY = "spd_decisions"
# Batch fields (per response position) the agent loop emits and the actor engine consumes.
SIDE_FIELDS = ("spd_draft_tokens", "spd_target_tokens", "spd_actions", "spd_old_logits", "spd_features")
# Sampling param selecting lossless decoding for one request (the credit branches' continuations).
POLICY_PARAM = "spd_policy"
# Per-position credit the agent loop adds next to the side fields (0 where no branch was run).
CREDIT_KEY = "spd_credit"
# With spd.credit.soft_center: the soft term (uncentred) and a 1 at every branched decision.
CREDIT_SOFT_KEY = "spd_credit_soft"
CREDIT_BRANCHED_KEY = "spd_credit_branched"
# Target log-prob of every response token (server extra_fields; the agent loop pops it).
TARGET_LOGPROBS_KEY = "spd_target_logprobs"
