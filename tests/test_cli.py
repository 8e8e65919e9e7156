"""The ``vision-transfer`` command: every shipped config, fit -> test -> predict, and bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import CLASSES, TINY_BACKBONE, TINY_SIZE, TinyRun, tiny_fit_args, write_folder
from vision_transfer.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(c for c in (REPO / "configs").glob("*.yaml") if not c.stem.startswith("benchmark"))
BENCHMARK_CONFIGS = sorted((REPO / "configs").glob("benchmark*.yaml"))


def run_cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _png_ok(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(path).size[0] > 100


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_runs(
    config: Path, tmp_path: Path, image_folder: Path, csv_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    if config.stem == "prepared":  # its data is written by `prepare` first, as its header says
        source = ["--data=ImageFolderDataModule", f"--data.init_args.root={image_folder}"]
        assert run_cli(["prepare", *source, f"--output={tmp_path / 'prepared'}", "--short_side=32"]) == 0
    overrides = {
        "image_folder": [f"--data.init_args.root={image_folder}"],
        "csv": [f"--data.init_args.csv_path={csv_dataset}"],
        "hf": [f"--data.init_args.dataset={image_folder}"],  # an image folder, read by the imagefolder builder
        "prepared": [f"--data.init_args.path={tmp_path / 'prepared'}"],
    }.get(config.stem, ["--data.init_args.max_train_samples=200", "--data.init_args.max_test_samples=100"])
    code = run_cli(
        [
            "fit",
            f"--config={config}",
            *overrides,
            "--trainer.fast_dev_run=true",
            "--trainer.enable_progress_bar=false",
            "--data.init_args.num_workers=0",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        ]
    )
    assert code == 0


@pytest.mark.slow
@pytest.mark.parametrize("config", BENCHMARK_CONFIGS, ids=[c.stem for c in BENCHMARK_CONFIGS])
def test_every_shipped_benchmark_config_runs(config: Path, tmp_path: Path, image_folder: Path) -> None:
    """The config's real backbones and protocols, on one seed of a tiny dataset, a short C grid and
    two few-shot episodes."""
    tiny = (
        f"[{{name: shapes, data: {{class_path: vision_transfer.datamodules.ImageFolderDataModule, "
        f"init_args: {{root: {image_folder}, num_workers: 0}}}}}}]"
    )
    args = [f"--config={config}", f"--datasets={tiny}", "--seeds=[0]"]
    if "solver: sgd" not in config.read_text():  # a short C grid for L-BFGS (SGD refuses one)
        args.append("--c_grid_size=3")
    if "fewshot" in config.read_text():  # 2 episodes, not 20: the count proves nothing; 20 were 28 of 49 s
        args.append("--fewshot_episodes=2")
    args += [f"--output={tmp_path / 'bench'}", f"--cache_dir={tmp_path / 'cache'}"]
    assert run_cli(["benchmark", *args]) == 0
    with (tmp_path / "bench" / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    protocols = {r["protocol"] for r in rows}
    assert len(rows) == 4 * len(protocols) and {r["dataset"] for r in rows} == {"shapes"}
    assert protocols == {"linear_probe", "knn", "fewshot"}


def test_fit_test_predict_end_to_end(tiny_run: TinyRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's tiny fit (2 epochs on train/val/test folders), then validate, test and predict."""
    monkeypatch.chdir(tmp_path)  # validate/test/predict log into ./runs
    split_folder, run, best = tiny_run.data, tiny_run.run_dir, tiny_run.best
    out = tiny_run.stdout
    assert "test/acc" in out and "checkpoint" in out and "plots" in out and "summary.md" in out
    for name in ("curves.png", "confusion_matrix.png"):
        assert _png_ok(run / name), name
    assert (run / "config.yaml").is_file() and (run / "per_class.csv").is_file()
    with (run / "splits.csv").open() as f:
        splits = {row["split"] for row in csv.DictReader(f)}
    assert splits == {"train", "val", "test"}
    assert best.is_file() and (run / "checkpoints" / "last.ckpt").is_file()

    # validate and test from the checkpoint alone: model and data settings come from it
    for command in ("validate", "test"):
        assert run_cli([command, f"--ckpt_path={best}", "--trainer.enable_progress_bar=false"]) == 0

    output = tmp_path / "predictions.csv"
    predict = [
        "predict",
        f"--ckpt_path={best}",
        f"--data.init_args.predict_paths={split_folder / 'test'}",
        f"--prediction.output={output}",
        "--prediction.top_k=2",
        "--trainer.enable_progress_bar=false",
    ]
    assert run_cli(predict) == 0
    with output.open() as f:
        rows = list(csv.DictReader(f))
    # fit fitted a temperature on val (calibrate=true, the default): the header says so
    assert len(rows) == 9 and list(rows[0]) == ["path", "label_1", "calibrated_prob_1", "label_2", "calibrated_prob_2"]
    assert all(r["label_1"] in CLASSES and 0 < float(r["calibrated_prob_1"]) <= 1 for r in rows)
    assert all(float(r["calibrated_prob_1"]) >= float(r["calibrated_prob_2"]) for r in rows)


def _fit_folder(folder: Path, tmp_path: Path, *extra: str) -> int:
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={folder}"]
    return run_cli(tiny_fit_args(data, tmp_path, *extra))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [("zero.png", b"", "zero.png: empty file"), ("text.png", b"hello, I am text", "text.png: not an image")],
)
def test_bad_image_stops_before_training_with_its_name(
    tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes, message: str
) -> None:
    (image_folder / "circle" / name).write_bytes(content)
    assert _fit_folder(image_folder, tmp_path) == 2
    err = capsys.readouterr().err
    assert f"vision-transfer: error: {image_folder / 'circle'}/{message}" in err
    assert "Traceback" not in err


def test_truncated_image_in_a_worker_gives_one_clear_line(
    tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg")
    # The header is intact, so the setup check passes; decoding fails inside a DataLoader worker.
    (image_folder / "square" / "cut.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:700])
    code = _fit_folder(image_folder, tmp_path, "--data.init_args.num_workers=1", "--data.init_args.batch_size=32")
    err = capsys.readouterr().err
    assert code == 2 and "cut.jpg: corrupt or truncated image" in err
    assert "Traceback" not in err


def test_empty_class_folder_is_named(tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (image_folder / "nothing_here").mkdir()
    assert _fit_folder(image_folder, tmp_path) == 2
    assert "class folder(s) with no images: nothing_here" in capsys.readouterr().err


def test_csv_row_with_missing_file(tmp_path: Path, csv_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with csv_dataset.open("a") as f:
        f.write("circle/ghost.png,circle\n")
    data = ["--data=vision_transfer.datamodules.CsvDataModule", f"--data.init_args.csv_path={csv_dataset}"]
    assert run_cli(tiny_fit_args(data, tmp_path)) == 2
    assert "line 26: " in capsys.readouterr().err


def test_label_unknown_to_the_checkpoint(
    tiny_run: TinyRun, csv_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    best = tiny_run.best
    with csv_dataset.open("a") as f:
        f.write("circle/circle_0.png,triangle\n")
    code = run_cli(
        [
            "test",
            f"--ckpt_path={best}",
            "--data=vision_transfer.datamodules.CsvDataModule",
            f"--data.init_args.csv_path={csv_dataset}",
            "--data.init_args.num_workers=0",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "label(s) 'triangle' are not among the model's 3 classes" in err


def test_unknown_config_key_is_named(tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _fit_folder(image_folder, tmp_path, "--model.learning_rate=0.1") == 2
    assert "learning_rate" in capsys.readouterr().err


def test_unknown_backbone_is_one_clear_line(
    tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={image_folder}"]
    args = tiny_fit_args(data, tmp_path)
    args[1] = "--model.backbone=resnet_50"
    assert run_cli(args) == 2
    assert "backbone='resnet_50' is not a timm model. Did you mean: resnet50" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "vision-transfer"), "backbones"], capture_output=True, text=True, check=True
    )
    assert "tf_efficientnet_lite0" in result.stdout and "packaged" in result.stdout


def test_checkpoint_loads_with_weights_only(tiny_run: TinyRun) -> None:
    checkpoint = torch.load(tiny_run.best, weights_only=True)
    assert checkpoint["hyper_parameters"]["weights"] == "none"
    assert checkpoint["vision_transfer"]["initial_weights"]["kind"] == "none"


@pytest.mark.parametrize(
    ("content", "what"),
    [(b"101 dalmatians\nand more text\n", "a text file"), (b"\x89PNG\r\n\x1a\n" + bytes(64), "a PNG image")],
    ids=["text", "png"],
)
def test_a_file_that_is_no_checkpoint_is_named_as_what_it_is(
    tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str], content: bytes, what: str
) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={image_folder}"]
    assert run_cli(["validate", f"--ckpt_path={path}", *data]) == 2
    assert capsys.readouterr().err.strip() == (
        f"vision-transfer: error: {path}: not a PyTorch checkpoint or weights file (it is {what})."
    )


def test_a_checkpoint_cannot_choose_a_module_to_import(
    tmp_path: Path, tiny_run: TinyRun, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "planted.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Data: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    checkpoint = torch.load(tiny_run.best, weights_only=True)
    checkpoint["vision_transfer"]["datamodule"]["class_path"] = "planted.Data"
    torch.save(checkpoint, tmp_path / "planted.ckpt")
    assert run_cli(["validate", f"--ckpt_path={tmp_path / 'planted.ckpt'}"]) == 2
    assert "names datamodule class 'planted.Data', outside vision-transfer; refusing to import it" in (
        capsys.readouterr().err
    )
    assert not marker.exists()


def test_optimizer_flags_that_would_replace_the_schedule_are_refused(
    tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _fit_folder(image_folder, tmp_path, "--optimizer=Adam") == 2
    assert "--optimizer would replace the model's optimizer and schedule" in capsys.readouterr().err


def test_cli_predicts_with_the_checkpoints_preprocessing_as_python_does(
    tmp_path: Path, image_folder: Path, tiny_run: TinyRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vision_transfer import load_classifier

    monkeypatch.chdir(tmp_path)
    # a model trained with other preprocessing than its architecture's default (as with weights timm:<tag>)
    checkpoint = torch.load(tiny_run.best, weights_only=True)
    other = {**checkpoint["hyper_parameters"]["data_config"], "mean": [0.2, 0.3, 0.4], "std": [0.1, 0.2, 0.3]}
    other |= {"crop_pct": 0.5, "interpolation": "bilinear"}
    checkpoint["hyper_parameters"]["data_config"] = other  # its one copy
    path = tmp_path / "other.ckpt"
    torch.save(checkpoint, path)
    images = sorted(str(p) for p in (image_folder / "square").glob("*.png"))
    output = tmp_path / "predictions.csv"
    predict = ["predict", f"--ckpt_path={path}", f"--data.init_args.predict_paths={image_folder / 'square'}"]
    assert run_cli([*predict, f"--prediction.output={output}", "--prediction.top_k=3"]) == 0
    with output.open() as f:
        rows = list(csv.DictReader(f))
    # the session's run fitted a temperature on val: the probabilities are calibrated ones, in Python too
    prob = "calibrated_prob" if "calibrated_prob_1" in rows[0] else "prob"
    cli = {row["path"]: {row[f"label_{k}"]: float(row[f"{prob}_{k}"]) for k in (1, 2, 3)} for row in rows}
    python = load_classifier(path).predict(images, top_k=3)
    for image, pairs in zip(images, python, strict=True):
        assert cli[image] == pytest.approx(dict(pairs), abs=1e-4)


def test_fit_builds_the_data_with_the_models_preprocessing_and_the_model_with_the_datas_classes(
    tmp_path: Path, image_folder: Path
) -> None:
    """The argument links: the parsed datamodule arguments hold the model's preprocessing; the model is
    constructed with the datamodule's classes, task and training class counts."""
    from vision_transfer.app.lightning_cli import VisionTransferCLI
    from vision_transfer.backbones import preprocessing

    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={image_folder}"]
    args = tiny_fit_args(data, tmp_path, "--model.class_weighting=balanced")[1:]  # run=False: no subcommand
    cli = VisionTransferCLI(args=args, run=False)
    config = preprocessing(TINY_BACKBONE, "none", TINY_SIZE)
    assert cli.config["data"]["init_args"]["data_config"] == config.to_dict()
    assert cli.datamodule.data_config == config == cli.model.data_config
    assert cli.model.class_names == cli.datamodule.class_names == list(CLASSES)
    assert cli.model.task == cli.datamodule.task == "multiclass"
    assert cli.model.class_counts.tolist() == cli.datamodule.class_counts().tolist()
    assert cli.model.hparams["class_counts"] == cli.datamodule.class_counts().tolist()  # a constructor argument


def test_the_checkpoints_classes_win_for_test_and_predict(
    tiny_run: TinyRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Data with two of the checkpoint's three classes, listed in another order: its labels index the trained
    head's classes, in test and in predict, and both sides hold the checkpoint's preprocessing."""
    from vision_transfer.app.lightning_cli import VisionTransferCLI

    folder = write_folder(tmp_path / "two", per_class=10, classes=("stripes", "circle"))
    seen: dict[str, object] = {}

    def record(self: VisionTransferCLI, model: object, **kwargs: object) -> list[dict[str, float]]:
        seen[self.subcommand or ""] = self
        return []

    monkeypatch.setattr(VisionTransferCLI, "test", record)
    monkeypatch.setattr(VisionTransferCLI, "predict", record)
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={folder}"]
    ckpt = f"--ckpt_path={tiny_run.best}"
    assert run_cli(["test", ckpt, *data, "--data.init_args.num_workers=0"]) == 0
    assert run_cli(["predict", ckpt, f"--data.init_args.predict_paths={folder / 'circle'}"]) == 0
    test, predict = seen["test"], seen["predict"]
    entry_config = torch.load(tiny_run.best, weights_only=True)["hyper_parameters"]["data_config"]
    for cli in (test, predict):
        assert cli.model.class_names == cli.datamodule.class_names == list(CLASSES)  # type: ignore[attr-defined]
        assert cli.datamodule.data_config.to_dict() == entry_config  # type: ignore[attr-defined]
    test.datamodule.prepare_splits()  # type: ignore[attr-defined]
    labels = np.concatenate([s.labels for s in test.datamodule.splits.values()])  # type: ignore[attr-defined]
    assert sorted(set(labels.tolist())) == [0, 2]  # circle 0, stripes 2: the checkpoint's indices


def test_classes_given_against_the_checkpoint_are_refused(
    tiny_run: TinyRun, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={image_folder}"]
    args = ["validate", f"--ckpt_path={tiny_run.best}", *data, "--data.init_args.classes=[square,circle,stripes]"]
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{tiny_run.best} was trained on ['circle', 'square', 'stripes']" in err


def test_preprocessing_that_contradicts_the_checkpoint_is_one_line_naming_both(
    tiny_run: TinyRun, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--model.data_config`` replaces the checkpoint's and the data is built with it: loading the checkpoint's
    weights is refused, naming the file and both configs."""
    other = {"input_size": [3, 40, 40], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={image_folder}"]
    args = ["validate", f"--ckpt_path={tiny_run.best}", *data, f"--model.data_config={json.dumps(other)}"]
    assert run_cli([*args, "--data.init_args.num_workers=0", "--trainer.enable_progress_bar=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"vision-transfer: error: {tiny_run.best}: its preprocessing DataConfig(input_size=(3, 32,")
    assert "differs from DataConfig(input_size=(3, 40, 40), mean=(0.5, 0.5, 0.5)" in err


@pytest.mark.parametrize(
    ("cuda", "bf16", "accelerator", "expected"),
    [
        (False, False, "auto", None),  # the CPU: 32-true (bf16 autocast measured 12x slower on this project's CPU)
        (True, True, "auto", "bf16-mixed"),
        (True, False, "gpu", "16-mixed"),
        (True, True, "cpu", None),
    ],
)
def test_precision_is_chosen_by_device_unless_set(
    monkeypatch: pytest.MonkeyPatch, cuda: bool, bf16: bool, accelerator: str, expected: str | None
) -> None:
    from vision_transfer.app.lightning_cli import default_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    assert default_precision(accelerator) == expected


def test_lightning_cli_runs_the_cli_own_subcommand_methods(tiny_run: TinyRun) -> None:
    """Pins what VisionTransferCLI relies on in LightningCLI: a method named after the subcommand
    (fit, test, ...) is run instead of the Trainer's (that is where expected warnings are scoped).
    ``tiny_run`` wraps VisionTransferCLI.fit and .test around its fit and records the calls."""
    assert tiny_run.subcommands == ("fit", "test")  # test: after_fit's test of the best checkpoint
