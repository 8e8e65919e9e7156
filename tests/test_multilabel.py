"""Multi-label data: CSVs, training, per-class thresholds, predict, load_classifier and export."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import CLASSES, tiny_fit_args
from tests.test_cli import run_cli
from vision_transfer.data.sources import read_csv, stratification_key, stratified_split
from vision_transfer.errors import DataError
from vision_transfer.inference import best_f1_thresholds


def test_labels_column_and_one_column_per_class_read_the_same(multilabel_csv: Path) -> None:
    source = read_csv(multilabel_csv)
    assert source.task == "multilabel" and source.class_names == list(CLASSES)
    labels = source.splits["train"].labels
    assert labels.shape == (60, 3) and set(np.unique(labels)) == {0, 1}
    with multilabel_csv.open() as f:
        rows = list(csv.DictReader(f))
    wide = multilabel_csv.with_name("wide.csv")
    with wide.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", *CLASSES])
        writer.writeheader()
        writer.writerows({"path": r["path"], **{c: int(c in r["labels"].split(";")) for c in CLASSES}} for r in rows)
    assert np.array_equal(read_csv(wide, label_columns=list(CLASSES)).splits["train"].labels, labels)


def test_multilabel_split_keeps_every_class_in_train(multilabel_csv: Path) -> None:
    labels = read_csv(multilabel_csv).splits["train"].labels
    train, val, test = stratified_split(stratification_key(labels), [0.2, 0.2], seed=0)
    assert (labels[train].sum(axis=0) > 0).all() and len(train) + len(val) + len(test) == 60


def test_csv_errors_name_the_row(tmp_path: Path, multilabel_csv: Path) -> None:
    single = tmp_path / "single.csv"
    single.write_text(f"path,label\n{multilabel_csv.parent / '0.png'},circle\n{multilabel_csv.parent / '1.png'},\n")
    with pytest.raises(DataError, match=r"single.csv: empty 'label' on line 3; a single-label dataset needs a class"):
        read_csv(single)
    wide = tmp_path / "wide.csv"
    wide.write_text(f"path,a,b\n{multilabel_csv.parent / '0.png'},1,yes\n")
    with pytest.raises(DataError, match=r"wide.csv: line 2, column 'b': 'yes' is not 0 or 1"):
        read_csv(wide, label_columns=["a", "b"])


def test_a_class_without_a_positive_in_train_is_refused(tmp_path: Path, multilabel_csv: Path) -> None:
    from vision_transfer.datamodules import CsvDataModule

    rows = list(csv.DictReader(multilabel_csv.open()))
    rows[0]["labels"] += ";triangle"  # the only positive of a class...
    rows = [{**r, "split": "test" if i == 0 else "train"} for i, r in enumerate(rows)]  # ...is in test
    path = multilabel_csv.with_name("rare.csv")
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "labels", "split"])
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DataError, match=r"class\(es\) 'triangle' have no positive example in the training split"):
        CsvDataModule(str(path), num_workers=0).prepare_splits()


def test_thresholds_maximise_each_class_f1() -> None:
    probs = torch.tensor([[0.9, 0.2], [0.7, 0.6], [0.4, 0.55], [0.3, 0.1], [0.2, 0.58]])
    targets = torch.tensor([[1, 0], [1, 1], [1, 1], [0, 0], [0, 1]])
    thresholds, no_positive = best_f1_thresholds(probs, targets)
    # class 0: 0.4 and above catches all three positives and nothing else (F1 1); midway to 0.3
    # class 1: 0.55 and above: three positives, no negative (F1 1); midway to 0.2
    assert thresholds.tolist() == pytest.approx([0.35, 0.375]) and no_positive == []
    _, none = best_f1_thresholds(probs, torch.zeros_like(targets))
    assert none == [0, 1]


def test_multilabel_fit_predict_load_and_export_agree(
    tmp_path: Path, multilabel_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vision_transfer import load_classifier
    from vision_transfer.export import export_checkpoint

    monkeypatch.chdir(tmp_path)
    data = ["--data=vision_transfer.datamodules.CsvDataModule", f"--data.init_args.csv_path={multilabel_csv}"]
    args = tiny_fit_args(
        data, tmp_path, "--trainer.max_epochs=3", "--model.lr=0.01", "--data.init_args.val_fraction=0.2"
    )
    assert run_cli(args) == 0
    run = next((tmp_path / "runs" / "lightning_logs").glob("version_*"))
    with (run / "metrics.csv").open() as f:
        columns = set(next(csv.reader(f)))
    assert {"val/map", "val/f1_micro", "test/map", "test/f1_macro"} <= columns and "val/acc" not in columns
    best = run / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(best, weights_only=True)
    assert checkpoint["hyper_parameters"]["task"] == "multilabel"
    thresholds = checkpoint["state_dict"]["thresholds"]
    assert not torch.equal(thresholds, torch.full((3,), 0.5))  # tuned on val after fit
    assert checkpoint["vision_transfer"]["prediction"]["thresholds"] == pytest.approx(thresholds.tolist(), abs=1e-6)
    with (run / "per_class.csv").open() as f:
        assert [r["class"] for r in csv.DictReader(f)] == list(CLASSES)

    images = sorted(str(p) for p in multilabel_csv.parent.glob("*.png"))[:6]
    output = tmp_path / "predictions.csv"
    predict = ["predict", f"--ckpt_path={best}", f"--data.init_args.predict_paths={multilabel_csv.parent}"]
    assert run_cli([*predict, f"--prediction.output={output}"]) == 0
    with output.open() as f:
        written = {row["path"]: row for row in csv.DictReader(f)}
    classifier = load_classifier(best)
    for image, labels in zip(images, classifier.predict(images), strict=True):
        row = written[image]
        assert row["labels"] == ";".join(name for name, _ in sorted(labels, key=lambda p: CLASSES.index(p[0])))
        all_probs = [float(v) for v in row["all_probabilities"].split(";")]
        assert all(all_probs[CLASSES.index(name)] == pytest.approx(p, abs=1e-4) for name, p in labels)

    report = export_checkpoint(best, tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["multi_label"] is True and config["thresholds"] == pytest.approx(thresholds.tolist(), abs=1e-6)
    assert max(report["max_abs_diff"].values()) <= report["tolerance"]
    exported = load_classifier(tmp_path / "exported")
    assert exported.predict(images) == classifier.predict(images)

    # the model card of a multi-label export: its kind's metadata, its scores (mAP checked independently) and
    # its timm code block (sigmoids) run as a reader would
    import subprocess
    import sys

    import yaml

    from tests.test_export import _python_blocks
    from vision_transfer.app.checkpoints import recorded_datamodule
    from vision_transfer.checkpoint import read_checkpoint
    from vision_transfer.evaluation.metrics import mean_average_precision
    from vision_transfer.export.card import IMAGE_PLACEHOLDER

    # with both int8 models: each gate scores mAP, its fp32 side equal to the exported graph's val mAP
    assert run_cli(["export", str(best), "--to", str(tmp_path / "carded"), "--quantize", "int8",
                    "--calibration_images", "8", "--allow_int8_drop"]) == 0  # fmt: skip
    gates = json.loads((tmp_path / "carded" / "export_report.json").read_text())["int8"]
    val = recorded_datamodule(read_checkpoint(best)[0]).prepare_splits()["val"]
    val_probs = classifier.prediction_head().probabilities(classifier.preprocess([str(p) for p in val.items]))
    expected = 100 * float(mean_average_precision(val_probs, torch.from_numpy(val.labels)))
    assert sorted(gates) == ["onnx", "torchscript"]
    for gate in gates.values():
        assert gate["metric"] == "mAP" and gate["val_fp32"] == pytest.approx(expected, abs=2e-3)
        assert 0 <= gate["val_int8"] <= 100 and gate["validation_images"] == len(val)
    card = (tmp_path / "carded" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["metrics"] == ["mean_average_precision"] and "multi-label" in meta["tags"]
    assert "| split | images | mAP | micro-F1 |" in card
    test = recorded_datamodule(read_checkpoint(best)[0]).prepare_splits()["test"]
    probs = classifier.prediction_head().probabilities(classifier.preprocess([str(p) for p in test.items]))
    assert f"| test | {len(test)} | {mean_average_precision(probs, torch.from_numpy(test.labels)):.4f} | " in card
    for library in ("timm.create_model", "transformers"):  # the transformers pipeline with sigmoid scores
        block = next(b for b in _python_blocks(card) if library in b)
        code = block.replace(IMAGE_PLACEHOLDER, f"IMAGE = {images[0]!r}")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path / "carded")
        assert result.returncode == 0 and any(name in result.stdout for name in CLASSES), result.stderr[-2000:]
    assert 'function_to_apply="sigmoid"' in card


@pytest.mark.parametrize("solver", ["lbfgs", "sgd"])
def test_probe_command_on_multilabel_data_reports_map_and_predict_uses_its_thresholds(
    tmp_path: Path, multilabel_csv: Path, solver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import TINY_BACKBONE, TINY_SIZE

    monkeypatch.chdir(tmp_path)
    probe = [
        "probe", f"--backbone={TINY_BACKBONE}", "--weights=none", f"--image_size={TINY_SIZE}",
        "--data=vision_transfer.datamodules.CsvDataModule", f"--data.csv_path={multilabel_csv}",
        "--data.num_workers=0", f"--cache_dir={tmp_path / 'cache'}", "--output=probe_run", f"--solver={solver}",
        "--class_weight=balanced",
        *(["--c_grid_size=5"] if solver == "lbfgs" else ["--epochs=3", "--lrs=[0.1]", "--wds=[0.0]"]),
    ]  # fmt: skip
    assert run_cli(probe) == 0
    report = json.loads((tmp_path / "probe_run" / "probe.json").read_text())
    assert report["task"] == "multilabel" and report["class_weight"] == "balanced"
    assert 0 <= report["val_map"] <= 1 and 0 <= report["test_map"] <= 1 and report["val_acc"] is None
    output = tmp_path / "preds.csv"
    predict = [
        "predict", f"--ckpt_path={tmp_path / 'probe_run' / 'probe.ckpt'}",
        f"--data.init_args.predict_paths={multilabel_csv.parent}", f"--prediction.output={output}",
        "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    assert run_cli(predict) == 0
    checkpoint = torch.load(tmp_path / "probe_run" / "probe.ckpt", weights_only=True)
    thresholds = checkpoint["vision_transfer"]["prediction"]["thresholds"]
    with output.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 60
    for row in rows:  # every label at or above its class's threshold, and only those
        probabilities = dict(zip(CLASSES, map(float, row["all_probabilities"].split(";")), strict=True))
        expected = {c for c, p in probabilities.items() if p >= thresholds[CLASSES.index(c)]}
        assert set(filter(None, row["labels"].split(";"))) == expected


def test_benchmark_grid_reports_map_for_a_multilabel_dataset(tmp_path: Path, multilabel_csv: Path) -> None:
    from tests.conftest import TINY_BACKBONE

    config = tmp_path / "grid.yaml"
    config.write_text(
        f"""
backbones:
  - {{name: {TINY_BACKBONE}, weights: none}}
datasets:
  - name: shapes_multilabel
    data:
      class_path: vision_transfer.datamodules.CsvDataModule
      init_args: {{csv_path: {multilabel_csv}, num_workers: 0}}
seeds: [0]
protocols: [linear_probe]
image_size: 32
solver: lbfgs
c_grid_size: 5
class_weight: balanced
output: {tmp_path / "bench"}
cache_dir: {tmp_path / "cache"}
"""
    )
    assert run_cli(["benchmark", f"--config={config}"]) == 0
    with (tmp_path / "bench" / "results.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert 0 <= float(row["map"]) <= 1 and row["top1"] == "" and row["balanced_acc"] == ""
    assert "mAP" in (tmp_path / "bench" / "summary.md").read_text()
