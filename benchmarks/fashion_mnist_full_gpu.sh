#!/usr/bin/env bash
# Fashion-MNIST in full (configs/fashion_mnist_full.yaml) on a lent GPU, several recipes at once
# (they share the GPU, so each wall time is an upper bound of a run alone). Prepared like
# gpu_check.sh (.whl and .gpu carried). The run folders and logs (no checkpoints) come back as
# $OUT/fashion_mnist_full_runs.tar.gz. MAX_TIME (Lightning's DD:HH:MM:SS) stops a recipe that would
# outrun the lease; it then tests what it has, and its log says so.
# Usage: bash benchmarks/fashion_mnist_full_gpu.sh   [ROUND=1|2 MAX_TIME=00:00:04:00 WORKERS=5 EXTRA="..."]
set -uo pipefail
cd "$(dirname "$0")/.."
out=/tmp/fashion_mnist_full
mkdir -p "$out"
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
fashion="${FASHION_MNIST:-.gpu/fashion-mnist}"
[ -d "$fashion" ] || fashion=/usr/share/datasets/fashion-mnist
# The carried copy may be a subset (gpu_check.sh needs only 20,000): a "full" result needs all 60,000.
count=$(python3 -c "import gzip, struct, sys; print(struct.unpack('>4I', gzip.open(sys.argv[1]).read(16))[1])" \
  "$fashion/train-images-idx3-ubyte.gz")
if [ "$count" != 60000 ] && [ "${ALLOW_SUBSET:-0}" != 1 ]; then
  echo "$fashion/train-images-idx3-ubyte.gz holds $count training images, not 60,000: carry the full" \
    "files (cp /usr/share/datasets/fashion-mnist/*.gz .gpu/fashion-mnist/), or set ALLOW_SUBSET=1" \
    "and report the result as a $count-image subset." >&2
  exit 2
fi
echo "training images in $fashion: $count"
declare -A recipes
if [ "${ROUND:-1}" = 1 ]; then  # the config's 12 epochs: resolution, and stronger augmentation + EMA
  recipes=(
    [config_64px]=""
    [96px]="--model.image_size 96"
    [96px_medium_ema]="--model.image_size 96 --data.init_args.augment medium --model.ema_decay 0.999"
  )
else  # round 1 underfit (train accuracy under augmentation ~ val accuracy): gentler crops, 20 epochs
  recipes=(
    [64px_20ep_crop75]="--trainer.max_epochs 20 --data.init_args.scale_min 0.75"
    [96px_20ep_crop75]="--trainer.max_epochs 20 --data.init_args.scale_min 0.75 --model.image_size 96"
    [128px_20ep_crop75]="--trainer.max_epochs 20 --data.init_args.scale_min 0.75 --model.image_size 128"
  )
fi
for name in "${!recipes[@]}"; do
  # shellcheck disable=SC2086
  ( SECONDS=0
    python3 -m vision_transfer.cli fit --config configs/fashion_mnist_full.yaml \
      --trainer.accelerator "${ACCELERATOR:-gpu}" --trainer.max_time "${MAX_TIME:-00:00:04:00}" \
      --trainer.enable_progress_bar false --trainer.logger.init_args.save_dir "$out" \
      --trainer.logger.init_args.name "$name" --data.init_args.root "$fashion" \
      --data.init_args.num_workers "${WORKERS:-5}" --model.tta flip ${recipes[$name]} ${EXTRA:-} \
      > "$out/$name.log" 2>&1
    echo "$name: exit $?, wall ${SECONDS} s" | tee -a "$out/$name.log" ) &
done
wait
for name in "${!recipes[@]}"; do
  echo "== $name"; grep -E "test/|^epoch|rror|max_time|wall|temperature|ECE" "$out/$name.log" | tail -30
done
tar czf "${OUT:-/tmp}/fashion_mnist_full_runs.tar.gz" --exclude=checkpoints -C "$out" .
