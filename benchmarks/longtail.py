"""Long-tailed Fashion-MNIST as a user's image folder: plain cross-entropy vs the imbalance options.

Writes a real image folder (PNG files, ``train/ val/ test/`` folders of class folders) and runs the
real ``vision-transfer`` commands on it, one subprocess each, as a user would:

- train: official Fashion-MNIST train images, ``--max-per-class`` (4,000) for the largest class
  decaying exponentially to ``max / --ratio`` (40) for the smallest; which class gets which count
  is a seeded permutation;
- val: ``--val-per-class`` (100) per class, from official train images not used for training
  (balanced, so ``val/acc``, which picks the best epoch, is also the balanced accuracy);
- test: the official test set, all 10,000 (1,000 per class), or ``--test-per-class`` per class.

Then ``vision-transfer check-data`` on the folder (its imbalance line is printed), and one
``vision-transfer fit --config configs/image_folder.yaml`` per option, all at equal epochs, seed,
batch size, learning rates and image size, with ``label_smoothing 0`` everywhere (so "plain CE"
is plain cross-entropy, and comparable with the focal loss, which ignores label smoothing):

    plain_ce            (nothing)
    balanced_sampling   --data.init_args.balanced_sampling true
    class_weighting     --model.class_weighting balanced
    logit_adj_loss      --model.logit_adjustment loss --model.logit_adjustment_tau 1.0
    logit_adj_posthoc   --model.logit_adjustment posthoc --model.logit_adjustment_tau 1.0
    focal_gamma2        --model.focal_gamma 2

Test top-1, balanced accuracy (mean per-class recall), macro-F1 and the mean recall of the three
rarest classes come from each run's ``run.json`` and ``confusion_matrix.csv``; for the
post-hoc option, ``vision-transfer predict`` over the test folder must give the same confusion
matrix (the adjustment acts at prediction time; a mismatch stops the script). On a balanced test
set (the default) top-1 and balanced accuracy are the same number: every class has the same
support. Everything lands in ``--out`` (``results.json``, ``longtail.md``, the folder, the run
folders and a log per run).

    nice -n 10 python benchmarks/longtail.py [--out runs/benchmarks/longtail] [--epochs 2]
        [--image-size 64] [--options plain_ce focal_gamma2 ...] [--test-per-class N] [--threads 1]
        [--reuse]

Defaults: 2 epochs (about 8-10 min per option on the loaded 2-core development machine with
``--threads 1``; 3 epochs would have taken the six runs past an hour there). ``--threads 1``: with
other jobs on the 2 cores, torch's default of 2 threads made a training step about 10x slower.
``--reuse`` keeps finished runs made by exactly the same ``fit`` command.

Tiny (tests/test_benchmark_scripts.py; ``LONGTAIL_TINY`` in tests/conftest.py): ``--max-per-class 40
--ratio 10 --val-per-class 5 --test-per-class 10 --image-size 32 --epochs 1 --num-workers 0 --threads 1
--options plain_ce logit_adj_posthoc logit_adj_loss --in-process``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "image_folder.yaml"

OPTIONS: dict[str, list[str]] = {
    "plain_ce": [],
    "balanced_sampling": ["--data.init_args.balanced_sampling=true"],
    "class_weighting": ["--model.class_weighting=balanced"],
    "logit_adj_loss": ["--model.logit_adjustment=loss", "--model.logit_adjustment_tau=1.0"],
    "logit_adj_posthoc": ["--model.logit_adjustment=posthoc", "--model.logit_adjustment_tau=1.0"],
    "focal_gamma2": ["--model.focal_gamma=2"],
}


def folder_name(class_name: str) -> str:
    """A class name as a folder name ('T-shirt/top' -> 'T-shirt_top')."""
    return re.sub(r"[^\w.-]+", "_", class_name)


def long_tail_counts(num_classes: int, max_per_class: int, ratio: float, seed: int) -> np.ndarray:
    """Training images per class: ``max * ratio ** (-rank / (C - 1))`` rounded, the rank of each
    class a seeded permutation (rank 0: the largest class)."""
    ranks = np.random.default_rng(seed).permutation(num_classes)
    counts = max_per_class * float(ratio) ** (-ranks / (num_classes - 1))
    return np.maximum(1, np.round(counts)).astype(np.int64)


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image).save(path)


def build_folder(
    root: Path,
    max_per_class: int = 4000,
    ratio: float = 100.0,
    val_per_class: int = 100,
    test_per_class: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the long-tailed image folder (reused when ``root/dataset.json`` records the same
    settings) and return its description: class names, counts per split and settings."""
    from vision_transfer.data.sources import FASHION_MNIST_CLASSES, read_fashion_mnist

    settings = {
        "max_per_class": max_per_class,
        "ratio": ratio,
        "val_per_class": val_per_class,
        "test_per_class": test_per_class,
        "seed": seed,
    }
    manifest = root / "dataset.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("settings") == settings:
        return json.loads(manifest.read_text())  # type: ignore[no-any-return]
    shutil.rmtree(root, ignore_errors=True)
    source = read_fashion_mnist()
    train, test = source.splits["train"], source.splits["test"]
    names = [folder_name(c) for c in FASHION_MNIST_CLASSES]
    counts = long_tail_counts(len(names), max_per_class, ratio, seed)
    rng = np.random.default_rng(seed)
    per_split: dict[str, dict[str, int]] = {"train": {}, "val": {}, "test": {}}
    for c, name in enumerate(names):
        pool = rng.permutation(np.flatnonzero(train.labels == c))
        if counts[c] + val_per_class > len(pool):
            raise SystemExit(f"class {name}: {counts[c]} train + {val_per_class} val > {len(pool)} images")
        test_pool = np.flatnonzero(test.labels == c)
        if test_per_class is not None:
            test_pool = np.sort(rng.permutation(test_pool)[:test_per_class])
        chosen = {
            "train": (train, np.sort(pool[: counts[c]])),
            "val": (train, np.sort(pool[counts[c] : counts[c] + val_per_class])),
            "test": (test, test_pool),
        }
        for split, (samples, index) in chosen.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            prefix = "train" if samples is train else "test"  # which official split each file came from
            for i in index:
                _write_png(folder / f"{prefix}_{i:05d}.png", samples.items[i])
            per_split[split][name] = len(index)
    description = {"settings": settings, "class_names": names, "counts": per_split}
    manifest.write_text(json.dumps(description, indent=2) + "\n")
    return description


# -- running the user's commands ---------------------------------------------------------------
# --in-process (the tests' tiny runs): each command runs in this interpreter instead of a fresh one. A
# tiny command spent 15-20 of its 20-30 s importing torch, Lightning and timm on the loaded 2-core
# machine; the price is the isolation a user's separate commands have (one process, shared state).
IN_PROCESS = False


def _run_in_process(args: list[str], threads: int | None) -> tuple[int, str]:
    """``vision-transfer <args>`` called in this process (cwd and threads as for the subprocess)."""
    import contextlib
    import io
    import traceback

    import torch

    from vision_transfer.cli import main as cli_main

    if threads is not None:
        torch.set_num_threads(threads)
    output, code = io.StringIO(), 0
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            cli_main(args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except Exception:  # what a subprocess would print before exiting with status 1
            traceback.print_exc()
            code = 1
    return code, output.getvalue()


def vision_transfer(
    args: list[str], log: Path | None = None, check: bool = True, threads: int | None = None
) -> tuple[int, str, float]:
    """Run ``vision-transfer <args>`` (``python -m vision_transfer.cli``, this tree's code) in a
    subprocess, or in this process with ``IN_PROCESS``; returns (exit status, output, seconds). Output
    also goes to ``log`` when given; ``threads`` sets ``OMP_NUM_THREADS`` (torch's intra-op threads) for it."""
    start = time.perf_counter()
    if IN_PROCESS:
        code, output = _run_in_process(args, threads)
    else:
        env = dict(os.environ)
        if threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        done = subprocess.run(
            [sys.executable, "-m", "vision_transfer.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        code, output = done.returncode, done.stdout
    seconds = time.perf_counter() - start
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ vision-transfer {' '.join(args)}\n{output}\n[exit {code}, {seconds:.0f} s]\n")
    if check and code != 0:
        tail = "\n".join(output.splitlines()[-30:])
        raise SystemExit(f"vision-transfer {args[0]} failed (exit {code}):\n{tail}")
    return code, output, seconds


def run_folder(out: Path, name: str, version: str) -> Path:
    return out / "runs" / name / version


def fit_args(data_root: Path, out: Path, name: str, version: str, args: argparse.Namespace) -> list[str]:
    """``vision-transfer fit`` on the folder, with the settings every option shares."""
    return [
        "fit",
        f"--config={CONFIG}",
        f"--data.init_args.root={data_root}",
        f"--data.init_args.batch_size={args.batch_size}",
        f"--data.init_args.num_workers={args.num_workers}",
        f"--data.init_args.split_seed={args.seed}",
        f"--seed_everything={args.seed}",
        f"--model.backbone={args.backbone}",
        f"--model.weights={args.weights}",
        f"--model.image_size={args.image_size}",
        f"--model.lr={args.lr}",
        f"--model.head_lr={args.head_lr}",
        f"--model.warmup_epochs={args.warmup_epochs}",
        "--model.label_smoothing=0.0",
        f"--trainer.max_epochs={args.epochs}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={out / 'runs'}",
        f"--trainer.logger.init_args.name={name}",
        f"--trainer.logger.init_args.version={version}",
    ]


def read_per_class(folder: Path) -> dict[str, float]:
    """``per_class.csv`` of a run: class -> recall (single-label) or AP (multi-label)."""
    with (folder / "per_class.csv").open() as f:
        rows = list(csv.DictReader(f))
    column = next(c for c in ("recall", "ap", "average_precision", "accuracy") if c in rows[0])
    return {row["class"]: float(row[column]) for row in rows}


def fit_once(command: list[str], folder: Path, log: Path, threads: int | None, reuse: bool) -> float:
    """Run ``vision-transfer fit`` into ``folder`` (a fresh one), or with ``reuse`` keep a finished
    run there that was made by exactly this command; returns the command's wall time in seconds."""
    marker = folder / "benchmark_command.json"
    if reuse and marker.is_file() and (folder / "run.json").is_file():
        done = json.loads(marker.read_text())
        if done["command"] == command and "test" in json.loads((folder / "run.json").read_text()):
            print(f"reusing {folder} (made by the same command)", flush=True)
            return float(done["seconds"])
    shutil.rmtree(folder, ignore_errors=True)
    _, _, seconds = vision_transfer(command, log=log, threads=threads)
    marker.write_text(json.dumps({"command": command, "seconds": seconds}, indent=2) + "\n")
    return seconds


def read_confusion(folder: Path) -> tuple[list[str], np.ndarray]:
    """A run's ``confusion_matrix.csv``: class names and counts (true class per row)."""
    with (folder / "confusion_matrix.csv").open() as f:
        rows = list(csv.reader(f))
    return rows[0][1:], np.array([[int(v) for v in row[1:]] for row in rows[1:]], dtype=np.int64)


def predicted_confusion(folder: Path, test_root: Path, names: list[str], out: Path, threads: int | None) -> np.ndarray:
    """The test confusion matrix from ``vision-transfer predict`` (top-1 of the final, post-hoc
    adjusted probabilities) over the test folder; the true class is each file's folder."""
    output = out / "predictions" / f"{folder.name}_test.csv"
    vision_transfer(
        [
            "predict",
            f"--ckpt_path={folder / 'checkpoints' / 'best.ckpt'}",
            f"--data.init_args.predict_paths={test_root}",
            "--data.init_args.num_workers=0",
            f"--prediction.output={output}",
            "--prediction.top_k=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={output.parent}",  # where its config.yaml goes
        ],
        log=out / "logs" / f"{folder.name}_predict.log",
        threads=threads,
    )
    index = {name: i for i, name in enumerate(names)}
    matrix = np.zeros((len(names), len(names)), dtype=np.int64)
    with output.open() as f:
        for row in csv.DictReader(f):
            matrix[index[Path(row["path"]).parent.name], index[row["label_1"]]] += 1
    return matrix


def run_option(option: str, data_root: Path, out: Path, args: argparse.Namespace, rare: list[str]) -> dict[str, Any]:
    folder = run_folder(out, "longtail", option)
    command = fit_args(data_root, out, "longtail", option, args) + OPTIONS[option]
    seconds = fit_once(command, folder, out / "logs" / f"{option}.log", args.threads, args.reuse)
    facts = json.loads((folder / "run.json").read_text())
    test = facts["test"]
    names, matrix = read_confusion(folder)
    source = "confusion_matrix.csv"
    if "posthoc" in option:  # the adjustment acts at prediction time: predict must count the same
        predicted = predicted_confusion(folder, data_root / "test", names, out, args.threads)
        if not np.array_equal(predicted, matrix):
            raise SystemExit(f"{option}: `vision-transfer predict` disagrees with {folder}/confusion_matrix.csv")
        source = "confusion_matrix.csv, equal to vision-transfer predict's"
    recall = dict(zip(names, (np.diag(matrix) / matrix.sum(axis=1).clip(min=1)).tolist(), strict=True))
    return {
        "option": option,
        "flags": " ".join(OPTIONS[option]) or "(none)",
        "acc": test["test/acc"],
        "balanced_acc": test["test/balanced_acc"],
        "f1_macro": test["test/f1_macro"],
        "rare_recall": float(np.mean([recall[c] for c in rare])),
        "per_class_recall": recall,
        "confusion": {"classes": names, "matrix": matrix.tolist(), "source": source},
        "seconds": seconds,
        "fit_seconds": facts.get("fit", {}).get("seconds"),
        "run_dir": str(folder),
    }


def table(rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if r["option"] == "plain_ce"), None)
    lines = [
        "| option | flags | test top-1 | balanced acc | macro-F1 | recall, 3 rarest classes "
        "| balanced acc vs plain CE (points) | wall time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        gain = "" if base is None or r is base else f"{100 * (r['balanced_acc'] - base['balanced_acc']):+.2f}"
        lines.append(
            f"| {r['option']} | `{r['flags']}` | {r['acc']:.4f} | {r['balanced_acc']:.4f} | {r['f1_macro']:.4f} "
            f"| {r['rare_recall']:.4f} | {gain} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]], goal_points: float = 5.0) -> str:
    base = next((r for r in rows if r["option"] == "plain_ce"), None)
    others = [r for r in rows if r["option"] != "plain_ce"]
    if base is None or not others:
        return "goal not evaluated (needs plain_ce and at least one option)."
    best = max(others, key=lambda r: r["balanced_acc"])
    gain = 100 * (best["balanced_acc"] - base["balanced_acc"])
    met = "met" if gain >= goal_points else "NOT met"
    return (
        f"best option: {best['option']}, balanced accuracy {best['balanced_acc']:.4f} vs plain CE "
        f"{base['balanced_acc']:.4f} ({gain:+.2f} points); goal of >= {goal_points:g} points: {met}."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks" / "longtail")
    parser.add_argument("--max-per-class", type=int, default=4000)
    parser.add_argument("--ratio", type=float, default=100.0, help="largest / smallest training class")
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=None, help="default: all 1,000 official per class")
    parser.add_argument("--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--head-lr", type=float, default=4e-3)
    parser.add_argument("--warmup-epochs", type=float, default=0.3)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="packaged")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs (default: torch's, one per core)"
    )
    parser.add_argument("--reuse", action="store_true", help="keep finished runs made by the same command")
    parser.add_argument("--in-process", action="store_true", help="run the commands in this process (tests)")
    args = parser.parse_args(argv)
    global IN_PROCESS
    IN_PROCESS = args.in_process
    if "plain_ce" in args.options:  # the baseline first
        args.options = ["plain_ce", *(o for o in args.options if o != "plain_ce")]
    out: Path = args.out.resolve()
    data_root = out / "data"
    start = time.perf_counter()

    description = build_folder(
        data_root, args.max_per_class, args.ratio, args.val_per_class, args.test_per_class, args.seed
    )
    train_counts: dict[str, int] = description["counts"]["train"]
    rare = sorted(train_counts, key=train_counts.get)[:3]  # type: ignore[arg-type]
    sizes = {split: sum(c.values()) for split, c in description["counts"].items()}
    print(f"image folder {data_root}: {sizes} images; train per class {train_counts}", flush=True)

    _, report, _ = vision_transfer(["check-data", str(data_root), "--headers-only"], log=out / "logs" / "check.log")
    imbalance = [line for line in report.splitlines() if line.startswith("imbalance ratio")]
    print(f"vision-transfer check-data: {imbalance[0] if imbalance else '(no imbalance line)'}", flush=True)

    rows = []
    for option in args.options:
        row = run_option(option, data_root, out, args, rare)
        rows.append(row)
        print(
            f"{option}: acc {row['acc']:.4f}  balanced acc {row['balanced_acc']:.4f}  macro-F1 {row['f1_macro']:.4f}"
            f"  ({row['seconds']:.0f} s)",
            flush=True,
        )
    total = time.perf_counter() - start
    threads = args.threads or os.environ.get("OMP_NUM_THREADS") or os.cpu_count()
    test_kind = "all official" if args.test_per_class is None else f"{args.test_per_class} per class of the official"
    header = " ".join(
        [
            f"Long-tailed Fashion-MNIST image folder: train {sizes['train']} images",
            f"({max(train_counts.values())} down to {min(train_counts.values())} per class,",
            f"imbalance ratio {args.ratio:g}, class order seed {args.seed}),",
            f"val {sizes['val']} ({args.val_per_class} per class, unused train images),",
            f"test {sizes['test']} ({test_kind} test images).",
            f"{args.backbone} ({args.weights} weights), full fine-tune, {args.image_size} px, {args.epochs} epochs,",
            f"batch {args.batch_size}, lr {args.lr:g} / head {args.head_lr:g}, label smoothing 0, seed {args.seed};",
            "best epoch by val/acc (balanced val).",
            f"{platform.machine()}, {os.cpu_count()} CPU cores ({threads} threads);",
            f"the fits took {sum(r['seconds'] for r in rows) / 60:.1f} min, this invocation {total / 60:.1f} min.",
            f"Rarest classes: {', '.join(rare)}.",
        ]
    )
    text = "\n".join([header, "", imbalance[0] if imbalance else "", "", table(rows), "", verdict(rows)])
    print("\n" + text)
    (out / "longtail.md").write_text(text + "\n")
    results = {"settings": vars(args) | {"out": str(out)}, "dataset": description, "rows": rows, "seconds": total}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
