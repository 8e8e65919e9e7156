#!/usr/bin/env bash
# The project's GPU check, for a lent GPU machine (torch, timm, Lightning, torchmetrics present;
# no registry). Prepare here:  mkdir -p .whl && cp ../shared/gpu-wheels/*.whl .whl/
# then run it there, carrying .whl:  bash benchmarks/gpu_check.sh  (about 5 minutes)
# Paste its output into benchmarks/RESULTS.md with the date and the device name.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH="$PWD:/tmp/site"
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm, pytorch_lightning as pl; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', pl.__version__)"
echo "== gpu tests"
timeout 120 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
for precision in 32-true bf16-mixed; do
  echo "== toolkit vs hand-written loop, 224 px, batch 256, $precision"
  timeout 100 python3 benchmarks/speed.py --device gpu --image-size 224 --batch-size 256 --steps 10 --warmup 3 \
    --workers 8 --repeats 2 --precision "$precision"
done
echo "== options (fp32, bf16-mixed, + channels_last, + compile, checkpointing, accumulation, EMA; peak memory)"
timeout 200 python3 benchmarks/options.py --device gpu --image-size 224 --batch-size 256 --steps 10 --warmup 5 \
  --workers 8 --only fp32 bf16-mixed "bf16-mixed + channels_last" "bf16-mixed + channels_last + compile" \
  grad_checkpointing "accumulate_grad_batches=2" "EMA (decay 0.999)"
