#!/usr/bin/env bash
# Install the dev extras, then lint, type-check and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/ruff check vision_transfer tests benchmarks
.venv/bin/ruff format --check vision_transfer tests benchmarks
.venv/bin/mypy
.venv/bin/python -m pytest -n 2 --dist loadgroup --durations=30 "$@"
