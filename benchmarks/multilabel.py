"""Multi-label images as a user's CSV: 2x2 Fashion-MNIST mosaics, fine-tune (and linear probe).

Writes real PNG files and a ``path,labels,split`` CSV (``labels``: the ``;``-separated classes of
the items in the mosaic) and runs the real ``vision-transfer`` commands on them, one subprocess
each, as a user would:

- each mosaic is 56x56 px: four 28x28 Fashion-MNIST items in a 2x2 grid. Its number of distinct
  classes is drawn uniformly from 1 to 4, the classes at random, each class at least once, the
  remaining cells from the same classes; its labels are the set of those classes;
- train and val mosaics use official *train* images (no item in both), test mosaics official
  *test* images; no item is used twice within a split.

Then ``vision-transfer fit --config configs/csv.yaml`` (multi-label is inferred from the ``labels``
column: BCE head, best epoch by val mAP, per-class thresholds tuned on val after training),
``vision-transfer predict`` over the test mosaics (every class's probability), and
``vision-transfer probe`` (L-BFGS linear probe on cached features) if it accepts multi-label data.
The table reports test mAP, and micro-/macro-F1 at the fixed 0.5 threshold and at the per-class
thresholds tuned on val (computed from the predicted probabilities; the fit's own test metrics,
at the tuned thresholds, are printed beside them as a cross-check).

    nice -n 10 python benchmarks/multilabel.py [--out runs/benchmarks/multilabel] [--train 5000]
        [--val 1000] [--test 2000] [--epochs 3] [--image-size 64] [--no-probe]

Tiny (tests/test_benchmark_scripts.py; ``MULTILABEL_TINY`` in tests/conftest.py): ``--train 160 --val 40
--test 40 --image-size 32 --epochs 1 --num-workers 0 --threads 1 --in-process``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import longtail
import numpy as np
from longtail import ROOT, fit_once, folder_name, read_per_class, vision_transfer

CONFIG = ROOT / "configs" / "csv.yaml"
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}


def mosaic_labels(rng: np.random.Generator, num_classes: int) -> list[int]:
    """The classes of the four cells: 1-4 distinct classes (uniform), each at least once."""
    k = int(rng.integers(1, 5))
    classes = rng.choice(num_classes, size=k, replace=False)
    cells = np.concatenate([classes, rng.choice(classes, size=4 - k)])
    return [int(c) for c in rng.permutation(cells)]


def build_mosaics(root: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, Any]:
    """Write the mosaics and ``labels.csv`` (reused when ``root/dataset.json`` records the same
    settings); returns class names, label-cardinality and positives per class and split."""
    from PIL import Image

    from vision_transfer.data.sources import FASHION_MNIST_CLASSES, read_fashion_mnist

    settings = {"sizes": sizes, "seed": seed}
    manifest = root / "dataset.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("settings") == settings:
        return json.loads(manifest.read_text())  # type: ignore[no-any-return]
    shutil.rmtree(root, ignore_errors=True)
    source = read_fashion_mnist()
    names = [folder_name(c) for c in FASHION_MNIST_CLASSES]
    rng = np.random.default_rng(seed)
    # item pools per class: train and val share the official train images, disjointly
    pools: dict[str, list[list[int]]] = {}
    train_labels = source.splits["train"].labels
    shuffled = [list(rng.permutation(np.flatnonzero(train_labels == c))) for c in range(len(names))]
    pools["train"] = [p[: len(p) * 4 // 5] for p in shuffled]
    pools["val"] = [p[len(p) * 4 // 5 :] for p in shuffled]
    test_labels = source.splits["test"].labels
    pools["test"] = [list(rng.permutation(np.flatnonzero(test_labels == c))) for c in range(len(names))]
    rows = []
    stats: dict[str, Any] = {}
    for split, n in sizes.items():
        images = source.splits["test" if split == "test" else "train"].items
        split_rng = np.random.default_rng([seed, SPLIT_SEEDS[split]])
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        cardinality = np.zeros(5, dtype=np.int64)
        positives = np.zeros(len(names), dtype=np.int64)
        for i in range(n):
            cells = mosaic_labels(split_rng, len(names))
            items = []
            for c in cells:
                if not pools[split][c]:
                    raise SystemExit(f"{split}: ran out of {names[c]} items; ask for fewer mosaics")
                items.append(images[pools[split][c].pop()])
            mosaic = np.block([[items[0], items[1]], [items[2], items[3]]])
            path = folder / f"{split}_{i:05d}.png"
            Image.fromarray(mosaic).save(path)
            present = sorted(set(cells))
            cardinality[len(present)] += 1
            positives[present] += 1
            rows.append((path.relative_to(root).as_posix(), ";".join(names[c] for c in present), split))
        stats[split] = {
            "mosaics": n,
            "distinct_classes": {str(k): int(cardinality[k]) for k in range(1, 5)},
            "positives": dict(zip(names, positives.tolist(), strict=True)),
        }
    with (root / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", "split"])
        writer.writerows(rows)
    description = {"settings": settings, "class_names": names, "splits": stats}
    manifest.write_text(json.dumps(description, indent=2) + "\n")
    return description


def read_truth(csv_path: Path, split: str, names: list[str]) -> tuple[list[str], np.ndarray]:
    """Absolute paths and the 0/1 label matrix of one split of the CSV."""
    paths, labels = [], []
    with csv_path.open() as f:
        for row in csv.DictReader(f):
            if row["split"] == split:
                paths.append(str(csv_path.parent / row["path"]))
                present = set(row["labels"].split(";")) if row["labels"] else set()
                labels.append([name in present for name in names])
    return paths, np.array(labels, dtype=bool)


def f1_scores(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(micro-F1, macro-F1) of 0/1 matrices; a class with no positives and no predictions scores 0
    in the macro mean (torchmetrics' convention)."""
    tp = (predicted & truth).sum(axis=0).astype(np.float64)
    fp = (predicted & ~truth).sum(axis=0)
    fn = (~predicted & truth).sum(axis=0)
    micro = 2 * tp.sum() / max(1.0, 2 * tp.sum() + fp.sum() + fn.sum())
    per_class = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=(2 * tp + fp + fn) > 0)
    return float(micro), float(per_class.mean())


def mean_average_precision(probs: np.ndarray, truth: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(truth, probs, average="macro"))


def predict_probabilities(
    checkpoint: Path, paths: list[str], out: Path, threads: int | None, name: str = "finetune"
) -> np.ndarray:
    """``vision-transfer predict`` over ``paths``; every class's probability per image, in order."""
    listing = out / "test_images.txt"
    listing.write_text("\n".join(paths) + "\n")
    output = out / f"test_predictions_{name}.csv"
    vision_transfer(
        [
            "predict",
            f"--ckpt_path={checkpoint}",
            f"--data.init_args.predict_paths={listing}",
            "--data.init_args.num_workers=0",
            f"--prediction.output={output}",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={out / 'predict'}",  # where its config.yaml goes
        ],
        log=out / "logs" / f"predict_{name}.log",
        threads=threads,
    )
    by_path = {}
    with output.open() as f:
        for row in csv.DictReader(f):
            by_path[row["path"]] = [float(v) for v in row["all_probabilities"].split(";")]
    return np.array([by_path[p] for p in paths])


def run_finetune(csv_path: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    folder = out / "runs" / "multilabel" / "finetune"
    command = [
        "fit",
        f"--config={CONFIG}",
        f"--data.init_args.csv_path={csv_path}",
        f"--data.init_args.batch_size={args.batch_size}",
        f"--data.init_args.num_workers={args.num_workers}",
        f"--data.init_args.scale_min={args.scale_min}",
        f"--data.init_args.split_seed={args.seed}",
        f"--seed_everything={args.seed}",
        f"--model.backbone={args.backbone}",
        f"--model.weights={args.weights}",
        f"--model.image_size={args.image_size}",
        f"--model.lr={args.lr}",
        f"--model.head_lr={args.head_lr}",
        f"--model.warmup_epochs={args.warmup_epochs}",
        f"--trainer.max_epochs={args.epochs}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={out / 'runs'}",
        "--trainer.logger.init_args.name=multilabel",
        "--trainer.logger.init_args.version=finetune",
    ]
    seconds = fit_once(command, folder, out / "logs" / "finetune.log", args.threads, args.reuse)
    facts = json.loads((folder / "run.json").read_text())
    calibration = facts.get("calibration", {})
    return {
        "run_dir": folder,
        "checkpoint": Path(facts["fit"]["best_checkpoint"]),
        "test": facts["test"],
        "thresholds": np.array(calibration["thresholds"]),
        "val_f1_micro_at_0.5": calibration.get("f1_micro_at_0.5"),
        "val_f1_micro_tuned": calibration.get("f1_micro_tuned"),
        "per_class_ap": read_per_class(folder),
        "seconds": seconds,
    }


def run_probe(csv_path: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``vision-transfer probe`` on the CSV; its probe.json, or the error line when it refuses."""
    folder = out / "probe"
    shutil.rmtree(folder, ignore_errors=True)
    command = [
        "probe",
        f"--backbone={args.backbone}",
        f"--weights={args.weights}",
        f"--image_size={args.image_size}",
        "--data=vision_transfer.datamodules.CsvDataModule",
        f"--data.csv_path={csv_path}",
        "--data.num_workers=0",
        f"--data.split_seed={args.seed}",
        f"--solver={args.probe_solver}",
        f"--cache_dir={out / 'feature_cache'}",
        f"--output={folder}",
    ]
    code, output, seconds = vision_transfer(command, log=out / "logs" / "probe.log", check=False, threads=args.threads)
    if code != 0:
        lines = [line for line in output.splitlines() if line.strip()]
        return {"ok": False, "error": lines[-1] if lines else f"exit {code}", "seconds": seconds}
    return {"ok": True, "result": json.loads((folder / "probe.json").read_text()), "seconds": seconds}


def score_row(model: str, probs: np.ndarray, truth: np.ndarray, thresholds: Any, seconds: float) -> dict[str, Any]:
    """A table row: mAP, and micro/macro-F1 at 0.5 and at the model's own per-class thresholds."""
    micro_05, macro_05 = f1_scores(probs >= 0.5, truth)
    micro_t, macro_t = f1_scores(probs >= np.asarray(thresholds), truth)
    return {
        "model": model, "map": mean_average_precision(probs, truth), "f1_micro_05": micro_05,
        "f1_micro_tuned": micro_t, "f1_macro_05": macro_05, "f1_macro_tuned": macro_t, "seconds": seconds,
    }  # fmt: skip


def checkpoint_thresholds(checkpoint: Path) -> list[float]:
    """The per-class thresholds a checkpoint's prediction settings hold."""
    from vision_transfer.checkpoint import read_checkpoint

    return list(read_checkpoint(checkpoint)[0].prediction["thresholds"])


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | test mAP | micro-F1 @ 0.5 | micro-F1 @ tuned | macro-F1 @ 0.5 | macro-F1 @ tuned | wall time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = [r["model"], *(f"{r[k]:.4f}" for k in ("map", "f1_micro_05", "f1_micro_tuned"))]
        cells += [f"{r['f1_macro_05']:.4f}", f"{r['f1_macro_tuned']:.4f}", f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks" / "multilabel")
    parser.add_argument("--train", type=int, default=5000, help="training mosaics")
    parser.add_argument("--val", type=int, default=1000, help="validation mosaics (thresholds are tuned on them)")
    parser.add_argument("--test", type=int, default=2000, help="test mosaics")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--head-lr", type=float, default=4e-3)
    parser.add_argument("--warmup-epochs", type=float, default=0.3)
    parser.add_argument(
        "--scale-min", type=float, default=0.9, help="random-resized-crop area (a small crop drops labelled items)"
    )
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="packaged")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-probe", action="store_true", help="skip the linear probe")
    parser.add_argument(
        "--probe-solver", choices=["sgd", "lbfgs"], default="sgd",
        help="the probe's solver; lbfgs (45 C values, one-vs-rest) is exact but took over 14 min here",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs (default: torch's, one per core)"
    )
    parser.add_argument("--reuse", action="store_true", help="keep a finished fine-tune made by the same command")
    parser.add_argument("--in-process", action="store_true", help="run the commands in this process (tests)")
    args = parser.parse_args(argv)
    longtail.IN_PROCESS = args.in_process  # see longtail.IN_PROCESS
    out: Path = args.out.resolve()
    start = time.perf_counter()
    description = build_mosaics(out / "data", {"train": args.train, "val": args.val, "test": args.test}, args.seed)
    names: list[str] = description["class_names"]
    csv_path = out / "data" / "labels.csv"
    for split, stats in description["splits"].items():
        print(f"{split}: {stats['mosaics']} mosaics, distinct classes per mosaic {stats['distinct_classes']}")

    finetune = run_finetune(csv_path, out, args)
    model_classes = list(finetune["per_class_ap"])  # the head's class order (sorted names), as predict writes it
    assert sorted(model_classes) == sorted(names), (model_classes, names)
    paths, truth = read_truth(csv_path, "test", model_classes)
    probs = predict_probabilities(finetune["checkpoint"], paths, out, args.threads)
    fit_test = finetune["test"]
    rows = [score_row(f"fine-tune ({args.epochs} epochs)", probs, truth, finetune["thresholds"], finetune["seconds"])]
    micro_t, macro_t = rows[0]["f1_micro_tuned"], rows[0]["f1_macro_tuned"]
    print(
        f"fine-tune: fit's own test metrics (tuned thresholds): mAP {fit_test['test/map']:.4f}, micro-F1 "
        f"{fit_test['test/f1_micro']:.4f}, macro-F1 {fit_test['test/f1_macro']:.4f}; from predict: mAP "
        f"{rows[0]['map']:.4f}, micro-F1 {micro_t:.4f}, macro-F1 {macro_t:.4f}",
        flush=True,
    )

    probe: dict[str, Any] | None = None
    if not args.no_probe:
        probe = run_probe(csv_path, out, args)
        if probe["ok"]:
            checkpoint = out / "probe" / "probe.ckpt"
            probe_probs = predict_probabilities(checkpoint, paths, out, args.threads, name="probe")
            thresholds = checkpoint_thresholds(checkpoint)
            label = f"linear probe ({probe['result']['solver']}, chosen {probe['result']['chosen']})"
            rows.append(score_row(label, probe_probs, truth, thresholds, probe["seconds"]))
            print(f"probe: {label}: test mAP {rows[-1]['map']:.4f} (probe.json: {probe['result']['test_map']:.4f})")
        else:
            print(f"probe: vision-transfer probe failed on the multi-label CSV: {probe['error']}", flush=True)

    total = time.perf_counter() - start
    threads = args.threads or os.environ.get("OMP_NUM_THREADS") or os.cpu_count()
    cards = {s: d["distinct_classes"] for s, d in description["splits"].items()}
    header = (
        f"2x2 Fashion-MNIST mosaics (56x56 px, 1-4 distinct classes each): {args.train} train / {args.val} val "
        f"mosaics from official train images, {args.test} test mosaics from official test images; distinct "
        f"classes per test mosaic {cards['test']}. {args.backbone} ({args.weights} weights), full fine-tune, "
        f"{args.image_size} px, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g} / head "
        f"{args.head_lr:g}, crops of >= {args.scale_min:g} of the area, seed {args.seed}; best epoch by val mAP, "
        f"per-class thresholds tuned on val (val micro-F1 {finetune['val_f1_micro_at_0.5']:.4f} at 0.5 -> "
        f"{finetune['val_f1_micro_tuned']:.4f} tuned). {platform.machine()}, {os.cpu_count()} CPU cores "
        f"({threads} threads), {total / 60:.1f} min in all."
    )
    probe_line = ""
    if probe is not None and not probe["ok"]:
        probe_line = f"Linear probe: `vision-transfer probe` failed on this multi-label CSV: {probe['error']}"
    text = "\n".join([header, "", table(rows), "", probe_line]).rstrip()
    print("\n" + text)
    (out / "multilabel.md").write_text(text + "\n")
    results = {
        "settings": vars(args) | {"out": str(out)},
        "dataset": description,
        "rows": rows,
        "fit_test_metrics": fit_test,
        "thresholds": np.asarray(finetune["thresholds"]).tolist(),
        "per_class_ap": finetune["per_class_ap"],
        "run_dir": str(finetune["run_dir"]),
        "probe": probe,
        "seconds": total,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
