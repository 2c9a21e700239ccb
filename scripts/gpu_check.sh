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
python3 -m tools.bench_gpu --from-json "$out/bench_gpu.json" --json "$out/bench_gpu.json" \
  --add-run "configs/tiny.yaml=$out/summary_tiny.json" --add-run "configs/tiny_moe.yaml=$out/summary_tiny_moe.json" \
  | tail -8
