"""Feature cache (keys, shards, resume, reuse) and linear probes on cached features."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_BACKBONE, TINY_SIZE
from tests.test_cli import run_cli
from vision_transfer.datamodules import ImageFolderDataModule
from vision_transfer.features import FeatureCache, extract, lbfgs_probe, sgd_probe
from vision_transfer.features.extract import build_spec, extract_splits
from vision_transfer.features.run import extract_datamodule


def _splits(folder: Path, **kwargs):
    datamodule = ImageFolderDataModule(str(folder), num_workers=0, **kwargs)
    return datamodule.prepare_splits(), list(datamodule.class_names or [])


def _extract(folder: Path, root: Path, **kwargs):
    splits, names = _splits(folder)
    options = {"image_size": TINY_SIZE, "cache_root": root, "batch_size": 4, "progress": False, **kwargs}
    return extract(TINY_BACKBONE, "none", splits, names, **options)


def test_cache_key_covers_what_changes_the_features(image_folder: Path, tmp_path: Path) -> None:
    from vision_transfer.backbones import create_backbone

    model, config = create_backbone(TINY_BACKBONE, "none", image_size=TINY_SIZE)
    weights = model.pretrained_cfg["weights"]
    splits, _ = _splits(image_folder)
    base = build_spec(TINY_BACKBONE, weights, config, splits).key
    assert base == build_spec(TINY_BACKBONE, dict(weights), config, _splits(image_folder)[0]).key
    other_weights = {"kind": "file", "uri": "/x.safetensors", "sha256": "ab" * 32}
    changed = [
        build_spec("test_resnet", weights, config, splits),
        build_spec(TINY_BACKBONE, other_weights, config, splits),
        build_spec(TINY_BACKBONE, weights, config.with_image_size(48), splits),
        build_spec(TINY_BACKBONE, weights, config, _splits(image_folder, split_seed=1)[0]),
        build_spec(TINY_BACKBONE, weights, config, splits, dtype="float32"),
        build_spec(TINY_BACKBONE, weights, config, splits, precision="bf16"),
    ]
    assert len({base, *(spec.key for spec in changed)}) == 7
    # touching an image's content changes the key too
    image = next(image_folder.rglob("*.png"))
    image.write_bytes(image.read_bytes() + b"\0")
    assert build_spec(TINY_BACKBONE, weights, config, _splits(image_folder)[0]).key != base


def test_warm_cache_runs_no_backbone_forward_pass(image_folder: Path, tmp_path: Path) -> None:
    cache, extractor = _extract(image_folder, tmp_path)
    assert extractor is not None and extractor.forward_passes > 0
    first = {s: cache.load(s) for s in ("train", "val", "test")}
    again, second_extractor = _extract(image_folder, tmp_path)
    assert second_extractor is None and again.folder == cache.folder  # 0 forward passes
    for split, (features, labels) in first.items():
        f2, l2 = again.load(split)
        assert np.array_equal(features, f2) and np.array_equal(labels, l2)
    manifest = cache.manifest()
    assert manifest["dim"] == first["train"][0].shape[1] and manifest["spec"]["backbone"] == TINY_BACKBONE
    assert all(isinstance(s, np.memmap) for s in cache.shards("train"))
    assert first["train"][0].dtype == np.float32 and cache.shards("train")[0].dtype == np.float16


def test_killed_extraction_resumes_from_complete_shards(image_folder: Path, tmp_path: Path) -> None:
    from vision_transfer.backbones import create_backbone
    from vision_transfer.features.extract import FeatureExtractor

    splits, names = _splits(image_folder)
    model, config = create_backbone(TINY_BACKBONE, "none", image_size=TINY_SIZE)
    spec = build_spec(TINY_BACKBONE, model.pretrained_cfg["weights"], config, splits)
    cache = FeatureCache(spec, tmp_path, shard_size=4)

    class Dies(FeatureExtractor):
        def __call__(self, images: torch.Tensor) -> torch.Tensor:
            if self.forward_passes == 2:
                raise KeyboardInterrupt  # killed mid-way
            return super().__call__(images)

    with pytest.raises(KeyboardInterrupt):
        extract_splits(Dies(model, config, torch.device("cpu"), "32"), cache, splits, config, names, batch_size=2)
    done = sorted(p.name for p in cache.folder.rglob("shard_*.npy"))
    assert done == ["shard_00000.npy"] and not cache.is_complete()
    (cache.folder / "train" / ".shard_00001.npy.999.tmp").write_bytes(b"half-written")  # never read

    resumed = FeatureExtractor(model, config, torch.device("cpu"), "32")
    extract_splits(resumed, cache, splits, config, names, batch_size=2, progress=False)
    # batches of 2 over every shard of 4 rows, except the one that was complete
    remaining = [
        min(4, len(samples) - 4 * i) for name, samples in splits.items() for i in range(cache.num_shards(len(samples)))
    ][1:]
    assert resumed.forward_passes == sum(-(-rows // 2) for rows in remaining)
    fresh, _ = _extract(image_folder, tmp_path / "b")
    for split in splits:
        assert np.allclose(cache.load(split)[0], fresh.load(split)[0], atol=1e-3)


def _blobs(n: int, dim: int = 16, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 2.0, (classes, dim))
    labels = rng.integers(0, classes, n)
    features = centers[labels] + rng.normal(0, 1.5, (n, dim)) + 5.0  # offset: standardisation matters
    return torch.tensor(features, dtype=torch.float32), torch.tensor(labels)


def test_sgd_sweep_picks_on_val_and_beats_chance() -> None:
    x, y = _blobs(1200)
    train, val, test = (x[:600], y[:600]), (x[600:800], y[600:800]), (x[800:], y[800:])
    result = sgd_probe(train, val, test, 3, lrs=(1e-4, 0.1, 1.0), wds=(0.0, 10.0), epochs=10, batch_size=64)
    assert len(result.sweep) == 6
    assert result.chosen["lr"] != 1e-4 and result.chosen["wd"] == 0.0  # tiny lr / huge wd lose on val
    assert result.val_acc == max(r["val_acc"] for r in result.sweep)
    assert result.test_acc is not None and result.test_acc > 0.8
    assert result.weight.shape == (3, 16)


def test_lbfgs_matches_scikit_learn_logistic_regression() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = _blobs(900)
    train, val, test = (x[:500], y[:500]), (x[500:650], y[500:650]), (x[650:], y[650:])
    grid = (1e-3, 1e-2, 1e-1, 1.0)
    ours = lbfgs_probe(train, val, test, 3, c_grid=grid)
    both_x, both_y = torch.cat([train[0], val[0]]).numpy(), torch.cat([train[1], val[1]]).numpy()
    scaler = StandardScaler().fit(both_x)
    reference = LogisticRegression(C=ours.chosen["C"], max_iter=2000).fit(scaler.transform(both_x), both_y)
    sk_acc = reference.score(scaler.transform(test[0].numpy()), test[1].numpy())
    assert ours.test_acc == pytest.approx(sk_acc, abs=0.005)
    ours_pred = (test[0] @ ours.weight.T + ours.bias).argmax(1).numpy()
    assert (ours_pred == reference.predict(scaler.transform(test[0].numpy()))).mean() > 0.98


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
    assert '"forward_passes": 0' in report and '"solver": "sgd"' in report
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
    splits, names = _splits(Path(folder))
    model, config = create_backbone(TINY_BACKBONE, "none", image_size=TINY_SIZE)
    cache = FeatureCache(build_spec(TINY_BACKBONE, model.pretrained_cfg["weights"], config, splits), root, shard_size=4)
    extractor = FeatureExtractor(model, config, torch.device("cpu"), "32")
    extract_splits(extractor, cache, splits, config, names, batch_size=2, progress=False)
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
    (ddp_folder,) = [p for p in (tmp_path / "ddp").iterdir() if p.is_dir()]
    assert ddp_folder.name == single.folder.name  # the same key: one cache
    passes = [torch.load(tmp_path / "ddp" / f"passes{r}.pt") for r in (0, 1)]
    assert all(p > 0 for p in passes)  # both ranks did part of the work
    ddp = FeatureCache(single.spec, tmp_path / "ddp", shard_size=4)
    assert ddp.is_complete()
    for split in ("train", "val", "test"):
        assert np.allclose(ddp.load(split)[0], single.load(split)[0], atol=1e-3)
        assert np.array_equal(ddp.load(split)[1], single.load(split)[1])


def test_linear_probe_classifier_trains_on_the_feature_cache(image_folder: Path, tmp_path: Path) -> None:
    import pytorch_lightning as pl

    from vision_transfer.tasks import ImageClassifier

    def fit() -> tuple[ImageClassifier, int]:
        model = ImageClassifier(
            TINY_BACKBONE, weights="none", image_size=TINY_SIZE, mode="linear_probe",
            cache_features=True, cache_dir=str(tmp_path / "cache"), lr=0.05, warmup_epochs=0,
        )  # fmt: skip
        calls = []
        model.backbone.register_forward_hook(lambda *args: calls.append(1))
        trainer = pl.Trainer(
            max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(model, ImageFolderDataModule(str(image_folder), batch_size=8, num_workers=0))
        assert torch.isfinite(trainer.callback_metrics["train/loss"]) and "val/acc" in trainer.callback_metrics
        return model, len(calls)

    _, first = fit()
    model, second = fit()
    assert first > 0 and second == 0  # 3 epochs, no backbone forward pass on a warm cache
    x = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    assert model(x).shape == (2, 3)  # images still work end to end (test, predict, export)
    with pytest.raises(Exception, match="needs mode='linear_probe'"):
        ImageClassifier(TINY_BACKBONE, weights="none", mode="full", cache_features=True)
