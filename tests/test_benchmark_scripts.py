"""benchmarks/longtail.py and benchmarks/multilabel.py end to end at a tiny size, as a user runs them.

Each script writes real PNG files (an image folder, a CSV) from Fashion-MNIST and runs the real
``vision-transfer`` commands on them in subprocesses; the session runs each once at the tiny size of
``tests/conftest.py`` (``longtail_run``, ``multilabel_run``), which notebook 04's test reuses.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import BENCHMARKS, LONGTAIL_TINY, ScriptRun
from vision_transfer.data.sources import FASHION_MNIST_DEBIAN_ROOT

needs_fashion_mnist = pytest.mark.skipif(
    not any(FASHION_MNIST_DEBIAN_ROOT.glob("train-images*")), reason="Fashion-MNIST IDX files not installed"
)
OPTIONS = LONGTAIL_TINY[LONGTAIL_TINY.index("--options") + 2 :]  # after plain_ce


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
def test_longtail_script_end_to_end_tiny(longtail_run: ScriptRun) -> None:
    out, output = longtail_run.out, longtail_run.stdout
    assert "imbalance ratio (largest / smallest class in train): 10.0" in output  # from vision-transfer check-data
    counts = json.loads((out / "data" / "dataset.json").read_text())["counts"]
    assert sorted(counts["train"].values()) == [4, 5, 7, 9, 11, 14, 19, 24, 31, 40]
    assert set(counts["val"].values()) == {5} and set(counts["test"].values()) == {10}
    assert len(list((out / "data" / "train").rglob("*.png"))) == sum(counts["train"].values())

    rows = table_rows(output, "| option |")
    assert list(rows) == ["plain_ce", *OPTIONS]  # the baseline first, then the options in the order given
    for option, cells in rows.items():
        values = [float(v) for v in cells[1:5]]  # top-1, balanced acc, macro-F1, rare-class recall
        assert all(0.0 <= v <= 1.0 for v in values), (option, values)
    balanced = {option: float(cells[2]) for option, cells in rows.items()}
    for option in OPTIONS:
        gain = float(rows[option][5])
        assert gain == pytest.approx(100 * (balanced[option] - balanced["plain_ce"]), abs=0.011), option
    assert rows["plain_ce"][5] == ""
    assert re.search(r"goal of >= 5 points: (met|NOT met)\.", output)
    results = longtail_run.results
    assert {r["option"] for r in results["rows"]} == {"plain_ce", *OPTIONS}
    for row in results["rows"]:
        assert (Path(row["run_dir"]) / "checkpoints" / "best.ckpt").is_file()
        assert len(row["per_class_recall"]) == 10
    # the post-hoc option's confusion matrix was checked against `vision-transfer predict`'s (or the script stops)
    posthoc = next(r for r in results["rows"] if r["option"] == "logit_adj_posthoc")
    assert posthoc["confusion"]["source"] == "confusion_matrix.csv, equal to vision-transfer predict's"


@pytest.mark.slow
@needs_fashion_mnist
def test_multilabel_script_end_to_end_tiny(multilabel_run: ScriptRun) -> None:
    out, output = multilabel_run.out, multilabel_run.stdout
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
    results = multilabel_run.results
    row, fit = results["rows"][0], results["fit_test_metrics"]
    # the F1 computed from `vision-transfer predict`'s probabilities at the tuned thresholds is the fit's own
    assert row["f1_micro_tuned"] == pytest.approx(fit["test/f1_micro"], abs=1e-3)
    assert row["f1_macro_tuned"] == pytest.approx(fit["test/f1_macro"], abs=1e-3)
    assert row["map"] == pytest.approx(fit["test/map"], abs=2e-3)
    assert len(results["per_class_ap"]) == 10
    # the probe's row, from `vision-transfer predict` with probe.ckpt, is the probe's own test mAP
    assert results["rows"][1]["map"] == pytest.approx(results["probe"]["result"]["test_map"], abs=2e-3)


@pytest.mark.slow
@needs_fashion_mnist
def test_robust_peft_script_end_to_end_tiny(scripts: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/robust_peft.py at a tiny size, in-process: the PEFT rate chosen on val, LoRA and the full
    fine-tune at two seeds, WiSE-FT of each fine-tune and the greedy soup of the two, each scored on val,
    the clean test split and its corrupted copy; a rerun resumes from results.jsonl without training again."""
    import robust_peft  # type: ignore[import-not-found]

    args = ["--out", str(tmp_path), "--train", "60", "--val", "30", "--test", "30", "--epochs", "1",
            "--image-size", "32", "--workers", "0", "--threads", "1", "--bn-batches", "1", "--seeds", "0", "1",
            "--methods", "lora_r8", "full", "full+wise_ft", "soup_greedy", "--in-process"]  # fmt: skip
    robust_peft.main(args)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    trials = [r for r in rows if r["method"] == "lora_r8" and r["seed"] == 0]
    assert sorted(r["lr"] for r in trials) == sorted(robust_peft.PEFT_LRS)  # the rate chosen on val
    chosen = max(trials, key=lambda r: r["val_acc"])["lr"]
    assert [r["lr"] for r in rows if r["method"] == "lora_r8" and r["seed"] == 1] == [chosen]
    for row in rows:
        assert 0 <= row["id_top1"] <= 1 and 0 <= row["corrupted_top1"] <= 1 and row["test_images"] == 30
        assert row["corrupted_top1"] == pytest.approx(sum(row["per_severity"].values()) / 15)
    lora = next(r for r in rows if r["method"] == "lora_r8")
    full = next(r for r in rows if r["method"] == "full")
    assert lora["trainable"] < 0.1 * full["trainable"] and full["trainable"] == full["total"]
    wise = [r for r in rows if r["method"] == "full+wise_ft"]
    assert len(wise) == 2 and all(len(r["alphas"]) == 11 for r in wise)
    for r in wise:  # alpha chosen on val; alpha 1 is the fine-tune itself
        best = max(a["val"] for a in r["alphas"])
        assert next(a for a in r["alphas"] if a["alpha"] == r["alpha"])["val"] == best
        assert r["alphas"][-1]["test"] == pytest.approx(
            next(f for f in rows if f["method"] == "full" and f["seed"] == r["seed"])["id_top1"]
        )
    (soup,) = [r for r in rows if r["method"] == "soup_greedy"]
    assert soup["val_acc"] >= max(r["val_acc"] for r in rows if r["method"] == "full") - 1e-9
    table = table_rows(capsys.readouterr().out, "| method |")
    assert list(table) == ["lora_r8", "full", "full+wise_ft", "soup_greedy"]
    assert table["lora_r8"][-1] == "2" and table["soup_greedy"][-1] == "1"
    robust_peft.main(args)  # resumes: nothing new
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(rows)


@pytest.mark.slow
@needs_fashion_mnist
def test_inspect_data_script_finds_the_planted_copies_tiny(
    scripts: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """benchmarks/inspect_data.py at a tiny size (detection only): the planted exact copies of test images in
    train are found as leaks, the label-issue scores are fractions, and the threshold table covers each one."""
    import inspect_data  # type: ignore[import-not-found]

    inspect_data.main(["--out", str(tmp_path), "--train", "200", "--val", "60", "--test", "60", "--plant-dups", "6",
                       "--seeds", "0", "--image-size", "32", "--threads", "1", "--no-fit"])  # fmt: skip
    (row,) = json.loads((tmp_path / "results.json").read_text())
    assert row["exact_recall"] == 1.0  # an exact copy has the same features: similarity 1
    for key in ("label_precision", "label_recall", "label_precision_at_k", "near_recall", "leak_precision"):
        assert 0.0 <= row[key] <= 1.0, key
    assert sorted(float(t) for t in row["by_threshold"]) == list(inspect_data.THRESHOLDS)
    recalls = [row["by_threshold"][t]["near_recall"] for t in sorted(row["by_threshold"], key=float)]
    assert recalls == sorted(recalls, reverse=True)  # a higher threshold finds no more
    assert "near-duplicate threshold calibration" in capsys.readouterr().out


@pytest.mark.slow
@needs_fashion_mnist
def test_deploy_script_measures_every_export_side_by_side_tiny(
    scripts: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """benchmarks/deploy.py at a tiny size: a fine-tune, its exports (int8 gated and written), each file's size,
    throughput and top-1 on the same images, and the int8/fp32 ratios."""
    import deploy  # type: ignore[import-not-found]

    from vision_transfer.export.quantize import RECIPES

    deploy.main(["--out", str(tmp_path), "--train", "60", "--val", "30", "--test", "30", "--epochs", "1",
                 "--image-size", "32", "--threads", "1", "--calibration-images", "16",
                 "--seconds", "0.05"])  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["export"]: r for r in results["rows"]}
    torch_int8 = f"TorchScript int8 ({results['torch_int8_gate']['recipe']})"
    assert list(rows) == ["ONNX fp32", *(f"ONNX int8 ({r})" for r in RECIPES), "TorchScript fp32", torch_int8,
                          "PyTorch eager fp32"]  # fmt: skip
    assert results["torch_int8_gate"]["recipe"] == "static"  # lite0, a convolutional network: static quantization
    for r in rows.values():
        assert r["img_s_batch1"] > 0 and r["img_s_batch64"] > 0 and 0 <= r["test_top1"] <= 1
    # every fp32 runtime runs one graph: the same predictions on the same images
    assert rows["ONNX fp32"]["test_top1"] == rows["TorchScript fp32"]["test_top1"] == rows["PyTorch eager fp32"][
        "test_top1"]  # fmt: skip
    assert rows["ONNX int8 (all)"]["size_mb"] < rows["ONNX fp32"]["size_mb"] / 2.5
    assert rows[torch_int8]["size_mb"] < rows["TorchScript fp32"]["size_mb"] / 2.5
    gate = results["torch_int8_gate"]  # scored through the file written, against the fp32 TorchScript file
    assert gate["val_fp32"] == pytest.approx(100 * rows["TorchScript fp32"]["val_top1"], abs=1e-3)
    assert gate["val_int8"] == pytest.approx(100 * rows[torch_int8]["val_top1"], abs=1e-3)
    assert results["int8_gate"]["val_fp32"] == pytest.approx(100 * rows["ONNX fp32"]["val_top1"], abs=1e-3)
    assert results["int8_gate"]["recipe"] in RECIPES and "The gate's choice" in capsys.readouterr().out


@pytest.mark.slow
@needs_fashion_mnist
def test_distil_script_trains_a_teacher_and_both_students_tiny(
    scripts: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """benchmarks/distil.py at a tiny size: the lite2 teacher, lite0 alone and lite0 distilled from it by logits
    (on the fly, and with kd_cache: the same test top-1 up to the teacher's float noise) and by logits +
    features (the same seed, the same recipe), each scored on test; the students' checkpoints
    record the teacher's path and the feature weight."""
    import distil  # type: ignore[import-not-found]

    from vision_transfer.checkpoint import read_checkpoint

    distil.main(["--out", str(tmp_path), "--train", "60", "--val", "30", "--test", "30", "--epochs", "1",
                 "--image-size", "32", "--threads", "1", "--seeds", "0", "--kd-cache"])  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    roles = [r["role"] for r in results["rows"]]
    assert roles == ["teacher", "student alone", "student <- teacher (logit KD)",
                     "student <- teacher (logit KD, kd_cache)", "student <- teacher (logit + feature KD)"]  # fmt: skip
    teacher, alone, distilled, cached, features = results["rows"]
    # the same training up to the teacher's float noise: at most one of the 30 test images changes
    assert cached["test_top1_change"] == cached["test_top1"] - distilled["test_top1"]
    assert abs(cached["test_top1_change"]) <= 1 / 30 + 1e-6
    assert len(list((tmp_path / "teacher_cache" / "teacher").glob("*.safetensors"))) == 1
    assert teacher["backbone"] == "tf_efficientnet_lite2" and alone["backbone"] == distilled["backbone"]
    assert all(0 <= r["test_top1"] <= 1 for r in results["rows"])
    settings = read_checkpoint(distilled["checkpoint"])[0].settings
    assert settings["teacher"] == teacher["checkpoint"] and read_checkpoint(alone["checkpoint"])[0].settings[
        "teacher"] is None  # fmt: skip
    assert settings["kd_feature_weight"] == 0 and read_checkpoint(features["checkpoint"])[0].settings[
        "kd_feature_weight"] == 3000  # fmt: skip
    printed = capsys.readouterr().out
    assert "| tf_efficientnet_lite0 | tf_efficientnet_lite2 |" in printed
    assert "| tf_efficientnet_lite0 | tf_efficientnet_lite2 (logit + feature KD) |" in printed
    assert "| tf_efficientnet_lite0 | tf_efficientnet_lite2 (logit KD, kd_cache) |" in printed


def test_data_speed_script_measures_every_pipeline_side_by_side_tiny(
    scripts: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """benchmarks/data_speed.py at a tiny size: every pipeline (today's, reduced, fast, prepared chunks, timm's)
    on the same JPEGs, train and eval, per worker (the pooled columns start and stop 14 worker pools: 20-40 s
    here for no more logic), and its ratio to today's."""
    import data_speed  # type: ignore[import-not-found]

    data_speed.main(["--images", "32", "--image-size", "32", "--short-side", "40", "--workers", "0",
                     "--batch-size", "8", "--output", str(tmp_path)])  # fmt: skip
    results = json.loads((tmp_path / "results_32.json").read_text())
    names = [r["pipeline"] for r in results["rows"]]
    assert len(names) == 7 and names[0].startswith("image folder, PIL (today") and names[-1].startswith("timm's")
    for row in results["rows"]:
        assert set(row) == {"pipeline", "train_1", "eval_1"} and row["train_1"] > 0 and row["eval_1"] > 0
    out = capsys.readouterr().out
    table = table_rows(out, "| pipeline |")
    assert list(table) == names and all(cells[4] == f"{float(cells[4][:-1]):.2f}x" for cells in table.values())
    assert all(cells[1] == cells[3] == "-" for cells in table.values())  # no pooled columns measured
    assert "prepare (32 images, short side 40, 1 processes)" in out  # what prepare ran with, not --workers 0
    assert table[names[0]][4:] == ["1.00x", "1.00x"]


def test_int8_families_script_quantizes_or_refuses_by_name_each_kind_of_family(
    scripts: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """benchmarks/int8_families.py on a family of each outcome its full run (every family) found: a plain CNN
    and convmixer (``Conv2d(padding="same")``, which torch.ao's int8 convolution took for a crash until given in
    numbers) quantize statically; hiera is refused by torch.fx's tracer, repvit by torch.ao's int8 kernels,
    beit's dynamic recipe by the check run (its attention reads its Linear's ``.weight``, a crash before). None
    may end otherwise: the script exits 1 on an exception that is not a refusal."""
    import int8_families  # type: ignore[import-not-found]

    int8_families.main(["--out", str(tmp_path), "--families", "resnet", "convmixer", "hiera", "repvit", "beit"])
    rows = {r["family"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert all("crash" not in r for r in rows.values()), rows
    for family in ("resnet", "convmixer"):
        assert rows[family]["order"] == ["static"] and rows[family]["static"]["outcome"] == "ok"
        assert rows[family]["static"]["relative_error"] < 0.2
    assert "torch.fx cannot trace" in rows["hiera"]["static"]["reason"] and rows["hiera"]["dynamic"]["outcome"] == "ok"
    assert "torch.ao cannot quantize" in rows["repvit"]["static"]["reason"]
    assert rows["beit"]["order"] == ["dynamic", "static"]
    assert "int8 PyTorch dynamic: torch.ao cannot quantize" in rows["beit"]["dynamic"]["reason"]
    assert "5 families" in capsys.readouterr().out
