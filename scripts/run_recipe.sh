#!/usr/bin/env bash
# The tiny model's whole lifecycle on CPU (configs/recipe_tiny.yaml): install everything, then pretraining ->
# context extension -> SFT -> DPO, each phase's data prepared from the packaged corpora on the way; prints the
# results table (also in runs/recipe_tiny/results.md). Re-running continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export MLFLOW_DISABLE_TELEMETRY=true
pretrain recipe configs/recipe_tiny.yaml "$@"
