"""Prepared datasets: ``vision-transfer prepare`` writes a folder, a CSV and a Hugging Face dataset as litdata
chunks that read back as the same samples; the prepared train split streams once per epoch across DDP
ranks, and a run killed mid-epoch resumes without repeating or skipping a sample."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from tests.conftest import TINY_BACKBONE, TINY_SIZE, tiny_data, tiny_fit_args, tiny_model
from tests.test_cli import run_cli
from vision_transfer.backbones import preprocessing
from vision_transfer.data.prepared import METADATA, prepare, read_prepared
from vision_transfer.data.sources import Samples, SourceSplits
from vision_transfer.datamodules import CsvDataModule, PreparedDataModule
from vision_transfer.errors import ConfigError, DataError

pytest.importorskip("litdata")
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
N_TRAIN = 48  # 2 ranks x 3 batches of 8, so no rank drops a remainder


def _coded(n: int, offset: int = 0) -> np.ndarray:
    """Constant-colour images whose red + 256 * green is their index: readable after any resize."""
    images = np.zeros((n, 16, 16, 3), dtype=np.uint8)
    for i in range(n):
        images[i, ..., 0], images[i, ..., 1] = (i + offset) % 256, (i + offset) // 256
    return images


@pytest.fixture(scope="module")
def coded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("coded") / "prepared"
    splits = {
        split: Samples(_coded(n, offset), np.arange(n) % 3, [f"{split}:{i}" for i in range(n)])
        for split, n, offset in (("train", N_TRAIN, 0), ("val", 6, 1000), ("test", 6, 2000))
    }
    prepare(SourceSplits(["a", "b", "c"], splits), str(out), num_workers=2)
    return out


def _source_args(kind: str, image_folder: Path, csv_dataset: Path, tmp_path: Path) -> list[str]:
    if kind == "folder":
        return ["--data=ImageFolderDataModule", f"--data.init_args.root={image_folder}"]
    if kind in ("csv", "multilabel"):
        return ["--data=CsvDataModule", f"--data.init_args.csv_path={csv_dataset}"]
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    source = tiny_data(image_folder).read_source().splits["train"]
    rows = {"image": [Image.fromarray(source.image(i)) for i in range(len(source))], "label": source.labels.tolist()}
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["circle", "square", "stripes"])}
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    return ["--data=HFDataModule", f"--data.init_args.dataset={tmp_path / 'hf'}"]


@pytest.mark.parametrize("kind", ["folder", "csv", "multilabel", "hf"])
def test_prepare_writes_what_the_datamodule_splits_and_it_reads_back_the_same(
    kind: str, image_folder: Path, csv_dataset: Path, multilabel_csv: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    csv_path = multilabel_csv if kind == "multilabel" else csv_dataset
    args = _source_args(kind, image_folder, csv_path, tmp_path)
    out = tmp_path / "prepared"
    assert run_cli(["prepare", *args, f"--output={out}", "--num_workers=2"]) == 0
    assert f"--data PreparedDataModule --data.path {out}" in capsys.readouterr().out
    source = {"folder": "ImageFolderDataModule", "hf": "HFDataModule"}.get(kind, "CsvDataModule")
    metadata = json.loads((out / METADATA).read_text())
    assert metadata["source"]["datamodule"] == source and metadata["short_side"] is None
    prepared, _ = read_prepared(str(out))
    config = preprocessing(TINY_BACKBONE, "none", TINY_SIZE)
    original = PreparedDataModule(str(out), data_config=config)  # the same splits, read back
    original.prepare_splits()
    for split, samples in prepared.splits.items():
        assert samples.ids == original.splits[split].ids
        assert np.array_equal(samples.labels, original.splits[split].labels)
    # without --short_side, the stored bytes are the files' own: pixel-identical
    reference = {"folder": lambda: tiny_data(image_folder), "csv": lambda: CsvDataModule(str(csv_path))}
    reference["multilabel"] = reference["csv"]
    assert original.task == ("multilabel" if kind == "multilabel" else "multiclass")
    if kind in reference:
        data = reference[kind]()
        data.prepare_splits()
        for split, samples in data.splits.items():
            assert samples.ids == prepared.splits[split].ids
            for row in range(len(samples)):
                assert np.array_equal(samples.image(row), prepared.splits[split].image(row))


def test_short_side_resizes_larger_images_and_keeps_smaller_ones(tmp_path: Path) -> None:
    from PIL import Image
    from skimage import data as skdata

    photo = Image.fromarray(skdata.astronaut())
    arrays = [np.asarray(photo.resize((w, h), Image.Resampling.BICUBIC)) for h, w in ((60, 90), (20, 30), (100, 40))]
    files = []
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
    splits = {"train": Samples(files, np.array([0, 1, 0]), ["0", "1", "2"])}
    prepare(SourceSplits(["x", "y"], splits), str(tmp_path / "out"), short_side=32, quality=90)
    images = read_prepared(str(tmp_path / "out"))[0].splits["train"]
    assert [images.image(i).shape[:2] for i in range(3)] == [(32, 48), (20, 30), (80, 32)]
    assert images.content(0)[:2] == b"\xff\xd8" and images.content(1) == Path(files[1]).read_bytes()
    buffer = io.BytesIO()  # what it stores: PIL's antialiased bicubic resize, JPEG at quality 90
    Image.fromarray(arrays[0]).resize((48, 32), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    assert images.content(0) == buffer.getvalue()


def test_prepare_refuses_a_folder_with_files_and_bad_settings_keeping_what_is_there(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    splits = {"train": Samples(_coded(4), np.array([0, 1, 0, 1]), list("abcd"))}
    with pytest.raises(DataError, match="not empty; prepare into a new folder"):
        prepare(SourceSplits(["x", "y"], splits), str(out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(ConfigError, match="quality=100"):
        prepare(SourceSplits(["x", "y"], splits), str(tmp_path / "new"), short_side=8, quality=100)
    with pytest.raises(DataError, match=r"no vision_transfer\.json"):
        read_prepared(str(out))


def test_prepared_datamodule_refuses_what_a_stream_cannot_do(coded: Path, tmp_path: Path) -> None:
    config = preprocessing(TINY_BACKBONE, "none", TINY_SIZE)
    with pytest.raises(ConfigError, match="balanced_sampling"):
        PreparedDataModule(str(coded), data_config=config, balanced_sampling=True)
    with pytest.raises(ConfigError, match="max_train_samples=10"):
        PreparedDataModule(str(coded), data_config=config, max_train_samples=10)
    only_train = tmp_path / "only_train"
    prepare(
        SourceSplits(["a", "b"], {"train": Samples(_coded(12), np.arange(12) % 2, list("abcdefghijkl"))}),
        str(only_train),
    )
    with pytest.raises(DataError, match="has no test or val split, and the streamed train split cannot give one up"):
        PreparedDataModule(str(only_train), data_config=config).prepare_splits()


def _seen(path: Path) -> list[tuple[int, int, list[int]]]:
    rows = [line.split() for line in path.read_text().splitlines()]
    return [(int(r[0]), int(r[1]), [int(x) for x in r[2:]]) for r in rows]


def _run(coded: Path, out: Path, devices: int, workers: int, *hold: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "log.txt").open("a")
    command = [sys.executable, str(REPO / "tests" / "stream_run.py"), str(coded), str(out), str(devices), str(workers)]
    return subprocess.Popen([*command, *hold], env=ENV, stdout=log, stderr=log)


def _finish(process: subprocess.Popen, out: Path) -> None:
    assert process.wait(timeout=300) == 0, (out / "log.txt").read_text()[-3000:]


def test_ddp_streams_every_sample_once_per_epoch_across_two_ranks(coded: Path, tmp_path: Path) -> None:
    _finish(_run(coded, tmp_path, 2, 1), tmp_path)
    ranks = [_seen(tmp_path / f"seen-rank{r}.txt") for r in (0, 1)]
    orders = []
    for epoch in (0, 1):
        per_rank = [[i for e, _, batch in seen if e == epoch for i in batch] for seen in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == N_TRAIN // 2  # in step: each rank the same batches
        assert not set(per_rank[0]) & set(per_rank[1])  # no sample on both ranks
        assert sorted(per_rank[0] + per_rank[1]) == list(range(N_TRAIN))  # every sample, once
        orders.append(per_rank[0])
    assert orders[0] != orders[1]  # reshuffled each epoch


def test_a_run_killed_mid_epoch_resumes_without_repeating_or_skipping_samples(coded: Path, tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    hold.touch()
    killed = _run(coded, tmp_path, 1, 2, str(hold))
    try:
        from tests.test_faults import _wait_for

        _wait_for((tmp_path / "paused").exists, "the pause after step 3", killed, str(tmp_path / "log.txt"))
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2  # the pause holds step 3 before its checkpoint: two steps are saved
    seen = _seen(tmp_path / "seen-rank0.txt")
    assert [step for _, step, _ in seen] == [0, 1, 2]
    before, unsaved = seen[:2], seen[2]
    (tmp_path / "seen-rank0.txt").unlink()
    hold.unlink()
    _finish(_run(coded, tmp_path, 1, 2, str(hold)), tmp_path)  # the same command resumes from last.ckpt
    after = _seen(tmp_path / "seen-rank0.txt")
    # it goes on in epoch 0 at the first step not saved, with the very batch the killed run was training on
    assert after[0] == unsaved
    resumed = before + after
    assert [(epoch, step) for epoch, step, _ in resumed] == [(step // 6, step) for step in range(12)]
    for epoch in (0, 1):  # every sample once in each epoch: nothing repeated, nothing skipped
        assert sorted(i for e, _, batch in resumed if e == epoch for i in batch) == list(range(N_TRAIN))


def test_fit_test_and_extract_on_a_prepared_dataset_from_the_command_line(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "prepared"
    source = ["--data=ImageFolderDataModule", f"--data.init_args.root={image_folder}"]
    assert run_cli(["prepare", *source, f"--output={out}", "--short_side=24"]) == 0
    data = ["--data=PreparedDataModule", f"--data.init_args.path={out}"]
    shipped = [f"--config={REPO / 'configs' / 'prepared.yaml'}", "--checkpoint.last_every_n_steps=1"]
    fit = tiny_fit_args(data, tmp_path, "--data.init_args.num_workers=2", "--trainer.max_epochs=2")
    assert run_cli([fit[0], *shipped, *fit[1:]]) == 0
    printed = capsys.readouterr().out
    assert "test/acc" in printed and "best.ckpt" in printed  # the best checkpoint is still the one tested
    run = tmp_path / "runs" / "prepared" / "version_0"
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    steps = 2 * (len(json.loads((out / METADATA).read_text())["splits"]["train"]["ids"]) // 8)  # drop_last
    assert last["global_step"] == steps and "PreparedDataModule" in last  # the stream's position travels with it
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    extract = [
        "extract", f"--backbone={TINY_BACKBONE}", "--weights=none", f"--image_size={TINY_SIZE}", *data,
        f"--cache_dir={tmp_path / 'cache'}", "--num_workers=0",
    ]  # fmt: skip
    assert run_cli(extract) == 0
    assert "backbone forward passes" in capsys.readouterr().out
    assert run_cli(["check-data", str(out)]) == 0  # the prepared chunks, decoded one by one
    report = capsys.readouterr().out
    metadata = json.loads((out / METADATA).read_text())
    total = "| total | " + " | ".join(str(len(metadata["splits"][s]["ids"])) for s in ("train", "val", "test")) + " |"
    assert total in report and "max 24x24" in report and "unreadable files: 0" in report


class LastCheckpointSeen(pl.Callback):
    """At each step's start, the step ``last.ckpt`` holds (written at the previous step's end, or absent)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.seen = folder, []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        last = self.folder / "last.ckpt"
        self.seen.append(torch.load(last, weights_only=False)["global_step"] if last.exists() else None)


@pytest.mark.parametrize("every", [None, 1, 2])
def test_last_every_n_steps_writes_last_ckpt_mid_epoch(image_folder: Path, tmp_path: Path, every: int | None) -> None:
    from vision_transfer.callbacks.checkpointing import RunCheckpoint

    data = tiny_data(image_folder, val_fraction=0.0, test_fraction=0.0)  # 24 images: 3 steps an epoch
    seen = LastCheckpointSeen(tmp_path)
    checkpoint = RunCheckpoint(dirpath=tmp_path, save_last=True, last_every_n_steps=every)
    trainer = pl.Trainer(
        max_epochs=2, logger=False, callbacks=[seen, checkpoint], enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(tiny_model(data, mode="full", warmup_epochs=0), data)
    # epoch ends write it anyway (step 3); every n steps adds the steps in between
    expected = {None: [None, None, None, 3, 3, 3], 1: [None, 1, 2, 3, 4, 5], 2: [None, None, 2, 3, 4, 4]}[every]
    assert seen.seen == expected
    with pytest.raises(ConfigError, match="last_every_n_steps=0"):
        RunCheckpoint(last_every_n_steps=0)
