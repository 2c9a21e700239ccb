#!/usr/bin/env bash
# The context-extension phase of the tiny model end to end on CPU (README "Long context"): pretraining at 256
# tokens (configs/tiny.yaml), then the same 150 steps at 1,024 tokens (configs/tiny_long.yaml, --init-from the
# pretraining checkpoint) once per RoPE scaling (none, linear = position interpolation, yarn), each evaluated with
# `pretrain eval --tasks long_ppl,passkey`; the comparison table goes to $OUT/table.md.
# BASE_CHECKPOINT=runs/tiny/checkpoints/step_00000240 reuses a pretraining checkpoint instead of training one.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/long_context}"
BASE="${BASE_CHECKPOINT:-}"
if [ -z "$BASE" ]; then  # the README's tiny recipe (install, data_cache/tiny, pretraining) into $OUT/base
  RUN_DIR="$OUT/base" bash scripts/run_tiny.sh
  BASE="$(ls -d "$OUT"/base/checkpoints/step_* | tail -1)"
else
  bash scripts/install.sh
fi
. .venv/bin/activate
export MLFLOW_DISABLE_TELEMETRY=true
TOKENIZER=data_cache/tiny/tokenizer.json
bash scripts/prepare_long_context_data.sh
[ -f data_cache/passkey_long/manifest.json ] || pretrain data prepare --out data_cache/passkey_long \
  --source passkey:4000:4000 --tokenizer "$TOKENIZER" --val-fraction 0.02

EVAL=(--data data_cache/tiny_long --seq-len 1024 --lengths 256,512,1024 --windows 16 --trials 4)
YARN=(model.rope.scaling=yarn model.rope.factor=4 model.rope.original_max_seq_len=256 model.max_seq_len=1024)
pretrain eval "$BASE" "${EVAL[@]}" --out "$OUT/eval_base.json"
pretrain eval "$BASE" "${EVAL[@]}" --out "$OUT/eval_base_yarn.json" "${YARN[@]}"  # YaRN without training
REPORTS=("pretrained=$OUT/eval_base.json" "pretrained+yarn=$OUT/eval_base_yarn.json")
for scaling in none linear yarn; do
  pretrain train configs/tiny_long.yaml --run-dir "$OUT/$scaling" --resume auto --init-from "$BASE" \
    model.rope.scaling="$scaling"
  pretrain eval "$(ls -d "$OUT/$scaling"/checkpoints/step_* | tail -1)" "${EVAL[@]}" --out "$OUT/eval_$scaling.json"
  REPORTS+=("extended ($scaling)=$OUT/eval_$scaling.json")
done
python -m tools.long_context_report "${REPORTS[@]}" --out "$OUT/table.md"
