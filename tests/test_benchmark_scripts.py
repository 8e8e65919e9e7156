"""benchmarks/longtail.py and benchmarks/multilabel.py end to end at a tiny size, as a user runs them.

Each script writes real PNG files (an image folder, a CSV) from Fashion-MNIST and runs the real
``vision-transfer`` commands on them in subprocesses; here with a few hundred images at 32 px,
one epoch, one thread per process (2 threads on a loaded 2-core machine were 10x slower).
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vision_transfer.data.sources import FASHION_MNIST_DEBIAN_ROOT

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
needs_fashion_mnist = pytest.mark.skipif(
    not any(FASHION_MNIST_DEBIAN_ROOT.glob("train-images*")), reason="Fashion-MNIST IDX files not installed"
)


def run_script(name: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    return done.stdout


def table_rows(output: str, header_start: str) -> dict[str, list[str]]:
    """The Markdown table whose header starts with ``header_start``: first cell -> the other cells."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture
def scripts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # multilabel.py imports its helpers from longtail.py


def test_long_tail_counts_decay_exponentially_from_max_to_max_over_ratio(scripts: None) -> None:
    import longtail

    counts = longtail.long_tail_counts(10, 4000, 100, seed=0)
    assert sorted(counts.tolist(), reverse=True) == [4000, 2398, 1438, 862, 517, 310, 186, 111, 67, 40]
    assert counts.tolist() != sorted(counts.tolist(), reverse=True)  # the class order is shuffled (seeded)
    assert longtail.long_tail_counts(10, 4000, 100, seed=0).tolist() == counts.tolist()
    assert longtail.folder_name("T-shirt/top") == "T-shirt_top"


def test_mosaic_labels_have_one_to_four_distinct_classes(scripts: None) -> None:
    import multilabel

    rng = np.random.default_rng(0)
    draws = [multilabel.mosaic_labels(rng, 10) for _ in range(2000)]
    assert all(len(cells) == 4 for cells in draws)
    distinct = np.bincount([len(set(cells)) for cells in draws], minlength=5)
    assert distinct[0] == 0 and (distinct[1:] > 400).all(), distinct  # about 500 each of 1, 2, 3, 4
    truth = np.array([[True, False], [True, True]])
    assert multilabel.f1_scores(np.array([[True, False], [False, True]]), truth) == pytest.approx((0.8, 5 / 6))


@pytest.mark.slow
@needs_fashion_mnist
def test_longtail_script_end_to_end_tiny(tmp_path: Path) -> None:
    out = tmp_path / "longtail"
    output = run_script(
        "longtail.py",
        *("--out", str(out), "--max-per-class", "40", "--ratio", "10", "--val-per-class", "5"),
        *("--test-per-class", "10", "--image-size", "32", "--epochs", "1", "--num-workers", "0", "--threads", "1"),
        *("--options", "logit_adj_posthoc", "plain_ce"),
    )
    assert "imbalance ratio (largest / smallest class in train): 10.0" in output  # from vision-transfer check-data
    counts = json.loads((out / "data" / "dataset.json").read_text())["counts"]
    assert sorted(counts["train"].values()) == [4, 5, 7, 9, 11, 14, 19, 24, 31, 40]
    assert set(counts["val"].values()) == {5} and set(counts["test"].values()) == {10}
    assert len(list((out / "data" / "train").rglob("*.png"))) == sum(counts["train"].values())

    rows = table_rows(output, "| option |")
    assert list(rows) == ["plain_ce", "logit_adj_posthoc"]  # the baseline first
    for option, cells in rows.items():
        values = [float(v) for v in cells[1:5]]  # top-1, balanced acc, macro-F1, rare-class recall
        assert all(0.0 <= v <= 1.0 for v in values), (option, values)
    balanced = {option: float(cells[2]) for option, cells in rows.items()}
    gain = float(rows["logit_adj_posthoc"][5])
    assert gain == pytest.approx(100 * (balanced["logit_adj_posthoc"] - balanced["plain_ce"]), abs=0.011)
    assert rows["plain_ce"][5] == ""
    assert re.search(r"goal of >= 5 points: (met|NOT met)\.", output)
    results = json.loads((out / "results.json").read_text())
    assert {r["option"] for r in results["rows"]} == {"plain_ce", "logit_adj_posthoc"}
    for row in results["rows"]:
        assert (Path(row["run_dir"]) / "checkpoints" / "best.ckpt").is_file()
        assert len(row["per_class_recall"]) == 10


@pytest.mark.slow
@needs_fashion_mnist
def test_multilabel_script_end_to_end_tiny(tmp_path: Path) -> None:
    out = tmp_path / "multilabel"
    output = run_script(
        "multilabel.py",
        *("--out", str(out), "--train", "160", "--val", "40", "--test", "40", "--image-size", "32"),
        *("--epochs", "1", "--num-workers", "0", "--threads", "1"),
    )
    with (out / "data" / "labels.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["split"] for r in rows].count("test") == 40 and len(rows) == 240
    assert all(1 <= len(r["labels"].split(";")) <= 4 for r in rows)
    from PIL import Image

    with Image.open(out / "data" / rows[0]["path"]) as image:
        assert image.size == (56, 56)

    table = table_rows(output, "| model |")
    names = list(table)
    assert names[0] == "fine-tune (1 epochs)" and names[1].startswith("linear probe (sgd")
    values = [float(v) for v in table["fine-tune (1 epochs)"][:5]]  # mAP, micro/macro-F1 at 0.5 and tuned
    assert all(0.0 <= v <= 1.0 for v in values), values
    results = json.loads((out / "results.json").read_text())
    row, fit = results["rows"][0], results["fit_test_metrics"]
    # the F1 computed from `vision-transfer predict`'s probabilities at the tuned thresholds is the fit's own
    assert row["f1_micro_tuned"] == pytest.approx(fit["test/f1_micro"], abs=1e-3)
    assert row["f1_macro_tuned"] == pytest.approx(fit["test/f1_macro"], abs=1e-3)
    assert row["map"] == pytest.approx(fit["test/map"], abs=2e-3)
    assert len(results["per_class_ap"]) == 10
    # the probe's row, from `vision-transfer predict` with probe.ckpt, is the probe's own test mAP
    assert results["rows"][1]["map"] == pytest.approx(results["probe"]["result"]["test_map"], abs=2e-3)
