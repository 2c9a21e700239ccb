#!/usr/bin/env bash
# README command 2: install everything (with the test extras) and run the test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev,megatron,hf
. .venv/bin/activate
export MLFLOW_DISABLE_TELEMETRY=true
python -m pytest tests -q --durations=30 "$@"
