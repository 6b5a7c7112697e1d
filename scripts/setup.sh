#!/usr/bin/env bash
# Creates .venv (if missing) with everything spd_verl needs. Idempotent and cheap when done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import spd_verl, verl, pytest" >/dev/null 2>&1; then
  .venv/bin/pip install -q --upgrade pip
  # torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e ".[dev]"
fi
