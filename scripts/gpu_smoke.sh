#!/bin/bash
# The CI smoke run on one GPU in bf16: 2 GRPO steps of the demo world through verl's main_ppo
# (with per-decision credit, as in tests/test_verl_e2e.py), then the held-out sweep of the step-2
# judge. CI runs the same pipeline on CPU in fp32; this checks the CUDA platform path, NCCL and
# bf16 end to end. Needs spd_verl installed (its verl.plugins entry point) and one visible GPU.
#
#   bash scripts/gpu_smoke.sh [LOG_DIR] [CKPT_DIR]     # python: $PYTHON, else python3
set -euo pipefail
LOG=${1:-runs/gpu_smoke}
CKPT=${2:-$LOG/ckpt}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}    # DEVICE=cpu VERL_PLATFORM=cpu: a dry run of this script on CPU
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$LOG" "$CKPT"
export VERL_FILE_LOGGER_PATH=$LOG/metrics.jsonl HYDRA_FULL_ERROR=1 PYTHONUNBUFFERED=1
rm -f "$VERL_FILE_LOGGER_PATH"

BF16='{param_dtype: bf16, reduce_dtype: fp32, buffer_dtype: fp32}'
start=$(date +%s)
# The [cpu] settings of spd_demo.yaml that matter on a GPU are overridden here; sdpa and no
# remove-padding stay (flash-attn is optional).
"$PY" -m verl.trainer.main_ppo --config-path "$REPO/configs" --config-name spd_demo \
  trainer.device=$DEVICE trainer.total_training_steps=2 trainer.test_freq=2 trainer.save_freq=2 \
  'trainer.logger=[console,file]' "trainer.default_local_dir=$CKPT" \
  spd.credit.branches=2 \
  actor_rollout_ref.actor.fsdp_config.model_dtype=bf16 "actor_rollout_ref.actor.fsdp_config.mixed_precision=$BF16" \
  actor_rollout_ref.ref.fsdp_config.model_dtype=bf16 "actor_rollout_ref.ref.fsdp_config.mixed_precision=$BF16" \
  actor_rollout_ref.rollout.dtype=bfloat16
echo "main_ppo wall: $(( $(date +%s) - start )) s"

"$PY" - "$VERL_FILE_LOGGER_PATH" <<'EOF'
import json, sys
keys = ("timing_s/step", "timing_s/gen", "timing_s/update_actor", "spd/tau", "spd/accepted_mismatch_rate",
        "spd/accuracy", "spd/credit_branches_per_seq", "actor/grad_norm", "training/rollout_probs_diff_max",
        "val-spd/tau", "val-spd/accuracy")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"step {r['step']}: " + ", ".join(f"{k}={r['data'][k]:.4g}" for k in keys if k in r["data"]))
EOF

"$PY" -m spd_verl.eval --judge "$CKPT/global_step_2/judge" --gamma 6 --max-new-tokens 96 \
  --thresholds 0.5 --target-prob-eps 0.1 --typical-eps 0.3 --no-reference --no-progress --device $DEVICE --out "$LOG/eval"
