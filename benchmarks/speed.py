"""Overhead of the toolkit vs hand-written PyTorch, measured side by side in one process.

1. training images/s: ``ImageClassifier`` + ``Trainer.fit`` vs a minimal loop (same model, data,
   batch, resolution, precision, AdamW), after warm-up steps;
2. extraction images/s: the cache's ``FeatureExtractor`` vs a minimal ``inference_mode`` loop over
   the same uint8 tensors;
3. the data pipeline (decode + augment, default workers) vs the model's training throughput.

    python benchmarks/speed.py [--image-size 64] [--batch-size 64] [--steps 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from vision_transfer.data.dataset import ImageDataset
from vision_transfer.data.transforms import create_train_transform
from vision_transfer.datamodules import FashionMNISTDataModule
from vision_transfer.features.extract import FeatureExtractor
from vision_transfer.tasks import ImageClassifier

BACKBONE = "tf_efficientnet_lite0"
CLASSES = [str(i) for i in range(10)]


class StepTimer(pl.Callback):
    """Timestamps at the start of each training batch (one extra at the end of training)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.stamps: list[float] = []
        self.batch_size = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.stamps.append(time.perf_counter())
        self.batch_size = len(batch[0])

    def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        self.stamps.append(time.perf_counter())

    def rate(self) -> tuple[float, float]:
        return rates(self.stamps[self.warmup :], self.batch_size)


def rates(stamps: list[float], batch_size: int) -> tuple[float, float]:
    """(images/s over the whole timed span, images/s of the median step).

    The median step is robust to the bursts of other work on a shared machine; the span is what a
    user waits. Both sides of every comparison are measured the same way.
    """
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    return batch_size * len(steps) / (stamps[-1] - stamps[0]), batch_size / statistics.median(steps)


def train_data(args: argparse.Namespace) -> ImageDataset:
    data = FashionMNISTDataModule(max_train_samples=args.batch_size * (args.steps + args.warmup) + 1)
    splits = data.prepare_splits()
    model = ImageClassifier(BACKBONE, weights="packaged", image_size=args.image_size, class_names=data.class_names)
    return ImageDataset(splits["train"], create_train_transform(model.data_config))


def loader(dataset: ImageDataset, args: argparse.Namespace) -> DataLoader:
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True)


def toolkit_fit(
    dataset: ImageDataset,
    args: argparse.Namespace,
    model_options: dict[str, Any] | None = None,
    trainer_options: dict[str, Any] | None = None,
) -> tuple[tuple[float, float], ImageClassifier]:
    """``Trainer.fit`` of ``ImageClassifier``: (span, median-step) images/s and the trained model."""
    torch.manual_seed(0)
    model = ImageClassifier(
        BACKBONE, weights="packaged", image_size=args.image_size, class_names=[str(i) for i in range(10)],
        **(model_options or {}),
    )  # fmt: skip
    options = {"callbacks": [], **(trainer_options or {})}
    if "precision" not in options:  # options.py passes its own; speed.py's command line has one
        options["precision"] = args.precision
    timer = StepTimer(args.warmup)
    trainer = pl.Trainer(
        max_steps=args.steps + args.warmup, accelerator=args.device, devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        **{**options, "callbacks": [timer, *options["callbacks"]]},
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=loader(dataset, args))
    return timer.rate(), model


def hand_written_fit(dataset: ImageDataset, args: argparse.Namespace) -> tuple[float, float]:
    torch.manual_seed(0)
    device = torch.device(args.device if args.device != "gpu" else "cuda")
    model = ImageClassifier(
        BACKBONE, weights="packaged", image_size=args.image_size, class_names=[str(i) for i in range(10)]
    )
    net = torch.nn.Sequential(model.backbone, model.head).to(device).train()
    mean, std = model.normalize.mean.to(device), model.normalize.std.to(device)  # x 255: for uint8 input
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    stamps: list[float] = []
    for step, (images, labels) in enumerate(loader(dataset, args)):
        if step == args.warmup + args.steps:
            break
        stamps.append(time.perf_counter())
        images, labels = images.to(device), labels.to(device)
        x = (images.float() - mean) / std
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(net(x), labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    stamps.append(time.perf_counter())  # the end of the last step, as StepTimer's on_train_end
    return rates(stamps[args.warmup :], args.batch_size)


def extraction(args: argparse.Namespace) -> tuple[float, float]:
    device = torch.device(args.device if args.device != "gpu" else "cuda")
    model = ImageClassifier(BACKBONE, weights="packaged", image_size=args.image_size, class_names=["a", "b"])
    batches = [torch.randint(0, 256, (args.batch_size * 4, 3, args.image_size, args.image_size), dtype=torch.uint8)
               for _ in range(max(2, args.steps // 4))]  # fmt: skip
    precision = {"bf16-mixed": "bf16", "16-mixed": "16"}.get(args.precision, "32")
    ours = FeatureExtractor(model.backbone, model.data_config, device, precision)
    mean, std = model.normalize.mean.to(device), model.normalize.std.to(device)
    backbone = model.backbone.to(device).eval()

    @torch.inference_mode()
    def minimal(images: torch.Tensor) -> torch.Tensor:
        x = (images.to(device).float() - mean) / std
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return backbone(x)

    def rate(fn) -> float:  # type: ignore[no-untyped-def]
        fn(batches[0])  # warm-up
        start = time.perf_counter()
        for b in batches:
            fn(b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return sum(len(b) for b in batches) / (time.perf_counter() - start)

    minimal_rates, ours_rates = [], []
    for _ in range(args.repeats):  # alternate, keep the best of each
        minimal_rates.append(rate(minimal))
        ours_rates.append(rate(ours))
    return max(ours_rates), max(minimal_rates)


def pipeline(args: argparse.Namespace) -> float:
    """Decode + augment images/s at 224 px through the DataLoader with the default worker count."""
    data = FashionMNISTDataModule(max_train_samples=args.batch_size * 8)
    splits = data.prepare_splits()
    model = ImageClassifier(BACKBONE, weights="packaged", class_names=["a", "b"])
    dataset = ImageDataset(splits["train"], create_train_transform(model.data_config))
    workers = data.num_workers
    batches = DataLoader(dataset, batch_size=args.batch_size, num_workers=workers, persistent_workers=workers > 0)
    iterator = iter(batches)
    next(iterator)
    start, count = time.perf_counter(), 0
    for images, _ in iterator:
        count += len(images)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per side; the best counts")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"])
    args = parser.parse_args()
    dataset = train_data(args)
    loop_runs, ours_runs = [], []
    for _ in range(args.repeats):  # alternate, keep the best of each: the machine is shared and noisy
        loop_runs.append(hand_written_fit(dataset, args))
        ours_runs.append(toolkit_fit(dataset, args)[0])
    loop_span, loop_median = (max(r[i] for r in loop_runs) for i in (0, 1))
    ours_span, ours_median = (max(r[i] for r in ours_runs) for i in (0, 1))
    ext_ours, ext_minimal = extraction(args)
    print(f"\n{BACKBONE}, {args.image_size} px, batch {args.batch_size}, {args.precision}, {args.device}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs")  # fmt: skip
    print("| measurement | vision-transfer | hand-written | ratio |\n| --- | --- | --- | --- |")
    print(
        f"| training images/s, median step | {ours_median:.1f} | {loop_median:.1f} | {ours_median / loop_median:.3f} |"
    )
    print(f"| training images/s, whole span | {ours_span:.1f} | {loop_span:.1f} | {ours_span / loop_span:.3f} |")
    print(f"| extraction images/s | {ext_ours:.1f} | {ext_minimal:.1f} | {ext_ours / ext_minimal:.3f} |")
    if args.device == "cpu":
        print(f"| data pipeline at 224 px, default workers (images/s) | {pipeline(args):.1f} | | |")


if __name__ == "__main__":
    main()
