"""Faults from outside: a killed run, a full disk, two processes on one cache, GPU out of memory."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_BACKBONE, TINY_SIZE, tiny_fit_args, write_folder
from tests.fault_helpers import FillingDisk, lock_waiters
from tests.test_cli import run_cli
from vision_transfer import files
from vision_transfer.app.protocols import extract_datamodule
from vision_transfer.datamodules import ImageFolderDataModule
from vision_transfer.errors import DiskFullError
from vision_transfer.features import FeatureCache
from vision_transfer.features.extract import FeatureExtractor, extract_splits
from vision_transfer.tasks import ImageClassifier

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}  # subprocesses import tests.fault_helpers


def _wait_for(condition: Callable[[], bool], what: str, process: subprocess.Popen | None = None, log: str = "") -> None:
    deadline = time.monotonic() + 120
    while not condition():
        if process is not None and process.poll() is not None:
            output = Path(log).read_text()[-3000:] if log else ""
            raise AssertionError(f"the process ended (status {process.returncode}) before {what}\n{output}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _metrics(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _per_epoch(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    return [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key)]


def test_killed_fit_resumes_into_the_same_run_with_the_same_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_folder(tmp_path / "images", per_class=16)  # 4 training batches of 8 per epoch
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={folder}"]
    # gradual unfreezing (one more group per epoch) makes the resumed epoch's state matter;
    # no random augmentation, so the killed+resumed and the uninterrupted run see identical batches
    options = ["--model.mode=gradual", "--model.lr=0.02", "--model.head_lr=0.05", "--model.warmup_epochs=0"]
    options += ["--data.init_args.augment=false", "--trainer.max_epochs=3", "--test_after_fit=false"]
    pause = [
        "--trainer.callbacks+=tests.fault_helpers.BatchPause",
        f"--trainer.callbacks.init_args.marker={tmp_path / 'paused'}",
        f"--trainer.callbacks.init_args.hold={tmp_path / 'hold'}",
    ]
    command = tiny_fit_args(data, tmp_path, *options, *pause)
    (tmp_path / "hold").touch()
    with (tmp_path / "killed.log").open("w") as log:
        killed = subprocess.Popen(
            [sys.executable, "-m", "vision_transfer.cli", *command], cwd=tmp_path, env=ENV, stdout=log, stderr=log
        )
    try:
        # meanwhile, the same run uninterrupted; --ckpt_path last on a new folder starts it fresh
        assert run_cli([*tiny_fit_args(data, tmp_path / "whole", *options), "--ckpt_path", "last"]) == 0
        searched = tmp_path / "whole" / "runs" / "lightning_logs" / "version_*" / "checkpoints"
        assert f"no last.ckpt in {searched}: starting a new run\n" in capsys.readouterr().out
        _wait_for((tmp_path / "paused").exists, "the pause in epoch 2", killed, str(tmp_path / "killed.log"))
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0  # killed in epoch 2: only epoch 1 is saved
    assert (tmp_path / "paused").read_text() == "1 6\n"  # after the 2nd of 4 steps of epoch 2

    (tmp_path / "hold").unlink()
    assert run_cli([*command, "--ckpt_path", "last"]) == 0
    assert f"resuming from {last}\n" in capsys.readouterr().out
    assert [p.name for p in run.parent.iterdir()] == ["version_0"]  # the same run folder

    whole = tmp_path / "whole" / "runs" / "lightning_logs" / "version_0"
    rows, whole_rows = _metrics(run), _metrics(whole)
    for key in ("val/acc", "val/loss", "train/frozen_groups"):
        resumed, uninterrupted = _per_epoch(rows, key), _per_epoch(whole_rows, key)
        assert [e for e, _ in resumed] == [0, 1, 2]  # epoch 1 from the killed run, none twice
        assert [v for _, v in resumed] == [v for _, v in uninterrupted], key
    assert [v for _, v in _per_epoch(rows, "train/frozen_groups")] == [6, 5, 4]
    final = torch.load(last, weights_only=True)
    reference = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == reference["global_step"] == 12
    for key, value in reference["state_dict"].items():
        assert torch.equal(value, final["state_dict"][key]), key


def test_ckpt_path_last_searches_an_explicit_checkpoint_dirpath(
    tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "my_checkpoints"
    empty.mkdir()
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={image_folder}"]
    args = ["validate", "--ckpt_path=last", f"--checkpoint.dirpath={empty}", *data]
    assert run_cli(args) == 2
    assert f"--ckpt_path last: no last.ckpt in {empty}." in capsys.readouterr().err


def test_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = FillingDisk(nth=3)  # epoch 1 wrote best.ckpt and last.ckpt; epoch 2's first save fills the disk
    monkeypatch.setattr(files, "open", disk.open, raising=False)
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={image_folder}"]
    assert run_cli(tiny_fit_args(data, tmp_path, "--trainer.max_epochs=2")) == 2

    assert disk.full_at is not None
    folder = disk.full_at.parent
    target = next(p for p in disk.before if disk.full_at.name.startswith(f".{p.name}."))
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"vision-transfer: error: disk full while writing checkpoint {re.escape(str(target))} \([\d.]+ \w+ free "
        rf"there\); the previous {target.name} is intact; free some space, then add --ckpt_path last to resume\.",
        message,
    ), message
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]  # no temporary file left
    for path, content in disk.before.items():
        assert path.read_bytes() == content
        assert torch.load(path, weights_only=True)["epoch"] == 0


def test_full_disk_while_extracting_keeps_the_complete_shards(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vision_transfer.backbones import create_backbone
    from vision_transfer.features.extract import build_spec

    datamodule = ImageFolderDataModule(str(image_folder), num_workers=0)
    splits = datamodule.prepare_splits()
    model, config = create_backbone(TINY_BACKBONE, "none", image_size=TINY_SIZE)
    spec = build_spec(TINY_BACKBONE, model.pretrained_cfg["weights"], config)
    caches = {name: FeatureCache(spec, samples, tmp_path, 4) for name, samples in splits.items()}
    cache = caches["train"]

    def run(disk: FillingDisk | None) -> FeatureExtractor:
        if disk is not None:
            monkeypatch.setattr(files, "open", disk.open, raising=False)
        extractor = FeatureExtractor(model, config, torch.device("cpu"), "32")
        try:
            extract_splits(extractor, caches, config, batch_size=4, progress=False)
        finally:
            monkeypatch.undo()
        return extractor

    with pytest.raises(DiskFullError) as error:
        run(FillingDisk(name="shard_00001"))
    shard = cache.shard_path(1)
    assert re.fullmatch(
        rf"disk full while writing feature shard {re.escape(str(shard))} \([\d.]+ \w+ free there\); "
        r"the complete shards are intact and a rerun resumes from them\.",
        str(error.value),
    )
    assert sorted(p.name for p in shard.parent.iterdir() if p.name.endswith(".npy")) == ["shard_00000.npy"]
    assert not list(shard.parent.glob("*.tmp"))  # no temporary file left
    assert np.load(cache.shard_path(0)).shape[0] == 4

    with pytest.raises(DiskFullError, match=r"writing feature manifest .*manifest\.json"):
        run(FillingDisk(name="manifest.json", room=100))
    assert not cache.is_complete() and not list(cache.folder.rglob("*.tmp"))
    resumed = run(None)  # the train shards were complete: only the manifest (and the other splits) are written
    assert resumed.forward_passes == sum(-(-len(s) // 4) for n, s in splits.items() if n != "train")
    assert all(c.is_complete() for c in caches.values()) and len(cache.load()) == len(splits["train"])


def test_two_processes_extracting_one_cache_share_the_work(tmp_path: Path, image_folder: Path) -> None:
    if not Path("/proc/locks").is_file():
        pytest.skip("needs Linux's /proc/locks to see both processes wait for the lock")
    datamodule = ImageFolderDataModule(str(image_folder), num_workers=0)
    reference, passes = extract_datamodule(
        datamodule, TINY_BACKBONE, "none", image_size=TINY_SIZE, cache_dir=str(tmp_path / "one"), batch_size=2
    )
    command = [sys.executable, "-m", "vision_transfer.cli", "extract", f"--backbone={TINY_BACKBONE}", "--weights=none"]
    command += [f"--image_size={TINY_SIZE}", "--data=vision_transfer.datamodules.ImageFolderDataModule"]
    command += [f"--data.root={image_folder}", "--data.num_workers=0", "--batch_size=2"]
    command += [f"--cache_dir={tmp_path / 'shared'}"]
    cache = FeatureCache(reference["train"].spec, reference["train"].samples, tmp_path / "shared")
    with cache.lock():  # both start, find no cache, and queue for the lock; then they race for it
        both = [
            subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        _wait_for(lambda: lock_waiters(cache.folder / ".lock") == {p.pid for p in both}, "both to wait for the lock")
    outputs = [p.communicate(timeout=120) for p in both]
    for process, (_, err) in zip(both, outputs, strict=True):
        assert process.returncode == 0, err[-2000:]
    reported = [int(re.search(r"(\d+) backbone forward passes", out)[1]) for out, _ in outputs]  # type: ignore[index]
    assert sum(reported) == passes  # each split extracted once: whoever held its lock; the other found it done
    for expected in reference.values():
        shared = FeatureCache(expected.spec, expected.samples, tmp_path / "shared")
        manifest, reference_manifest = shared.manifest() or {}, expected.manifest() or {}
        assert shared.is_complete()
        assert {**manifest, "extraction_seconds": 0} == {**reference_manifest, "extraction_seconds": 0}
        assert np.array_equal(shared.load(), expected.load())


def test_out_of_gpu_memory_in_training_says_what_to_lower(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    step = ImageClassifier.training_step

    def out_of_memory(self: ImageClassifier, batch, batch_idx: int):  # type: ignore[no-untyped-def]
        if self.current_epoch == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(ImageClassifier, "training_step", out_of_memory)
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={image_folder}"]
    assert run_cli(tiny_fit_args(data, tmp_path, "--trainer.max_epochs=2")) == 2
    last = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "vision-transfer: error: out of GPU memory at batch size 8; try `--data.init_args.batch_size 4` (with "
        "`--trainer.accumulate_grad_batches 2` to keep the effective batch size) or `--trainer.precision bf16-mixed`; "
        f"the last checkpoint {last} is intact (add `--ckpt_path last` to resume)."
    )
    assert torch.load(last, weights_only=True)["epoch"] == 0


def test_out_of_gpu_memory_in_extraction_says_what_to_lower(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def out_of_memory(self: FeatureExtractor, images: torch.Tensor) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(FeatureExtractor, "__call__", out_of_memory)
    args = ["extract", f"--backbone={TINY_BACKBONE}", "--weights=none", f"--image_size={TINY_SIZE}"]
    args += ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.root={image_folder}"]
    args += ["--data.num_workers=0", f"--cache_dir={tmp_path}", "--batch_size=64", "--precision=32"]
    assert run_cli(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "vision-transfer: error: out of GPU memory at batch size 64; try `--batch_size 32` or `--precision bf16`."
    )


def test_image_that_breaks_after_setup_is_skipped_by_the_loader_worker(
    tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={image_folder}"]
    extra = ["--data.init_args.on_bad_image=skip", "--data.init_args.num_workers=1", "--trainer.max_epochs=3"]
    extra += ["--test_after_fit=false", "--trainer.callbacks+=tests.fault_helpers.LateCorruption"]
    assert run_cli(tiny_fit_args(data, tmp_path, *extra)) == 0  # the validation image broke after epoch 1
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    with (run / "splits.csv").open(newline="") as f:
        broken = str(
            image_folder / next(r for r in csv.DictReader(f) if r["split"] == "val")["sample"]
        )  # ids are relative
    with (run / "skipped_images.csv").open(newline="") as f:
        assert list(csv.DictReader(f)) == [
            {"path": broken, "reason": "corrupt or truncated image (image file is truncated)."}
        ]
    out = capsys.readouterr().out
    assert out.count(f"skipped unreadable image {broken}: corrupt or truncated image") == 1  # met in 2 epochs
    assert len(_per_epoch(_metrics(run), "val/acc")) == 3
