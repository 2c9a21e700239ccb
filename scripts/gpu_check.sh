#!/usr/bin/env bash
# The GPU checks, for a machine with one CUDA GPU and torch already installed (not part of CI):
#   bash scripts/gpu_check.sh OUT_DIR
# Needs the small data folder `pretrain data prepare --out data_cache/gpu --source shakespeare
# --tokenizer data_cache/tiny/tokenizer.json`, and (offline machines) wheels of omegaconf, webdataset and
# braceexpand in .whl/. Writes bench_gpu.json, the two training runs' summaries and logs to OUT_DIR.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m tools.bench_gpu --json "$out/bench_gpu.json" 2>&1 | tee "$out/bench_gpu.log" | tail -40
for cfg in tiny tiny_moe; do
  python3 -m pretrain.cli train "configs/$cfg.yaml" --run-dir "/tmp/runs/$cfg" data.dir=data_cache/gpu \
    tracking.mlflow=false 2>&1 | tee "$out/train_$cfg.log" | tail -4
  cp "/tmp/runs/$cfg/summary.json" "$out/summary_$cfg.json"
done
# torch.compile per block (train.compile) on both models: tokens/s and loss against the eager runs above
for cfg in tiny tiny_moe; do
  python3 -m pretrain.cli train "configs/$cfg.yaml" --run-dir "/tmp/runs/${cfg}_compiled" data.dir=data_cache/gpu \
    tracking.mlflow=false train.compile=true 2>&1 | tee "$out/train_${cfg}_compiled.log" | grep -E "compile|step" | tail -4
done
# bf16 weights with fp32 masters (train.param_dtype) on both models: tokens/s and loss against the eager runs above
for cfg in tiny tiny_moe; do
  python3 -m pretrain.cli train "configs/$cfg.yaml" --run-dir "/tmp/runs/${cfg}_bf16_weights" data.dir=data_cache/gpu \
    tracking.mlflow=false train.param_dtype=bf16 2>&1 | tee "$out/train_${cfg}_bf16_weights.log" | grep -E "bf16|step" | tail -4
done
# sharded checkpoints on CUDA: verify one, resume the tiny run from its middle checkpoint (saved in the run above)
# and from a background (async) save, and compare the final losses with the uninterrupted run
python3 -m pretrain.cli checkpoint verify /tmp/runs/tiny/checkpoints/step_00000240 2>&1 | tee "$out/checkpoint.log"
python3 -m pretrain.cli train configs/tiny.yaml --run-dir /tmp/runs/tiny_resumed data.dir=data_cache/gpu \
  tracking.mlflow=false --resume /tmp/runs/tiny/checkpoints/step_00000160 2>&1 | tail -3 | tee -a "$out/checkpoint.log"
python3 -m pretrain.cli train configs/tiny.yaml --run-dir /tmp/runs/tiny_async data.dir=data_cache/gpu \
  tracking.mlflow=false train.steps=40 train.checkpoint_every=20 train.async_checkpoint=true 2>&1 | tail -2 \
  | tee -a "$out/checkpoint.log"
python3 -m pretrain.cli train configs/tiny.yaml --run-dir /tmp/runs/tiny_async_resumed data.dir=data_cache/gpu \
  tracking.mlflow=false train.steps=40 train.checkpoint_every=20 --resume /tmp/runs/tiny_async/checkpoints/step_00000020 \
  2>&1 | tail -2 | tee -a "$out/checkpoint.log"
python3 - "$out" <<'PY' | tee -a "$out/checkpoint.log"
import json, sys
runs = {name: json.load(open(f"/tmp/runs/{name}/summary.json")) for name in
        ("tiny", "tiny_resumed", "tiny_async", "tiny_async_resumed")}
for a, b in (("tiny", "tiny_resumed"), ("tiny_async", "tiny_async_resumed")):
    print(f"{b}: final train loss {runs[b]['final_train_loss']:.4f} vs uninterrupted {runs[a]['final_train_loss']:.4f}")
PY
python3 -m tools.bench_gpu --from-json "$out/bench_gpu.json" --json "$out/bench_gpu.json" \
  --add-run "configs/tiny.yaml=$out/summary_tiny.json" --add-run "configs/tiny_moe.yaml=$out/summary_tiny_moe.json" \
  | tail -8
