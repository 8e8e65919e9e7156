"""GPU throughput and memory of the toolkit vs hand-written PyTorch, side by side (benchmarks/gpu_check.sh).

Sections (each appends its rows to ``--results``; ``summary`` prints every table with ratios):

- ``train``: training images/s and peak memory, ``ImageClassifier`` + ``Trainer.fit`` vs a minimal
  loop (same weights, batches, precision, memory format, cudnn setting, AdamW), for fp32,
  bf16-mixed, + channels_last, + cudnn.benchmark; ``--compile`` adds ``torch.compile`` to both.
  Batches are uint8 tensors already on the device, so the data pipeline is out of the picture.
- ``extract``: feature-extraction images/s, the cache's ``FeatureExtractor`` vs a minimal
  ``inference_mode`` loop, and the whole ``extract()`` path (decode, resize, collate, copy, cache
  write) on real Fashion-MNIST images.
- ``pipeline``: images/s the DataLoader delivers at the default worker count with the training
  transform: in-memory uint8 arrays, and folders of PNG and JPEG files.

Throughput is measured over the whole timed span with the device synchronised at both ends.

    python benchmarks/gpu.py train|extract|pipeline|summary [--image-size 224] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vision_transfer.data.dataset import ImageDataset
from vision_transfer.data.sources import Samples, SourceSplits, read_fashion_mnist
from vision_transfer.data.transforms import create_train_transform, decode_side
from vision_transfer.features.extract import FeatureExtractor, extract
from vision_transfer.tasks import ImageClassifier

BACKBONE = "tf_efficientnet_lite0"
CLASSES = [str(i) for i in range(10)]


@dataclass(frozen=True)
class Setting:
    name: str
    precision: str = "32-true"
    channels_last: bool = False
    benchmark: bool = False
    compile: bool = False
    stop_on_nan: bool = True


TRAIN_SETTINGS = [
    Setting("fp32"),
    Setting("bf16-mixed", "bf16-mixed"),
    Setting("bf16-mixed + channels_last", "bf16-mixed", channels_last=True),
    Setting("bf16-mixed + channels_last + cudnn.benchmark", "bf16-mixed", channels_last=True, benchmark=True),
    Setting(
        "bf16-mixed + channels_last + cudnn.benchmark, stop_on_nan off",
        "bf16-mixed",
        channels_last=True,
        benchmark=True,
        stop_on_nan=False,
    ),
]
COMPILE_SETTING = Setting("bf16-mixed + channels_last + cudnn.benchmark + compile", "bf16-mixed", True, True, True)
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "bf16": torch.bfloat16, "16": torch.float16}


def device(args: argparse.Namespace) -> torch.device:
    return torch.device("cuda" if args.device == "gpu" else "cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def reset_memory(dev: torch.device) -> int:
    if dev.type != "cuda":
        return 0
    sync(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_gib(dev: torch.device, base: int) -> float | None:
    return (torch.cuda.max_memory_allocated() - base) / 2**30 if dev.type == "cuda" else None


def synthetic_batches(args: argparse.Namespace, count: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 image batches and labels, already on the device."""
    torch.manual_seed(0)
    dev, size = device(args), args.image_size
    return [
        (
            torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, device=dev),
            torch.randint(0, len(CLASSES), (batch_size,), device=dev),
        )
        for _ in range(count)
    ]


class Batches(Dataset):
    """Pre-made batches served as they are (``DataLoader(batch_size=None)``)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches[index]


class SpanTimer(pl.Callback):
    """Synchronised timestamps: before the first timed batch and after the last one."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = warmup, total
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.global_step == self.warmup:
            sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.global_step == self.total:
            sync(pl_module.device)
            self.end = time.perf_counter()


def toolkit_train(batches: list, setting: Setting, args: argparse.Namespace) -> dict[str, Any]:
    dev = device(args)
    base = reset_memory(dev)
    torch.manual_seed(0)
    model = ImageClassifier(
        BACKBONE, weights="packaged", image_size=args.image_size, class_names=CLASSES,
        channels_last=setting.channels_last, compile=setting.compile, stop_on_nan=setting.stop_on_nan,
    )  # fmt: skip
    timer = SpanTimer(args.warmup, len(batches))
    trainer = pl.Trainer(
        max_steps=len(batches), accelerator=args.device, devices=1, precision=setting.precision,
        benchmark=setting.benchmark, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=DataLoader(Batches(batches), batch_size=None))
    images = len(batches[0][0]) * (len(batches) - args.warmup)
    return {"images_per_s": images / (timer.end - timer.start), "peak_gib": peak_gib(dev, base)}


def loop_train(batches: list, setting: Setting, args: argparse.Namespace) -> dict[str, Any]:
    dev = device(args)
    base = reset_memory(dev)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = setting.benchmark
    reference = ImageClassifier(BACKBONE, weights="packaged", image_size=args.image_size, class_names=CLASSES)
    backbone, head = reference.backbone, reference.head
    memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
    net = nn.Sequential(backbone, head).to(dev).train().to(memory_format=memory_format)  # type: ignore[call-overload]
    if setting.compile:
        backbone.compile()
    mean, std = reference.normalize.mean.to(dev), reference.normalize.std.to(dev)  # x 255: for uint8 input
    # fused on CUDA, as the toolkit's: the comparison measures the toolkit's overhead, not the optimizer kernel
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01, fused=dev.type == "cuda" or None)
    dtype = AUTOCAST.get(setting.precision)
    start = 0.0
    for step, (images, labels) in enumerate(batches):
        if step == args.warmup:
            sync(dev)
            start = time.perf_counter()
        x = ((images.float() - mean) / std).contiguous(memory_format=memory_format)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(net(x), labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(dev)
    images_count = len(batches[0][0]) * (len(batches) - args.warmup)
    return {"images_per_s": images_count / (time.perf_counter() - start), "peak_gib": peak_gib(dev, base)}


def section_train(args: argparse.Namespace) -> list[dict[str, Any]]:
    batches = synthetic_batches(args, args.warmup + args.steps, args.batch_size)
    rows = []
    for setting in [COMPILE_SETTING] if args.compile else TRAIN_SETTINGS:
        loop = loop_train(batches, setting, args)
        ours = toolkit_train(batches, setting, args)
        row = {"section": "train", "setting": setting.name, "toolkit": ours, "loop": loop}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def rate(fn: Callable[[torch.Tensor], Any], batches: list[torch.Tensor], dev: torch.device, warmup: int) -> float:
    for images in batches[:warmup]:
        fn(images)
    sync(dev)
    start = time.perf_counter()
    for images in batches[warmup:]:
        fn(images)
    sync(dev)
    return sum(len(b) for b in batches[warmup:]) / (time.perf_counter() - start)


def minimal_extractor(backbone: nn.Module, normalize: nn.Module, dtype: torch.dtype | None) -> Callable:
    """The shortest correct extraction: normalise, channels_last, autocast, forward."""
    dev = next(backbone.parameters()).device
    mean, std = normalize.mean.to(dev), normalize.std.to(dev)  # type: ignore[union-attr,operator]  # x 255

    @torch.inference_mode()
    def minimal(images: torch.Tensor) -> torch.Tensor:
        x = ((images.float() - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            return backbone(x)

    return minimal


def section_extract(args: argparse.Namespace) -> list[dict[str, Any]]:
    dev = device(args)
    batches = [b for b, _ in synthetic_batches(args, args.warmup + args.steps, args.extract_batch_size)]
    rows = []
    settings = (
        [("bf16", True, True)]
        if args.compile
        else [("32", False, False), ("bf16", False, False), ("bf16", True, False)]
    )
    for precision, benchmark, compile_ in settings:
        torch.backends.cudnn.benchmark = benchmark
        model = ImageClassifier(BACKBONE, weights="packaged", image_size=args.image_size, class_names=CLASSES)
        base = reset_memory(dev)
        ours = FeatureExtractor(model.backbone, model.data_config, dev, precision, compile=compile_)
        ours_rate = rate(ours, batches, dev, args.warmup)
        ours_peak = peak_gib(dev, base)
        minimal_model = ImageClassifier(BACKBONE, weights="packaged", image_size=args.image_size, class_names=CLASSES)
        backbone = minimal_model.backbone.eval().to(dev).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if compile_:
            backbone.compile()
        minimal = minimal_extractor(backbone, minimal_model.normalize, AUTOCAST.get(precision))
        base = reset_memory(dev)
        minimal_rate = rate(minimal, batches, dev, args.warmup)
        name = f"{precision} + channels_last" + (" + cudnn.benchmark" if benchmark else "")
        name += " + compile" if compile_ else ""
        row = {
            "section": "extract",
            "setting": name,
            "toolkit": {"images_per_s": ours_rate, "peak_gib": ours_peak},
            "loop": {"images_per_s": minimal_rate, "peak_gib": peak_gib(dev, base)},
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    if not args.compile:
        rows.append(whole_extract(args))
    return rows


def fashion_mnist(args: argparse.Namespace, split: str, count: int) -> Samples:
    samples = read_fashion_mnist(args.fashion_mnist).splits[split]
    return samples.take(np.arange(min(count, len(samples))))


def whole_extract(args: argparse.Namespace) -> dict[str, Any]:
    """``extract()`` end to end (DataLoader with the eval transform, autocast, fp16 shards) on real images."""
    torch.backends.cudnn.benchmark = False
    samples = fashion_mnist(args, "test", args.extract_images)
    workers = min(8, os.cpu_count() or 1)  # the datamodules' default
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        _, extractor = extract(
            BACKBONE, "packaged", {"test": samples}, image_size=args.image_size, cache_root=cache,
            batch_size=args.extract_batch_size, num_workers=workers, device=str(device(args)), progress=False,
        )  # fmt: skip
        seconds = time.perf_counter() - start
    row = {
        "section": "extract_whole",
        "setting": f"extract() on {len(samples)} Fashion-MNIST images, {workers} workers, "
        f"precision {extractor.precision if extractor else '?'}",
        "toolkit": {"images_per_s": len(samples) / seconds, "seconds": seconds},
    }
    print(json.dumps(row), flush=True)
    return row


def write_files(args: argparse.Namespace, folder: Path, suffix: str, count: int) -> list[str]:
    """Fashion-MNIST images scaled to ``--file-size`` px RGB and saved as PNG or JPEG (quality 90)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    samples = fashion_mnist(args, "train", count)
    folder.mkdir(parents=True, exist_ok=True)

    def save(i: int) -> str:
        image = Image.fromarray(np.asarray(samples.items[i])).convert("RGB")
        image = image.resize((args.file_size, args.file_size), Image.Resampling.BICUBIC)
        path = folder / f"{i:05d}{suffix}"
        image.save(path, quality=90) if suffix == ".jpg" else image.save(path)
        return str(path)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        return list(pool.map(save, range(len(samples))))


def loader_rate(samples: Samples, args: argparse.Namespace, decode: str = "full", loader: Any = None) -> float:
    """Training-transform img/s of a loader's epoch after its first batch (default: the map-style folder loader)."""
    if loader is None:
        model = ImageClassifier(BACKBONE, weights="packaged", image_size=args.image_size, class_names=CLASSES)
        side = decode_side(model.data_config, 0.35)
        dataset = ImageDataset(samples, create_train_transform(model.data_config), min_side=side, decode=decode)  # type: ignore[arg-type]
        workers = min(8, os.cpu_count() or 1)  # the datamodules' default
        loader = DataLoader(
            dataset, batch_size=args.batch_size, num_workers=workers, shuffle=True,
            pin_memory=args.device == "gpu", persistent_workers=True,
        )  # fmt: skip
    iterator = iter(loader)
    next(iterator)  # workers started
    start, count = time.perf_counter(), 0
    for images, _ in iterator:
        count += len(images)
    return count / (time.perf_counter() - start)


def prepared_rate(files: Samples, args: argparse.Namespace, folder: Path) -> float:
    """The JPEG files prepared as litdata chunks at short side 256, streamed by PreparedDataModule's train loader."""
    from vision_transfer.backbones import preprocessing
    from vision_transfer.data.prepared import prepare
    from vision_transfer.datamodules import PreparedDataModule

    workers = min(8, os.cpu_count() or 1)
    prepare(SourceSplits(CLASSES, {"train": files}), str(folder), short_side=256, num_workers=workers)
    config = preprocessing(BACKBONE, "packaged", args.image_size)
    data = PreparedDataModule(
        str(folder), data_config=config, batch_size=args.batch_size, num_workers=workers, decode="fast",
        val_fraction=0.0, test_fraction=0.0,
    )  # fmt: skip
    data.setup("fit")
    return loader_rate(files, args, loader=data.train_dataloader())


def section_pipeline(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    count = args.batch_size * args.pipeline_batches
    samples = fashion_mnist(args, "train", count)
    rows.append({"setting": "in-memory uint8 (Fashion-MNIST 28 px arrays)", "images_per_s": loader_rate(samples, args)})
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in (".png", ".jpg"):
            paths = write_files(args, Path(tmp) / suffix[1:], suffix, count)
            files = Samples(paths, samples.labels[: len(paths)], paths)
            name = f"{suffix[1:].upper()} files ({args.file_size} px RGB, decoded with PIL)"
            rows.append({"setting": name, "images_per_s": loader_rate(files, args)})
        try:  # the [fast] and [stream] extras: carried as wheels (see gpu_check.sh)
            import litdata  # noqa: F401
            import simplejpeg  # noqa: F401
        except ImportError as e:
            print(json.dumps({"section": "pipeline", "skipped": f"decode=fast / prepared chunks: {e}"}), flush=True)
        else:
            name = f"JPEG files ({args.file_size} px RGB, decode=fast: simplejpeg)"
            rows.append({"setting": name, "images_per_s": loader_rate(files, args, decode="fast")})
            rows.append({"setting": "prepared chunks (litdata, local, short side 256), decode=fast",
                         "images_per_s": prepared_rate(files, args, Path(tmp) / "prepared")})  # fmt: skip
    workers = min(8, os.cpu_count() or 1)
    for row in rows:
        row |= {"section": "pipeline", "workers": workers}
        print(json.dumps(row), flush=True)
    return rows


def summary(rows: list[dict[str, Any]]) -> str:
    def fmt(value: float | None, spec: str = ".0f") -> str:
        return "" if value is None else format(value, spec)

    lines = []
    for section, title in (("train", "Training"), ("extract", "Feature extraction (device-resident uint8 batches)")):
        picked = [r for r in rows if r["section"] == section]
        if not picked:
            continue
        lines += [
            f"\n{title}",
            "| setting | vision-transfer img/s | hand-written img/s | ratio | peak GiB (ours / loop) |",
        ]
        lines.append("| --- | --- | --- | --- | --- |")
        for r in picked:
            ours, loop = r["toolkit"], r["loop"]
            lines.append(
                f"| {r['setting']} | {fmt(ours['images_per_s'])} | {fmt(loop['images_per_s'])} | "
                f"{ours['images_per_s'] / loop['images_per_s']:.3f} | "
                f"{fmt(ours.get('peak_gib'), '.2f')} / {fmt(loop.get('peak_gib'), '.2f')} |"
            )
    train = [r for r in rows if r["section"] == "train"]
    fp32 = next((r["toolkit"]["images_per_s"] for r in train if r["setting"] == "fp32"), None)
    if fp32:
        lines.append("\nvs fp32 (toolkit): " + ", ".join(
            f"{r['setting']} {r['toolkit']['images_per_s'] / fp32:.2f}x" for r in train
        ))  # fmt: skip
    for r in rows:
        if r["section"] == "extract_whole":
            lines.append(
                f"\n{r['setting']}: {r['toolkit']['images_per_s']:.0f} img/s ({r['toolkit']['seconds']:.1f} s)"
            )
    pipeline = [r for r in rows if r["section"] == "pipeline"]
    if pipeline:
        consumed = max((r["toolkit"]["images_per_s"] for r in train), default=None)
        lines += ["\nData pipeline (training transform, default workers)", "| source | img/s | vs fastest training |"]
        lines.append("| --- | --- | --- |")
        for r in pipeline:
            ratio = f"{r['images_per_s'] / consumed:.2f}" if consumed else ""
            lines.append(f"| {r['setting']}, {r['workers']} workers | {r['images_per_s']:.0f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=["train", "extract", "pipeline", "summary"], nargs="?", default="summary")
    parser.add_argument("--device", default="gpu", choices=["cpu", "gpu"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--extract-batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30, help="timed steps (batches)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (compile happens here)")
    parser.add_argument("--compile", action="store_true", help="train/extract: the torch.compile rows only")
    parser.add_argument("--extract-images", type=int, default=10000, help="images for the whole extract() row")
    parser.add_argument("--pipeline-batches", type=int, default=16)
    parser.add_argument("--file-size", type=int, default=400, help="side of the PNG/JPEG files written")
    parser.add_argument("--fashion-mnist", default=None, help="folder of the IDX files (default: Debian's)")
    parser.add_argument("--results", default="gpu_results.json")
    args = parser.parse_args()
    path = Path(args.results)
    rows = json.loads(path.read_text()) if path.is_file() else []
    if args.section == "summary":
        print(summary(rows))
        return
    sections = {"train": section_train, "extract": section_extract, "pipeline": section_pipeline}
    rows += sections[args.section](args)
    path.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
