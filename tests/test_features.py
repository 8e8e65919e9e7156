"""Feature cache (keys, shards, resume, reuse across commands) and linear probes on cached features."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import TINY_BACKBONE, TINY_SIZE, tiny_data, tiny_fit_args, tiny_model
from tests.test_cli import run_cli
from vision_transfer.app.protocols import extract_datamodule
from vision_transfer.checkpoint import read_checkpoint
from vision_transfer.datamodules import CachedFeatureDataModule, CsvDataModule, ImageFolderDataModule
from vision_transfer.features import FeatureCache, extract
from vision_transfer.features.extract import build_spec, extract_splits, feature_spec


def _splits(folder: Path, **kwargs):
    datamodule = ImageFolderDataModule(str(folder), num_workers=0, **kwargs)
    return datamodule.prepare_splits()


def _extract(folder: Path, root: Path, **kwargs):
    options = {"image_size": TINY_SIZE, "cache_root": root, "batch_size": 4, "progress": False, **kwargs}
    return extract(TINY_BACKBONE, "none", _splits(folder), **options)


def _cache_folders(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()


def test_cache_key_covers_what_changes_the_features(image_folder: Path, tmp_path: Path) -> None:
    from vision_transfer.backbones import create_backbone

    model, config = create_backbone(TINY_BACKBONE, "none", image_size=TINY_SIZE)
    weights = model.pretrained_cfg["weights"]
    train = _splits(image_folder)["train"]

    def key(spec, samples=train) -> str:
        return FeatureCache(spec, samples, tmp_path).key

    spec = build_spec(TINY_BACKBONE, weights, config)
    base = key(spec)
    assert base == key(build_spec(TINY_BACKBONE, dict(weights), config), _splits(image_folder)["train"])
    other_weights = {"kind": "file", "uri": "/x.safetensors", "sha256": "ab" * 32}
    changed = [
        key(build_spec("test_resnet", weights, config)),
        key(build_spec(TINY_BACKBONE, other_weights, config)),
        key(build_spec(TINY_BACKBONE, weights, config.with_image_size(48))),
        key(spec, _splits(image_folder, split_seed=1)["train"]),  # other samples
        key(build_spec(TINY_BACKBONE, weights, config, dtype="float32")),
        key(build_spec(TINY_BACKBONE, weights, config, precision="bf16")),
    ]
    assert len({base, *changed}) == 7
    image = next(image_folder.rglob("*.png"))  # touching an image's content changes the key too
    image.write_bytes(image.read_bytes() + b"\0")
    assert key(spec, _splits(image_folder)["train"]) != base


def test_labels_and_class_names_are_not_part_of_the_key(image_folder: Path, tmp_path: Path) -> None:
    spec = feature_spec(TINY_BACKBONE, "none", image_size=TINY_SIZE)
    train = _splits(image_folder)["train"]
    relabelled = type(train)(train.items, (train.labels + 1) % 3, train.ids)
    assert FeatureCache(spec, train).key == FeatureCache(spec, relabelled).key


def test_spec_takes_the_data_config_of_the_weights_tag() -> None:
    import timm

    from vision_transfer.backbones import DataConfig

    tagged = DataConfig.from_model(timm.create_model("resnet18.tv_in1k", pretrained=False, num_classes=0))
    default = DataConfig.from_model(timm.create_model("resnet18", pretrained=False, num_classes=0))
    assert tagged != default  # bilinear, crop 0.875 vs bicubic, crop 0.95
    assert feature_spec("resnet18", "timm:tv_in1k").data_config == tagged.to_dict()
    assert feature_spec("resnet18", "timm").data_config == default.to_dict()


def test_warm_cache_runs_no_backbone_forward_pass(image_folder: Path, tmp_path: Path) -> None:
    caches, extractor = _extract(image_folder, tmp_path)
    assert extractor is not None and extractor.forward_passes > 0
    first = {s: cache.load() for s, cache in caches.items()}
    again, second_extractor = _extract(image_folder, tmp_path)
    assert second_extractor is None and again.keys() == caches.keys()  # 0 forward passes
    for split, features in first.items():
        assert again[split].folder == caches[split].folder and np.array_equal(features, again[split].load())
    manifest = caches["train"].manifest() or {}
    assert manifest["dim"] == first["train"].shape[1] and manifest["spec"]["backbone"] == TINY_BACKBONE
    assert json.loads((caches["train"].folder / "ids.json").read_text()) == list(caches["train"].samples.ids)
    assert all(isinstance(s, np.memmap) for s in caches["train"].shards())
    assert first["train"].dtype == np.float32 and caches["train"].shards()[0].dtype == np.float16


def test_killed_extraction_resumes_from_complete_shards(image_folder: Path, tmp_path: Path) -> None:
    from vision_transfer.backbones import create_backbone
    from vision_transfer.features.extract import FeatureExtractor

    splits = _splits(image_folder)
    model, config = create_backbone(TINY_BACKBONE, "none", image_size=TINY_SIZE)
    spec = build_spec(TINY_BACKBONE, model.pretrained_cfg["weights"], config)
    caches = {name: FeatureCache(spec, samples, tmp_path, shard_size=4) for name, samples in splits.items()}

    class Dies(FeatureExtractor):
        def __call__(self, images: torch.Tensor) -> torch.Tensor:
            if self.forward_passes == 2:
                raise KeyboardInterrupt  # killed mid-way
            return super().__call__(images)

    with pytest.raises(KeyboardInterrupt):
        extract_splits(Dies(model, config, torch.device("cpu"), "32"), caches, config, batch_size=2, progress=False)
    done = sorted(p.name for p in tmp_path.rglob("shard_*.npy"))
    assert done == ["shard_00000.npy"] and not caches["train"].is_complete()
    (caches["train"].folder / ".shard_00001.npy.999.tmp").write_bytes(b"half-written")  # never read

    resumed = FeatureExtractor(model, config, torch.device("cpu"), "32")
    extract_splits(resumed, caches, config, batch_size=2, progress=False)
    # batches of 2 over the rows of every shard of 4 rows, except the one that was complete
    rows = sum(len(c.shard_rows(i)) for c in caches.values() for i in range(c.num_shards)) - 4
    assert resumed.forward_passes == sum(-(-len(c.samples) // 2) for c in caches.values()) - 2
    assert rows > 0
    fresh, _ = _extract(image_folder, tmp_path / "b")
    for split, cache in caches.items():
        assert cache.is_complete() and np.allclose(cache.load(), fresh[split].load(), atol=1e-3)


def test_dataset_path_written_two_ways_reuses_the_cache(
    csv_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(csv_dataset.parent)
    options = {"image_size": TINY_SIZE, "cache_dir": str(tmp_path / "cache"), "progress": False}
    _, first = extract_datamodule(CsvDataModule("labels.csv", num_workers=0), TINY_BACKBONE, "none", **options)
    _, second = extract_datamodule(CsvDataModule(str(csv_dataset), num_workers=0), TINY_BACKBONE, "none", **options)
    assert first > 0 and second == 0


def test_relabelled_csv_reuses_features_and_the_probe_takes_the_new_names(
    csv_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    common = [f"--backbone={TINY_BACKBONE}", "--weights=none", f"--image_size={TINY_SIZE}", "--epochs=2"]
    common += ["--data=vision_transfer.datamodules.CsvDataModule", f"--data.csv_path={csv_dataset}"]
    common += ["--data.num_workers=0", f"--cache_dir={tmp_path / 'cache'}", "--lrs=[0.1]", "--wds=[0.0]"]
    assert run_cli(["probe", *common, "--output=before"]) == 0
    renamed = {"circle": "ring", "square": "tile", "stripes": "zebra"}  # same sorted order
    rows = list(csv.DictReader(csv_dataset.open()))
    with csv_dataset.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label"])
        writer.writeheader()
        writer.writerows({"path": r["path"], "label": renamed[r["label"]]} for r in rows)
    assert run_cli(["probe", *common, "--output=after"]) == 0
    report = json.loads((tmp_path / "after" / "probe.json").read_text())
    assert report["forward_passes"] == 0 and report["class_names"] == ["ring", "tile", "zebra"]
    entry, _ = read_checkpoint(tmp_path / "after" / "probe.ckpt")
    assert entry.class_names == ["ring", "tile", "zebra"]


def test_probe_reuses_the_shards_a_cached_fit_extracted(image_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={image_folder}"]
    fit = tiny_fit_args(data, tmp_path, "--model.mode=linear_probe", "--model.cache_features=true")
    assert run_cli([*fit, f"--model.cache_dir={cache}", "--test_after_fit=false"]) == 0
    after_fit = _cache_folders(cache)
    assert len(after_fit) == 2  # train and val
    datamodule = ImageFolderDataModule(str(image_folder), num_workers=0)
    caches, passes = extract_datamodule(datamodule, TINY_BACKBONE, "none", image_size=TINY_SIZE, cache_dir=str(cache))
    assert {caches["train"].key, caches["val"].key} == after_fit  # shared, not extracted again
    assert passes == -(-len(datamodule.splits["test"]) // 256)  # only the test split ran


def test_probe_command_writes_a_checkpoint_that_predict_uses(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    common = [
        f"--backbone={TINY_BACKBONE}",
        "--weights=none",
        f"--image_size={TINY_SIZE}",
        "--data=vision_transfer.datamodules.ImageFolderDataModule",
        f"--data.root={image_folder}",
        "--data.num_workers=0",
        f"--cache_dir={tmp_path / 'cache'}",
    ]
    assert run_cli(["extract", *common]) == 0
    datamodule = ImageFolderDataModule(str(image_folder), num_workers=0)
    cache_dir = str(tmp_path / "cache")
    _, passes = extract_datamodule(datamodule, TINY_BACKBONE, "none", image_size=TINY_SIZE, cache_dir=cache_dir)
    assert passes == 0  # the CLI's cache is reused
    assert run_cli(["probe", *common, "--output=probe_run", "--epochs=3", "--lrs=[0.1,1.0]", "--wds=[0.0]"]) == 0
    report = (tmp_path / "probe_run" / "probe.json").read_text()
    assert '"forward_passes": 0' in report and '"solver": "sgd-stream"' in report  # streamed from the shards
    output = tmp_path / "preds.csv"
    predict = [
        "predict",
        f"--ckpt_path={tmp_path / 'probe_run' / 'probe.ckpt'}",
        f"--data.init_args.predict_paths={image_folder / 'circle'}",
        f"--prediction.output={output}",
        "--trainer.enable_progress_bar=false",
    ]
    assert run_cli(predict) == 0
    with output.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all(r["label_1"] in {"circle", "square", "stripes"} for r in rows)


def _ddp_extract(rank: int, world: int, folder: str, root: str, port: int) -> None:
    import os

    import torch.distributed as dist

    from vision_transfer.backbones import create_backbone
    from vision_transfer.features.extract import FeatureExtractor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    splits = _splits(Path(folder))
    model, config = create_backbone(TINY_BACKBONE, "none", image_size=TINY_SIZE)
    spec = build_spec(TINY_BACKBONE, model.pretrained_cfg["weights"], config)
    caches = {name: FeatureCache(spec, samples, root, shard_size=4) for name, samples in splits.items()}
    extractor = FeatureExtractor(model, config, torch.device("cpu"), "32")
    extract_splits(extractor, caches, config, batch_size=2, progress=False)
    torch.save(extractor.forward_passes, Path(root) / f"passes{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_extract_one_cache(image_folder: Path, tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free loopback port for the gloo rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_extract, args=(2, str(image_folder), str(tmp_path / "ddp"), port), nprocs=2, join=True)
    single, _ = _extract(image_folder, tmp_path / "single", batch_size=2)
    assert _cache_folders(tmp_path / "ddp") == {c.key for c in single.values()}  # the same keys: one cache
    passes = [torch.load(tmp_path / "ddp" / f"passes{r}.pt") for r in (0, 1)]
    assert all(p > 0 for p in passes)  # both ranks did part of the work
    for cache in single.values():
        ddp = FeatureCache(cache.spec, cache.samples, tmp_path / "ddp", shard_size=4)
        assert ddp.is_complete() and np.allclose(ddp.load(), cache.load(), atol=1e-3)
    # a probe (any protocol) then runs on the cache the ranks filled together, with no backbone pass
    from vision_transfer.app.protocols import knn_datamodule, probe_datamodule

    data = ImageFolderDataModule(str(image_folder), num_workers=0)
    options = {"image_size": TINY_SIZE, "cache_dir": str(tmp_path / "ddp"), "progress": False}
    result, _ = probe_datamodule(data, TINY_BACKBONE, "none", output=tmp_path / "probe", epochs=2, **options)
    report = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert report["forward_passes"] == 0 and result.test_acc is not None
    assert knn_datamodule(data, TINY_BACKBONE, "none", ks=(2,), **options).test_top1 >= 0


def test_linear_probe_classifier_trains_on_the_feature_cache(image_folder: Path, tmp_path: Path) -> None:
    import pytorch_lightning as pl

    from vision_transfer.tasks import ImageClassifier

    def fit() -> tuple[ImageClassifier, int]:
        images = tiny_data(image_folder)
        model = tiny_model(
            images, mode="linear_probe", cache_features=True, cache_dir=str(tmp_path / "cache"), lr=0.05,
            warmup_epochs=0,
        )  # fmt: skip
        calls = []
        model.backbone.register_forward_hook(lambda *args: calls.append(1))
        trainer = pl.Trainer(
            max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(model, CachedFeatureDataModule(images, model))
        assert torch.isfinite(trainer.callback_metrics["train/loss"]) and "val/acc" in trainer.callback_metrics
        return model, len(calls)

    _, first = fit()
    model, second = fit()
    assert first > 0 and second == 0  # 3 epochs, no backbone forward pass on a warm cache
    x = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    assert model(x).shape == (2, 3)  # images still work end to end (test, predict, export)
    with pytest.raises(Exception, match="needs mode='linear_probe'"):
        ImageClassifier(TINY_BACKBONE, weights="none", mode="full", cache_features=True)


def test_cached_linear_probe_checkpoint_validates_and_resumes_on_its_own_features(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import timm

    monkeypatch.chdir(tmp_path)  # validate's checkpoint callback resolves its folder against the working directory
    from safetensors.torch import save_file

    from vision_transfer.app.lightning_cli import VisionTransferCLI

    # backbone weights unlike the random init a checkpoint is rebuilt with (it records weights=none)
    torch.manual_seed(123)
    weights = tmp_path / "backbone.safetensors"
    save_file(timm.create_model(TINY_BACKBONE, num_classes=0).state_dict(), str(weights))
    cache = tmp_path / "cache"
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={image_folder}"]
    fit = tiny_fit_args(
        data, tmp_path, "--model.mode=linear_probe", "--model.cache_features=true", f"--model.cache_dir={cache}",
        f"--model.weights={weights}", "--model.lr=0.05", "--trainer.max_epochs=2", "--test_after_fit=false",
    )  # fmt: skip
    trained = VisionTransferCLI(args=fit)
    folders = _cache_folders(cache)
    checkpoint = trained.trainer.checkpoint_callback
    best, best_score = checkpoint.best_model_path, float(checkpoint.best_model_score)  # type: ignore[union-attr,arg-type]
    quiet = ["--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    validated = VisionTransferCLI(args=["validate", f"--ckpt_path={best}", *quiet])
    assert float(validated.trainer.callback_metrics["val/acc"]) == pytest.approx(best_score, abs=1e-6)
    assert _cache_folders(cache) == folders  # no extraction with other weights
    resumed = VisionTransferCLI(args=[*fit, "--ckpt_path=last", "--trainer.max_epochs=3"])
    assert resumed.trainer.current_epoch == 3 and _cache_folders(cache) == folders


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
@pytest.mark.parametrize("solver", ["sgd", "lbfgs"])
def test_probe_checkpoint_is_tuned_on_val_rows_its_head_never_trained_on(
    solver: str, task: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit finding 7: ``probe.ckpt``'s thresholds, and the temperature ``calibrate probe.ckpt`` fits, are
    tuned on val, so its head must never have trained on val. With one grid point val chooses nothing:
    a smaller val split must leave the saved head exactly as it was."""
    from vision_transfer.app import calibrate
    from vision_transfer.app.protocols import probe_datamodule, split_arrays
    from vision_transfer.inference import best_f1_thresholds

    source = request.getfixturevalue("image_folder" if task == "multiclass" else "multilabel_csv")

    def datamodule(**options: Any) -> ImageFolderDataModule | CsvDataModule:
        if task == "multiclass":
            return ImageFolderDataModule(str(source), num_workers=0, **options)
        return CsvDataModule(str(source), num_workers=0, **options)

    full = datamodule()
    splits = full.prepare_splits()
    assert set(splits["val"].ids).isdisjoint(splits["train"].ids)
    options = {"image_size": TINY_SIZE, "cache_dir": str(tmp_path / "cache"), "progress": False, "solver": solver}
    options |= {"epochs": 3, "lrs": [0.1], "wds": [1e-4], "c_grid_size": 1}
    saved = {}
    for name, data in (("full", full), ("smaller_val", datamodule(max_val_samples=len(splits["val"]) - 1))):
        _, checkpoint = probe_datamodule(data, TINY_BACKBONE, "none", output=tmp_path / name, **options)
        saved[name] = torch.load(checkpoint, weights_only=True)["state_dict"]
    for key in ("head.weight", "head.bias"):
        assert torch.equal(saved["full"][key], saved["smaller_val"][key]), key
    head = saved["full"]["head.weight"], saved["full"]["head.bias"]
    checkpoint = tmp_path / "full" / "probe.ckpt"
    if task == "multilabel":  # the thresholds in probe.ckpt: the saved head's best F1 on the val rows
        caches, _ = extract_datamodule(
            full, TINY_BACKBONE, "none", image_size=TINY_SIZE, cache_dir=options["cache_dir"]
        )
        features, labels = split_arrays(caches, full)["val"]
        probs = (torch.from_numpy(features) @ head[0].T + head[1]).sigmoid()
        expected = best_f1_thresholds(probs, torch.from_numpy(labels))[0]
        torch.testing.assert_close(saved["full"]["thresholds"], expected)
        return
    tuned_on = []  # what `vision-transfer calibrate probe.ckpt` fits the temperature on
    original = calibrate.calibrate_model

    def spy(model: Any, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        tuned_on.append(labels)
        return original(model, logits, labels)

    monkeypatch.setattr(calibrate, "calibrate_model", spy)
    report = calibrate.calibrate_checkpoint(checkpoint, datamodule(), output=tmp_path / "calibration")
    assert torch.equal(tuned_on[0], torch.as_tensor(splits["val"].labels)) and report["temperature"] > 0
