#!/usr/bin/env bash
# The README's main command: set-up, GRPO training of the judge on the demo world through
# `python -m verl.trainer.main_ppo` (configs/spd_demo.yaml), then a held-out evaluation.
# Extra arguments are Hydra overrides (e.g. trainer.total_training_steps=20).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/spd-train "$@"
