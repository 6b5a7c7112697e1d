#!/usr/bin/env bash
# The README's test command: sets up .venv from scratch if needed, then runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q tests "$@"
