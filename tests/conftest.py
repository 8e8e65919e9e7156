"""Tiny, seeded fixtures: image folders and CSVs generated on the fly, a tiny timm model at 32 px."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if os.environ.get("PYTEST_XDIST_WORKER"):
    # before numpy, scipy or torch load their BLAS: a thread pool is sized when its library loads, so the
    # OMP_NUM_THREADS set in pytest_configure came too late for OpenBLAS (two 2-thread BLAS pools on two
    # cores made scikit-learn's newton-cg fits in test_probe.py take 498 s instead of seconds)
    for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_variable] = "1"

import numpy as np
import pytest
import torch
from PIL import Image

TINY_BACKBONE = "test_efficientnet"  # timm's own tiny test architecture, with BatchNorm
TINY_SIZE = 32
CLASSES = ("circle", "square", "stripes")


def tiny_data(root: Path | str, **options: Any) -> Any:
    """An ``ImageFolderDataModule`` over ``root`` with the tiny model's preprocessing (8 per batch, no workers)."""
    from vision_transfer.backbones import preprocessing
    from vision_transfer.datamodules import ImageFolderDataModule

    config = preprocessing(TINY_BACKBONE, "none", TINY_SIZE)
    return ImageFolderDataModule(str(root), **{"batch_size": 8, "num_workers": 0, "data_config": config, **options})


def tiny_model(data: Any, **options: Any) -> Any:
    """The tiny model (random weights, 32 px) built for ``data`` by ``ImageClassifier.for_data``."""
    from vision_transfer.tasks import ImageClassifier

    defaults = {"backbone": TINY_BACKBONE, "weights": "none", "image_size": TINY_SIZE}
    return ImageClassifier.for_data(data, **{**defaults, **options})


def make_image(kind: str, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """A noisy RGB image whose class is visible in its shape, so tiny models can learn it."""
    image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    if kind == "circle":
        mask = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    elif kind == "square":
        mask = (abs(yy - size / 2) < size / 4) & (abs(xx - size / 2) < size / 4)
    else:
        mask = (xx // 5) % 2 == 0
    image[mask] = rng.integers(180, 255, 3, dtype=np.uint8)
    return image


def write_folder(root: Path, per_class: int = 8, seed: int = 0, classes: tuple[str, ...] = CLASSES) -> Path:
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(make_image(name, rng)).save(root / name / f"{name}_{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Three classes of eight 40x40 PNGs, no split folders."""
    return write_folder(tmp_path / "images")


def make_multilabel_image(present: set[str], rng: np.random.Generator, size: int = 40) -> np.ndarray:
    image = rng.integers(0, 50, (size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    if "stripes" in present:
        image[(xx // 4) % 2 == 0] = (90, 90, 200)
    if "circle" in present:
        image[(yy - 12) ** 2 + (xx - 12) ** 2 < 64] = (250, 60, 60)
    if "square" in present:
        image[(abs(yy - 28) < 6) & (abs(xx - 28) < 6)] = (60, 250, 60)
    return image


@pytest.fixture
def multilabel_csv(tmp_path: Path) -> Path:
    """60 images with any subset of three shapes, a ``labels`` column of ``;``-separated names."""
    rng = np.random.default_rng(0)
    root = tmp_path / "multilabel"
    root.mkdir()
    rows = []
    for i in range(60):
        present = {c for c in CLASSES if rng.random() < 0.5} or {CLASSES[i % 3]}
        Image.fromarray(make_multilabel_image(present, rng)).save(root / f"{i}.png")
        rows.append({"path": f"{i}.png", "labels": ";".join(sorted(present))})
    path = root / "labels.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "labels"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def split_folder(tmp_path: Path) -> Path:
    """``train/``, ``val/`` and ``test/`` folders, each with the three classes."""
    root = tmp_path / "split_images"
    for split, n, seed in (("train", 8, 0), ("val", 3, 1), ("test", 3, 2)):
        write_folder(root / split, per_class=n, seed=seed)
    return root


@pytest.fixture
def csv_dataset(image_folder: Path) -> Path:
    """A ``path,label`` CSV beside the images, paths relative to it."""
    path = image_folder / "labels.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for image in sorted(image_folder.rglob("*.png")):
            writer.writerow([image.relative_to(image_folder).as_posix(), image.parent.name])
    return path


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n 2``, as scripts/test.sh runs) each worker keeps to one CPU thread, its
    subprocesses too: two workers of one thread each, not two of two fighting for two cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)  # any BLAS already loaded (a plugin may import numpy before this file)
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Any:
    """A test (or the benchmark script it runs in-process) that sets torch's threads leaves them as it
    found them: two threads left behind on a worker made every later test there fight the other worker."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# the session-scoped runs below: every test that reads one runs on the worker that made it (made once)
SHARED_RUNS = {"tiny_run": "tiny_run", "longtail_run": "benchmark_runs", "multilabel_run": "benchmark_runs"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        group = next((g for name, g in SHARED_RUNS.items() if name in getattr(item, "fixturenames", ())), None)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_fit_args(data_args: list[str], tmp_path: Path, *extra: str) -> list[str]:
    """CLI arguments for a fast fit of the tiny model on a generated dataset."""
    return [
        "fit",
        f"--model.backbone={TINY_BACKBONE}",
        "--model.weights=none",
        f"--model.image_size={TINY_SIZE}",
        *data_args,
        "--data.init_args.batch_size=8",
        "--data.init_args.num_workers=0",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        *extra,
    ]


# -- session-scoped runs: trained once, shared by every test that only reads them ------------------------
@dataclass(frozen=True)
class TinyRun:
    """One ``vision-transfer fit`` of the tiny model on ``data`` (train/val/test folders), 2 epochs, then
    its test of the best checkpoint: the run folder, its checkpoint, the command's stdout and which
    VisionTransferCLI subcommand methods ran. Read-only: copy files into ``tmp_path`` to change them."""

    data: Path
    run_dir: Path
    best: Path
    stdout: str
    subcommands: tuple[str, ...]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    from vision_transfer.app.lightning_cli import VisionTransferCLI
    from vision_transfer.cli import main

    root = tmp_path_factory.mktemp("tiny_run")
    data = root / "split_images"
    for split, n, seed in (("train", 8, 0), ("val", 3, 1), ("test", 3, 2)):
        write_folder(data / split, per_class=n, seed=seed)
    calls: list[str] = []
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.chdir(root)
        for name in ("fit", "test"):  # records which of the CLI's own subcommand methods run
            original = getattr(VisionTransferCLI, name)

            def wrapped(self, *args, _name=name, _original=original, **kwargs):  # type: ignore[no-untyped-def]
                calls.append(_name)
                return _original(self, *args, **kwargs)

            patch.setattr(VisionTransferCLI, name, wrapped)
        torch.manual_seed(0)
        args = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={data}"]
        try:
            main(tiny_fit_args(args, root, "--trainer.max_epochs=2"))
        except SystemExit as e:
            assert not e.code, f"tiny fit failed with exit code {e.code}: {stdout.getvalue()[-3000:]}"
    run_dir = next((root / "runs" / "lightning_logs").glob("version_*"))
    return TinyRun(data, run_dir, run_dir / "checkpoints" / "best.ckpt", stdout.getvalue(), tuple(calls))


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# The tiny size of benchmarks/longtail.py and benchmarks/multilabel.py: a few hundred images at 32 px,
# one epoch, one thread (2 threads on a loaded 2-core machine were 10x slower), the vision-transfer commands
# in the script's own process (--in-process: one torch import, not one per command; the console script
# itself is tested in test_cli). Notebook 04's small mode runs the same commands (its options are a subset
# of these) in subprocesses, reusing these runs.
LONGTAIL_TINY = (
    *("--max-per-class", "40", "--ratio", "10", "--val-per-class", "5", "--test-per-class", "10"),
    *("--image-size", "32", "--epochs", "1", "--num-workers", "0", "--threads", "1", "--in-process"),
    *("--options", "plain_ce", "logit_adj_posthoc", "logit_adj_loss"),
)
MULTILABEL_TINY = (
    *("--train", "160", "--val", "40", "--test", "40", "--image-size", "32"),
    *("--epochs", "1", "--num-workers", "0", "--threads", "1", "--in-process"),
)


@dataclass(frozen=True)
class ScriptRun:
    """A benchmark script's run: its ``--out`` folder, its stdout and its ``results.json`` as written then
    (notebook 04 rewrites results.json when it reuses the runs; the data and run folders stay as they are)."""

    out: Path
    stdout: str
    results: dict[str, Any]


def run_benchmark_script(name: str, out: Path, *args: str) -> ScriptRun:
    """``python benchmarks/<name> --out <out> <args>``, as a user runs it; it must succeed."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), "--out", str(out), *args],
        cwd=BENCHMARKS.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    return ScriptRun(out, done.stdout, json.loads((out / "results.json").read_text()))


@pytest.fixture(scope="session")
def benchmark_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder holding the session's tiny benchmark script runs (``longtail/``, ``multilabel/``)."""
    return tmp_path_factory.mktemp("benchmarks")


@pytest.fixture(scope="session")
def longtail_run(benchmark_runs: Path) -> ScriptRun:
    """benchmarks/longtail.py at ``LONGTAIL_TINY``: plain CE, post-hoc and loss logit adjustment."""
    return run_benchmark_script("longtail.py", benchmark_runs / "longtail", *LONGTAIL_TINY)


@pytest.fixture(scope="session")
def multilabel_run(benchmark_runs: Path) -> ScriptRun:
    """benchmarks/multilabel.py at ``MULTILABEL_TINY``: the fine-tune and the linear probe."""
    return run_benchmark_script("multilabel.py", benchmark_runs / "multilabel", *MULTILABEL_TINY)
