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
for precision in 32-true bf16-mixed 16-mixed; do
  echo "== speed, 224 px, batch 256, $precision"
  timeout 150 python3 benchmarks/speed.py --device gpu --image-size 224 --batch-size 256 --steps 10 --warmup 3 \
    --workers 8 --precision "$precision"
done
