#!/usr/bin/env bash
# The passkey experiment of README "Long context" end to end on CPU: the tiny model pretrained at 128 tokens with
# synthetic passkey documents mixed in (configs/tiny_passkey.yaml), then extended to 512 tokens (4x) on the same
# budget once per RoPE scaling (none, linear = position interpolation, yarn; configs/tiny_passkey_long.yaml), each
# evaluated with `pretrain eval --tasks long_ppl,passkey`; the comparison table goes to $OUT/table.md.
# ~35 min of pretraining and ~10 min per extension on 2 AVX2 cores. Re-running resumes or reuses what is done.
# BASE_CHECKPOINT=runs/passkey_extension/base/checkpoints/step_00001500 reuses a pretraining checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/passkey_extension}"
bash scripts/install.sh
. .venv/bin/activate
export MLFLOW_DISABLE_TELEMETRY=true
TOKENIZER=data_cache/tiny/tokenizer.json
bash scripts/prepare_long_context_data.sh
[ -f data_cache/passkey_128/manifest.json ] || pretrain data prepare --out data_cache/passkey_128 \
  --source passkey:40000:300 --tokenizer "$TOKENIZER"
[ -f data_cache/passkey_512/manifest.json ] || pretrain data prepare --out data_cache/passkey_512 \
  --source passkey:4000:1800 --tokenizer "$TOKENIZER" --val-fraction 0.02

BASE="${BASE_CHECKPOINT:-}"
if [ -z "$BASE" ]; then
  pretrain train configs/tiny_passkey.yaml --run-dir "$OUT/base" --resume auto
  BASE="$(ls -d "$OUT"/base/checkpoints/step_* | tail -1)"
fi
EVAL=(--tasks long_ppl,passkey --data data_cache/tiny_long --seq-len 512 --windows 16 --lengths 128,256,512 --trials 8)
pretrain eval "$BASE" "${EVAL[@]}" --out "$OUT/eval_base.json"
for scaling in linear yarn; do  # the pretrained model with the scaling switched on, without training
  pretrain eval "$BASE" "${EVAL[@]}" --out "$OUT/eval_base_$scaling.json" model.rope.scaling="$scaling" \
    model.rope.factor=4 model.rope.original_max_seq_len=128 model.max_seq_len=512
done
REPORTS=("pretrained=$OUT/eval_base.json" "pretrained+linear=$OUT/eval_base_linear.json"
         "pretrained+yarn=$OUT/eval_base_yarn.json")
for scaling in none linear yarn; do
  pretrain train configs/tiny_passkey_long.yaml --run-dir "$OUT/$scaling" --resume auto --init-from "$BASE" \
    model.rope.scaling="$scaling"
  pretrain eval "$(ls -d "$OUT/$scaling"/checkpoints/step_* | tail -1)" "${EVAL[@]}" --out "$OUT/eval_$scaling.json"
  REPORTS+=("extended ($scaling)=$OUT/eval_$scaling.json")
done
python -m tools.long_context_report "${REPORTS[@]}" --out "$OUT/table.md"
