"""Data pipeline throughput, side by side in one run: today's folder loader (PIL, full decode), reduced-size
JPEG decoding, simplejpeg, prepared litdata chunks (local), and timm's own loader on the same folder.

    python benchmarks/data_speed.py [--images 480] [--image-size 224] [--short-side 256] [--workers 2]

The JPEGs are real photos (scikit-image's), random crops resized to 400-500 px, quality 90. Each row
runs the datamodule users run (``ImageFolderDataModule`` / ``PreparedDataModule``) for one epoch, after
one warm-up epoch: img/s with the loader in this process (one worker's throughput) and with
``--workers`` worker processes, for the training transform and for the eval transform (augment off).
Prints a Markdown table with the ratio to today's loader; writes results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vision_transfer.data.images as image_module
import vision_transfer.data.sources as source_module
from vision_transfer.backbones import preprocessing
from vision_transfer.data.prepared import prepare
from vision_transfer.data.sources import SourceSplits
from vision_transfer.datamodules import ImageFolderDataModule, PreparedDataModule

BACKBONE = "tf_efficientnet_lite0"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "retina", "immunohistochemistry", "hubble_deep_field", "cat")


def write_photos(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` JPEGs (quality 90) of 400-500 px: random crops of real photos, in class folders by photo."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]
    for i in range(count):
        c = i % len(photos)
        photo = photos[c]
        side = int(min(photo.size) * rng.uniform(0.5, 1.0))
        left, top = rng.integers(0, photo.width - side + 1), rng.integers(0, photo.height - side + 1)
        width, height = int(rng.integers(400, 501)), int(rng.integers(400, 501))
        crop = photo.crop((left, top, left + side, top + side)).resize((width, height), Image.Resampling.BICUBIC)
        (folder / PHOTOS[c]).mkdir(parents=True, exist_ok=True)
        crop.save(folder / PHOTOS[c] / f"{i:05d}.jpg", quality=90)


def rate(make_loader: Callable[[], Iterable[Any]], images: int) -> float:
    """img/s of a loader's second epoch (the first warms caches, workers and imports)."""
    loader = make_loader()
    for _ in loader:
        pass
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += len(batch[0])
    assert seen >= images * 0.8, (seen, images)  # drop_last may leave out a partial batch
    return seen / (time.perf_counter() - start)


def timm_loader(folder: Path, size: int, train: bool, workers: int, batch: int) -> Any:
    """timm's own dataset and transform (what train.py builds) on the same folder."""
    import timm.data
    from torch.utils.data import DataLoader

    dataset = timm.data.create_dataset("", root=str(folder))
    config = timm.data.resolve_data_config({}, model=timm.create_model(BACKBONE, pretrained=False))
    dataset.transform = timm.data.create_transform(
        (3, size, size), is_training=train, interpolation=config["interpolation"], crop_pct=config["crop_pct"],
        mean=config["mean"], std=config["std"],
    )  # fmt: skip
    return DataLoader(
        dataset, batch_size=batch, shuffle=train, num_workers=workers, drop_last=train, persistent_workers=workers > 0
    )


def legacy_load_image(path: Any, **_: Any) -> np.ndarray:
    """``load_image`` before decode options (commit 7fe2e77): a copy from ``exif_transpose`` and from ``convert``."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image) or image
        return np.asarray(image.convert("RGB"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--short-side", type=int, default=256, help="prepare's pre-resize of the chunks")
    parser.add_argument("--workers", type=int, default=2, help="the pooled columns' workers; 0 or 1: leave them out")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", default="benchmarks/results/data_speed")
    args = parser.parse_args(argv)
    import simplejpeg  # noqa: F401  (the fast row needs the [fast] extra)

    config = preprocessing(BACKBONE, "none", args.image_size)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder, chunks = Path(tmp) / "photos", Path(tmp) / "prepared"
        write_photos(folder, args.images)
        common = {"val_fraction": 0.0, "test_fraction": 0.0, "data_config": config, "batch_size": args.batch_size}
        source = ImageFolderDataModule(str(folder), **common)
        start = time.perf_counter()
        prepare_workers = max(1, args.workers)
        prepare(SourceSplits(source.class_names, source.prepare_splits()), str(chunks), short_side=args.short_side,
                num_workers=prepare_workers)  # fmt: skip
        prepare_s = time.perf_counter() - start

        def ours(kind: str, decode: str, legacy: bool = False) -> Callable[[bool, int], Any]:
            def make(train: bool, workers: int) -> Any:
                source_module.load_image = legacy_load_image if legacy else image_module.load_image  # workers fork it
                options = {**common, "decode": decode, "augment": train, "num_workers": workers}
                data = PreparedDataModule(str(chunks), **options) if kind == "prepared" else (
                    ImageFolderDataModule(str(folder), **options))  # fmt: skip
                data.setup("fit")
                return data.train_dataloader()

            return make

        pipelines = {
            "image folder, PIL (today: before this change)": ours("folder", "full", legacy=True),
            "image folder, PIL full decode (decode=full)": ours("folder", "full"),
            "image folder, reduced-size JPEG decoding (decode=reduced)": ours("folder", "reduced"),
            "image folder, simplejpeg (decode=fast)": ours("folder", "fast"),
            f"prepared chunks, short side {args.short_side} (litdata, local), PIL": ours("prepared", "reduced"),
            f"prepared chunks, short side {args.short_side} (litdata, local), simplejpeg": ours("prepared", "fast"),
            "timm's loader (create_dataset + create_transform), same folder": lambda train, workers: timm_loader(
                folder, args.image_size, train, workers, args.batch_size
            ),
        }
        for name, make in pipelines.items():
            row: dict[str, Any] = {"pipeline": name}
            for transform, train in (("train", True), ("eval", False)):
                row[f"{transform}_1"] = rate(lambda make=make, train=train: make(train, 0), args.images)
                if args.workers > 1:  # 0: the in-process (per worker) columns only
                    row[f"{transform}_{args.workers}"] = rate(
                        lambda make=make, train=train: make(train, args.workers), args.images
                    )
            rows.append(row)
            print(json.dumps(row), flush=True)
    today = rows[0]
    w = args.workers
    lines = [
        f"JPEG photos 400-500 px ({args.images}), target {args.image_size} px; img/s in one process (per worker) and "
        f"with {w} worker processes; ratio: per worker vs today",
        "",
        f"| pipeline | train img/s/worker | train img/s, {w} workers | eval img/s/worker | eval img/s, {w} workers "
        "| train ratio | eval ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        pooled = {t: f"{r[f'{t}_{w}']:.0f}" if f"{t}_{w}" in r else "-" for t in ("train", "eval")}
        lines.append(
            f"| {r['pipeline']} | {r['train_1']:.0f} | {pooled['train']} | {r['eval_1']:.0f} "
            f"| {pooled['eval']} | {r['train_1'] / today['train_1']:.2f}x | {r['eval_1'] / today['eval_1']:.2f}x |"
        )
    lines.append(
        f"\nprepare ({args.images} images, short side {args.short_side}, {prepare_workers} processes): "
        f"{prepare_s:.1f} s"
    )
    table = "\n".join(lines)
    print(table)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    payload = {"rows": rows, "prepare_seconds": prepare_s, "settings": vars(args), "machine": machine}
    (out / f"results_{args.image_size}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"table_{args.image_size}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
