"""Full fine-tune vs gradual unfreezing vs LP-FT (and a linear probe) at equal epochs and seeds.

Packaged ImageNet tf_efficientnet_lite0 on a Fashion-MNIST subset; prints a Markdown table.

    python benchmarks/unfreezing.py [--train 2000] [--epochs 4] [--image-size 64] [--seeds 0]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch

from vision_transfer.backbones import preprocessing
from vision_transfer.datamodules import FashionMNISTDataModule
from vision_transfer.tasks import ImageClassifier

COMMON: dict[str, Any] = {"lr": 2e-3, "head_lr": 4e-3, "layer_decay": 0.8, "warmup_epochs": 0.3, "weight_decay": 0.01}


def modes(steps_per_epoch: int, epochs: int) -> dict[str, dict[str, Any]]:
    # gradual: one more stage group every `every` steps, so all 8 groups train by mid-run
    every = max(1, steps_per_epoch * epochs // 16)
    return {
        "full": {"mode": "full"},
        "gradual": {"mode": "gradual", "milestone_unit": "step", "unfreeze_every": every, "rewarm": True},
        "lp_ft": {"mode": "lp_ft", "lp_epochs": 1},
        "linear_probe": {"mode": "linear_probe", "lr": 1e-2, "head_lr": 1e-2, "weight_decay": 0.0},
    }


def run(options: dict[str, Any], args: argparse.Namespace, seed: int) -> dict[str, float]:
    pl.seed_everything(seed, verbose=False)
    data = FashionMNISTDataModule(
        batch_size=args.batch_size,
        num_workers=0,
        max_train_samples=args.train,
        max_val_samples=args.val,
        max_test_samples=args.test,
        split_seed=seed,
        data_config=preprocessing("tf_efficientnet_lite0", "packaged", args.image_size),
    )
    model = ImageClassifier.for_data(
        data, backbone="tf_efficientnet_lite0", weights="packaged", image_size=args.image_size, **{**COMMON, **options}
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    metrics = trainer.test(model, data, verbose=False)[0]
    return {"acc": metrics["test/acc"], "f1": metrics["test/f1_macro"], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    steps = args.train // args.batch_size
    rows = []
    for name, options in modes(steps, args.epochs).items():
        results = [run(options, args, seed) for seed in args.seeds]
        mean = {k: statistics.mean(r[k] for r in results) for k in results[0]}
        rows.append((name, mean))
        print(f"{name}: {mean}", flush=True)
    print(
        f"\ntf_efficientnet_lite0 (packaged ImageNet weights), Fashion-MNIST {args.train} train / {args.test} test, "
        f"{args.image_size} px, {args.epochs} epochs, batch {args.batch_size}, seeds {args.seeds}; "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads\n"
    )
    print("| mode | test top-1 | test macro F1 | fit time (s) |\n| --- | --- | --- | --- |")
    for name, mean in rows:
        print(f"| {name} | {mean['acc']:.4f} | {mean['f1']:.4f} | {mean['seconds']:.0f} |")


if __name__ == "__main__":
    main()
