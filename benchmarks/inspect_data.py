"""`vision-transfer inspect` on planted faults: flipped labels, test images copied into train, and what
cleaning buys a fine-tune.

Fashion-MNIST as PNG files (5,000 train / 1,000 val class-balanced from the official train set, 2,000 test
from the official test set), read through a CSV with a split column (the format a user's data comes in).
For each planting seed: 5% of the train labels flipped (half to a uniformly drawn other class, half to the
class a clean out-of-fold probe confuses each class with most), and 50 test images copied into train exactly
and 50 as near copies (down- and up-sized, JPEG quality 60, shifted one pixel, mirrored: in turn). The
inspection (packaged lite0 at 64 px) is scored against the plants; at the first seed, the README's recipe is
fine-tuned on the clean, the noisy and the cleaned CSV (flagged label issues and leaked copies dropped),
each tested on the clean official test images.

    python benchmarks/inspect_data.py --out benchmarks/results/inspect
    python benchmarks/inspect_data.py --out /tmp/inspect --train 300 --val 100 --test 100 --plant-dups 10 --no-fit
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "tf_efficientnet_lite0"


def write_images(root: Path, train: int, val: int, test: int) -> dict[str, list[tuple[str, int]]]:
    """The PNG files of each split (relative path, label); reused when present."""
    from PIL import Image

    from vision_transfer.datamodules import FashionMNISTDataModule

    manifest = root / "manifest.json"
    wanted = {"train": train, "val": val, "test": test}
    if manifest.is_file() and json.loads(manifest.read_text())["sizes"] == wanted:
        return {k: [tuple(r) for r in v] for k, v in json.loads(manifest.read_text())["rows"].items()}  # type: ignore[misc]
    data = FashionMNISTDataModule(max_train_samples=train, max_val_samples=val, max_test_samples=test, val_fraction=0.1)
    rows: dict[str, list[tuple[str, int]]] = {}
    for split, samples in data.prepare_splits().items():
        (root / split).mkdir(parents=True, exist_ok=True)
        rows[split] = []
        for i, (array, label) in enumerate(zip(samples.items, samples.labels, strict=True)):
            Image.fromarray(array).save(root / split / f"{i:05d}.png")
            rows[split].append((f"{split}/{i:05d}.png", int(label)))
    manifest.write_text(json.dumps({"sizes": wanted, "rows": rows}))
    return rows


def near_copy(path: Path, kind: int, target: Path) -> None:
    """A near duplicate of an image: down- and up-sized, JPEG 60, shifted one pixel, or mirrored."""
    from PIL import Image, ImageChops, ImageOps

    image = Image.open(path).convert("L")
    if kind == 0:
        image = image.resize((22, 22), Image.Resampling.BILINEAR).resize(image.size, Image.Resampling.BILINEAR)
    elif kind == 1:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=60)
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("L")
    elif kind == 2:
        image = ImageChops.offset(image, 1, 0)
    else:
        image = ImageOps.mirror(image)
    image.save(target)


def plant(root: Path, rows: dict[str, list[tuple[str, int]]], seed: int, confusable: np.ndarray | None,
          flip_fraction: float, dups: int, classes: list[str]) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    """A CSV with flipped train labels and test images copied into train; returns it and the plants."""
    rng = np.random.default_rng(seed)
    train = list(rows["train"])
    n_flip = round(flip_fraction * len(train))
    flipped = rng.choice(len(train), size=n_flip, replace=False)
    noisy = [label for _, label in train]
    for j, i in enumerate(flipped):
        true = train[i][1]
        if j % 2 == 0 or confusable is None:  # uniformly to another class
            noisy[i] = int((true + rng.integers(1, len(classes))) % len(classes))
        else:  # to the class this one is most confused with
            noisy[i] = int(confusable[true])
    copies = rng.choice(len(rows["test"]), size=2 * dups, replace=False)
    planted = root / f"planted_{seed}"
    planted.mkdir(exist_ok=True)
    extra: list[tuple[str, int, str, str]] = []  # (path, label, test id, kind)
    for j, t in enumerate(copies):
        source, label = rows["test"][t]
        target = planted / f"{j:04d}.png"
        if j < dups:
            target.write_bytes((root / source).read_bytes())
            kind = "exact"
        else:
            near_copy(root / source, j % 4, target)
            kind = ("resized", "jpeg60", "shift1", "mirror")[j % 4]
        extra.append((target.relative_to(root).as_posix(), label, source, kind))
    path = root / f"noisy_{seed}.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for (file, _), label in zip(train, noisy, strict=True):
            writer.writerow([file, classes[label], "train"])
        for file, label, _, _ in extra:
            writer.writerow([file, classes[label], "train"])
        for split in ("val", "test"):
            writer.writerows([file, classes[label], split] for file, label in rows[split])
    plants = {"flipped": [train[i][0] for i in flipped], "copies": [(p, t, k) for p, _, t, k in extra]}
    return path, plants


def clean_csv(root: Path, rows: dict[str, list[tuple[str, int]]], classes: list[str]) -> Path:
    path = root / "clean.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for split in ("train", "val", "test"):
            writer.writerows([file, classes[label], split] for file, label in rows[split])
    return path


def datamodule(csv_path: Path, image_size: int) -> Any:
    from vision_transfer.backbones import preprocessing
    from vision_transfer.datamodules import CsvDataModule

    return CsvDataModule(str(csv_path), batch_size=64, num_workers=1, augment="none", verify_images=False,
                         data_config=preprocessing(BACKBONE, "packaged", image_size))  # fmt: skip


def run_inspection(
    csv_path: Path, out: Path, args: argparse.Namespace, threshold: float | None = None
) -> tuple[dict[str, Any], float]:
    from vision_transfer.app.inspection import DUPLICATE_THRESHOLD, inspect_datamodule

    start = time.perf_counter()
    summary = inspect_datamodule(
        datamodule(csv_path, args.image_size), BACKBONE, "packaged", out, image_size=args.image_size,
        cache_dir=str(Path(args.out) / "cache"), duplicate_threshold=threshold or DUPLICATE_THRESHOLD,
    )  # fmt: skip
    return summary, time.perf_counter() - start


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


CALIBRATION_FLOOR = 0.8  # the inspection reports pairs down to this similarity; each threshold above is scored
THRESHOLDS = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99)


def score(out: Path, plants: dict[str, Any], threshold: float) -> dict[str, Any]:
    """Precision and recall of the flagged label issues, and of the cross-split duplicates at ``threshold``,
    against the plants."""
    issues = read_rows(out / "label_issues.csv")
    flagged = [r["id"] for r in issues]
    truth = set(plants["flipped"])
    hits = sum(1 for i in flagged if i in truth)
    k = len(truth)
    ranked = flagged[:k]  # the CSV is ranked, most doubtful first
    leaks = [r for r in read_rows(out / "duplicates.csv") if r["split"] == "test" and r["duplicate_split"] == "train"
             and float(r["cosine_similarity"]) >= threshold]  # fmt: skip
    found = {(r["id"], r["duplicate_id"]) for r in leaks}
    by_kind: dict[str, list[bool]] = {}
    for train_path, test_id, kind in plants["copies"]:
        by_kind.setdefault("exact" if kind == "exact" else "near", []).append((test_id, train_path) in found)
    planted_pairs = {(t, p) for p, t, _ in plants["copies"]}
    return {
        "label_precision": hits / max(1, len(flagged)), "label_recall": hits / max(1, k),
        "label_precision_at_k": sum(1 for i in ranked if i in truth) / max(1, k), "flagged": len(flagged),
        "exact_recall": float(np.mean(by_kind["exact"])), "near_recall": float(np.mean(by_kind["near"])),
        "leak_precision": len(found & planted_pairs) / max(1, len(found)), "leaks_flagged": len(found),
    }  # fmt: skip


def fit(csv_path: Path, args: argparse.Namespace, drop: set[str], seed: int = 0) -> float:
    """The README's recipe on a CSV (``drop``: train rows left out), tested on its test split."""
    import pytorch_lightning as pl
    import yaml

    from vision_transfer.tasks import ImageClassifier

    if drop:
        kept = csv_path.with_name(csv_path.stem + "_cleaned.csv")
        rows = [r for r in read_rows(csv_path) if not (r["split"] == "train" and r["path"] in drop)]
        with kept.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "label", "split"])
            writer.writeheader()
            writer.writerows(rows)
        csv_path = kept
    recipe = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())["model"]
    options = {k: v for k, v in recipe.items() if k not in ("backbone", "weights", "image_size")}
    pl.seed_everything(seed, verbose=False)
    data = datamodule(csv_path, args.image_size)
    model = ImageClassifier.for_data(data, backbone=BACKBONE, weights="packaged", image_size=args.image_size, **options)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(model, datamodule=data)
    return float(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"])


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "inspect"))
    for name, default in (("train", 5000), ("val", 1000), ("test", 2000), ("image-size", 64), ("epochs", 3),
                          ("plant-dups", 50), ("threads", 2)):  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--flip", type=float, default=0.05)
    parser.add_argument("--no-fit", action="store_true", help="detection only (no fine-tunes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    root = out / "data"
    from vision_transfer.data.sources import FASHION_MNIST_CLASSES

    classes = list(FASHION_MNIST_CLASSES)
    rows = write_images(root, args.train, args.val, args.test)
    clean = clean_csv(root, rows, classes)
    summary, seconds = run_inspection(clean, out / "clean", args)
    print(f"clean data: {summary['label_issues']} label issues flagged, {summary['duplicates_across_splits']} leaks, "
          f"out-of-fold accuracy {summary['out_of_fold_accuracy']:.4f} ({seconds:.0f} s with extraction)")  # fmt: skip
    confusion = np.zeros((len(classes), len(classes)))
    for r in read_rows(out / "clean" / "label_issues.csv"):
        confusion[classes.index(r["given"]), classes.index(r["suggested"])] += 1
    # the class each one is most often taken for by the clean probe (flagged rows), else its neighbour
    confusable = np.array([int(np.argmax(c)) if c.sum() else (i + 1) % len(classes) for i, c in enumerate(confusion)])
    results: list[dict[str, Any]] = []
    for seed in args.seeds:
        csv_path, plants = plant(root, rows, seed, confusable, args.flip, args.plant_dups, classes)
        summary, seconds = run_inspection(csv_path, out / f"seed{seed}", args, CALIBRATION_FLOOR)
        warm = float("nan")
        if seed == args.seeds[0]:  # features cached: the inspection alone
            _, warm = run_inspection(csv_path, out / f"seed{seed}", args, CALIBRATION_FLOOR)
        from vision_transfer.app.inspection import DUPLICATE_THRESHOLD

        row = {"seed": seed, **score(out / f"seed{seed}", plants, DUPLICATE_THRESHOLD), "seconds_cold": seconds,
               "seconds_warm": warm, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "by_threshold": {t: score(out / f"seed{seed}", plants, t) for t in THRESHOLDS}}  # fmt: skip
        if not args.no_fit and seed == args.seeds[0]:
            flagged = {r["id"] for r in read_rows(out / f"seed{seed}" / "label_issues.csv") if r["split"] == "train"}
            leaked = {r["duplicate_id"] for r in read_rows(out / f"seed{seed}" / "duplicates.csv")
                      if r["split"] != "train"}  # fmt: skip
            row["fit"] = {"clean": fit(clean, args, set()), "noisy": fit(csv_path, args, set()),
                          "cleaned": fit(csv_path, args, flagged | leaked)}  # fmt: skip
        results.append(row)
        print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    keys = ("label_precision", "label_recall", "label_precision_at_k", "exact_recall", "near_recall", "leak_precision")
    print("| seed | " + " | ".join(keys) + " | flagged | inspect s (cold / warm) |")
    print("| --- |" + " --- |" * (len(keys) + 2))
    for r in results:
        print(f"| {r['seed']} | " + " | ".join(f"{r[k]:.3f}" for k in keys)
              + f" | {r['flagged']} | {r['seconds_cold']:.0f} / {r['seconds_warm']:.0f} |")  # fmt: skip
    print("\nnear-duplicate threshold calibration (mean over seeds): threshold, exact recall, near recall, precision")
    for t in THRESHOLDS:
        cells = [np.mean([r["by_threshold"][t][k] for r in results]) for k in ("exact_recall", "near_recall",
                                                                               "leak_precision")]  # fmt: skip
        print(f"  {t:.2f}  " + "  ".join(f"{v:.3f}" for v in cells))
    for r in results:
        if "fit" in r:
            fits = r["fit"]
            cost = fits["clean"] - fits["noisy"]
            gain = 100 * (fits["cleaned"] - fits["noisy"]) / cost if cost > 0 else 0.0
            said = (
                f"cleaning recovers {gain:.0f}% of what the noise cost" if cost > 0 else "the noise cost nothing here"
            )
            print(f"fine-tune test top-1: clean {fits['clean']:.4f}, noisy {fits['noisy']:.4f}, "
                  f"cleaned {fits['cleaned']:.4f} ({said})")  # fmt: skip


if __name__ == "__main__":
    main()
