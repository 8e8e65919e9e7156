"""WiSE-FT and model soups: the weight-space functions, the BatchNorm statistics, and both commands end to end.

The commands run on fine-tunes of a tiny "pre-trained" test_efficientnet (random weights saved to a file, so
the checkpoints record file weights with a sha256), trained a few steps each, once per module.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from torch import nn
from torch.nn import functional as F

from tests.conftest import TINY_BACKBONE, TINY_SIZE, tiny_data, write_folder
from vision_transfer.cli import main
from vision_transfer.errors import ConfigError, DataError, WeightsError
from vision_transfer.tuning.averaging import average, has_batch_norm, interpolate, recompute_bn_statistics

DEFAULT_ALPHAS = [i / 10 for i in range(11)]
TABLE_ROW = re.compile(r"^(?P<name>\S.*?)\s{2,}(?P<val>\d\.\d{4})\s+(?P<test>\d\.\d{4}|-)(?P<chosen>\s+<- chosen)?$")
TRAIN_BATCHES = 3  # 8 training images per class, 3 classes, batches of 8 (the last incomplete one dropped)


# -- the weight-space functions ------------------------------------------------------------------
def _states(dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    a = {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=generator).to(dtype),
        "bn.running_mean": torch.randn(4, generator=generator).to(dtype),
        "bn.num_batches_tracked": torch.tensor(3),
        "mask": torch.tensor([True, False]),
    }
    b = {
        k: (v + torch.randn(v.shape, generator=generator).to(dtype)) if v.is_floating_point() else v
        for k, v in a.items()
    }
    b["bn.num_batches_tracked"] = torch.tensor(7)
    b["mask"] = torch.tensor([False, True])
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_interpolate_gives_the_endpoints_bit_for_bit_and_the_mean_halfway(dtype: torch.dtype) -> None:
    a, b = _states(dtype)
    floats = [k for k, v in a.items() if v.is_floating_point()]
    at0, at1, half = interpolate(a, b, 0.0), interpolate(a, b, 1.0), interpolate(a, b, 0.5)
    for key in floats:
        assert torch.equal(at0[key], a[key]) and at0[key].dtype == dtype
        assert torch.equal(at1[key], b[key])
        assert torch.equal(half[key], ((a[key].double() + b[key].double()) / 2).to(dtype))
        assert not torch.equal(half[key], a[key]) and not torch.equal(half[key], b[key])
    for result in (at0, at1, half):  # counts and flags are not weights: b's, at every alpha
        assert int(result["bn.num_batches_tracked"]) == 7 and result["bn.num_batches_tracked"].dtype == torch.int64
        assert torch.equal(result["mask"], b["mask"])
    at0["conv.weight"].add_(1)  # a copy, not the caller's tensor
    assert not torch.equal(at0["conv.weight"], a["conv.weight"])


def test_interpolate_and_average_refuse_states_of_different_models_naming_the_key() -> None:
    a, b = _states(torch.float32)
    with pytest.raises(WeightsError, match=r"ft.ckpt has no 'bn.running_mean', which pre has"):
        interpolate(a, {k: v for k, v in b.items() if k != "bn.running_mean"}, 0.5, names=("pre", "ft.ckpt"))
    with pytest.raises(WeightsError, match=r"pre has no 'extra', which ft.ckpt has"):
        interpolate(a, {**b, "extra": torch.zeros(1)}, 0.5, names=("pre", "ft.ckpt"))
    with pytest.raises(
        WeightsError, match=r"'conv.weight' is torch.float32 \(4, 3, 3, 3\) in state 0, .* \(4, 3, 1, 1\)"
    ):
        average([a, {**b, "conv.weight": torch.zeros(4, 3, 1, 1)}])
    with pytest.raises(WeightsError, match=r"'bn.running_mean' is torch.float32 .* torch.float16"):
        average([a, {**b, "bn.running_mean": b["bn.running_mean"].half()}])
    for alpha in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="alpha"):
            interpolate(a, b, alpha)
    for weights in ([1.0], [1.0, -1.0], [0.0, 0.0], [1.0, float("inf")]):
        with pytest.raises(ConfigError, match="weights"):
            average([a, b], weights)


def test_average_of_identical_states_is_that_state_and_weights_match_interpolate() -> None:
    a, b = _states(torch.float32)
    same = average([a, a, a])
    assert all(torch.equal(same[k], a[k]) for k in a)
    weighted = average([a, b], [1.0, 3.0])
    expected = interpolate(a, b, 0.75)
    for key in ("conv.weight", "bn.running_mean"):
        torch.testing.assert_close(weighted[key], expected[key], rtol=0, atol=1e-6)
    assert int(weighted["bn.num_batches_tracked"]) == 3  # average: the first state's counts
    assert torch.equal(average([a, b], [0.0, 1.0])["conv.weight"], b["conv.weight"])


# -- BatchNorm statistics -------------------------------------------------------------------------
class TwoNorms(nn.Module):
    """conv -> BN -> dropout -> conv -> BN: the second BN's statistics tell whether dropout ran."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3)
        self.drop = nn.Dropout(0.9)
        self.conv2, self.bn2 = nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.drop(self.bn1(self.conv1(x)))))


def _batches(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(6, 3, 8, 8, generator=generator) * (i + 1) + i for i in range(count)]


@torch.no_grad()
def _expected_statistics(model: TwoNorms, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each BN's running mean and (unbiased) variance as the average over the batches of their batch
    statistics, computed directly (BN normalising by batch statistics, dropout off)."""
    sums: dict[str, list[torch.Tensor]] = {"bn1.mean": [], "bn1.var": [], "bn2.mean": [], "bn2.var": []}
    for x in batches:
        y1 = model.conv1(x)
        z1 = F.batch_norm(y1, None, None, model.bn1.weight, model.bn1.bias, training=True, eps=model.bn1.eps)
        y2 = model.conv2(z1)
        for name, y in (("bn1", y1), ("bn2", y2)):
            sums[f"{name}.mean"].append(y.mean((0, 2, 3)))
            sums[f"{name}.var"].append(y.var((0, 2, 3), unbiased=True))
    return {k: torch.stack(v).mean(0) for k, v in sums.items()}


@pytest.mark.parametrize("as_tuples", [False, True])
@pytest.mark.parametrize("model_training", [False, True])
def test_recompute_sets_the_data_statistics_and_restores_modes_and_momenta(
    as_tuples: bool, model_training: bool
) -> None:
    model = TwoNorms()
    model.train(model_training)
    model.conv2.train(not model_training)  # modes restored module by module, not by one train()/eval()
    modes = {name: m.training for name, m in model.named_modules()}
    batches = _batches(6)
    expected = _expected_statistics(model, batches[:4])
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "tracked" not in k}
    loader = [(x, torch.zeros(len(x))) for x in batches] if as_tuples else batches
    assert recompute_bn_statistics(model, loader, 4) == 4  # of 6: only as many as asked
    for name in ("bn1", "bn2"):
        norm = getattr(model, name)
        torch.testing.assert_close(norm.running_mean, expected[f"{name}.mean"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(norm.running_var, expected[f"{name}.var"], rtol=1e-4, atol=1e-5)
        assert int(norm.num_batches_tracked) == 4
    assert (model.bn1.momentum, model.bn2.momentum) == (0.3, 0.1)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # nothing trained


def test_recompute_uses_what_the_loader_has_and_refuses_an_empty_one_unchanged() -> None:
    model = TwoNorms()
    assert recompute_bn_statistics(model, _batches(2), 50) == 2
    assert int(model.bn1.num_batches_tracked) == 2
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(DataError, match="loader is empty"):
        recompute_bn_statistics(model, [], 5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ConfigError, match="batches=0"):
        recompute_bn_statistics(model, _batches(1), 0)


def test_a_model_without_batch_norm_has_nothing_to_recompute() -> None:
    vit = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=TINY_SIZE)
    assert not has_batch_norm(vit)
    assert has_batch_norm(timm.create_model(TINY_BACKBONE, pretrained=False, num_classes=0))
    before = copy.deepcopy(vit.state_dict())
    assert recompute_bn_statistics(vit, [torch.randn(2, 3, TINY_SIZE, TINY_SIZE)], 5) == 0
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in before.items())


# -- fine-tunes of one tiny pre-trained model ------------------------------------------------------
@dataclass(frozen=True)
class Runs:
    data: Path
    pretrained: Path  # the "pre-trained" weights file
    ft_a: Path
    ft_b: Path
    probe: Path
    scratch: Path  # fine-tuned from random init


def _train(data: Any, steps: int, seed: int, **options: Any) -> Any:
    import pytorch_lightning as pl

    from vision_transfer.tasks import ImageClassifier

    torch.manual_seed(seed)
    model = ImageClassifier.for_data(data, backbone=TINY_BACKBONE, image_size=TINY_SIZE, **options)
    trainer = pl.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(model, data)
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("averaging")
    data_dir = root / "data"
    for split, n, seed in (("train", 8, 0), ("val", 4, 1), ("test", 4, 2)):
        write_folder(data_dir / split, per_class=n, seed=seed)
    torch.manual_seed(1)
    pretrained = root / "pretrained.safetensors"
    backbone = timm.create_model(TINY_BACKBONE, pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(pretrained))
    data = tiny_data(data_dir)
    weights = str(pretrained)
    paths = {
        "ft_a": _train(data, 8, 0, weights=weights, mode="full", lr=3e-3),
        "ft_b": _train(data, 8, 1, weights=weights, mode="full", lr=1e-2),
        "probe": _train(data, 8, 2, weights=weights, mode="linear_probe", lr=3e-2),
        "scratch": _train(data, 2, 3, weights="none", mode="full"),
    }
    saved = {name: model.save_standalone_checkpoint(root / f"{name}.ckpt", data) for name, model in paths.items()}
    return Runs(data_dir, pretrained, **saved)


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _accuracy(checkpoint: Path, folder: Path) -> float:
    """Top-1 accuracy of a checkpoint on a class-per-folder split, through load_classifier (not the commands)."""
    from vision_transfer.export import load_classifier

    classifier = load_classifier(checkpoint)
    paths, labels = [], []
    for name in classifier.class_names:
        files = sorted((folder / name).glob("*.png"))
        paths += files
        labels += [name] * len(files)
    predicted = [row[0][0] for row in classifier.predict(paths, top_k=1)]
    return sum(p == y for p, y in zip(predicted, labels, strict=True)) / len(labels)


def _state(path: Path) -> dict[str, torch.Tensor]:
    from vision_transfer.checkpoint import read_checkpoint

    return read_checkpoint(path)[1]["state_dict"]  # type: ignore[no-any-return]


def _table_rows(out: str, first: str) -> dict[str, tuple[float, float | None, bool]]:
    """The printed table: name -> (val, test, marked chosen)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first) and "val/acc" in line)
    rows: dict[str, tuple[float, float | None, bool]] = {}
    for line in lines[start + 1 :]:
        match = TABLE_ROW.match(line)
        if match is None:
            break
        test = None if match["test"] == "-" else float(match["test"])
        rows[match["name"]] = (float(match["val"]), test, match["chosen"] is not None)
    return rows


def test_wise_ft_sweeps_every_alpha_picks_the_best_on_val_and_writes_a_checkpoint_that_scores_the_same(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vision_transfer.app.lightning_cli import VisionTransferCLI

    out_dir = tmp_path / "wise"
    code, out, err = _run(["wise-ft", str(runs.ft_a), "--out", str(out_dir)], capsys)
    assert code == 0, err
    report = json.loads((out_dir / "wise_ft.json").read_text())
    assert [row["alpha"] for row in report["alphas"]] == DEFAULT_ALPHAS
    vals = [row["val"] for row in report["alphas"]]
    chosen = report["chosen_alpha"]
    assert chosen == DEFAULT_ALPHAS[vals.index(max(vals))]  # the first maximum: ties to the smaller alpha
    # the BatchNorm statistics of each interpolated model are recomputed; the endpoints keep their own
    assert [row["bn_batches"] for row in report["alphas"]] == [0] + [TRAIN_BATCHES] * 9 + [0]
    assert report["bn_stats"] == "recompute" and "recomputed" in out
    # the table: one row per alpha, with the json's numbers, the chosen one marked
    rows = _table_rows(out, "alpha")
    assert list(rows) == [f"{a:g}" for a in DEFAULT_ALPHAS]
    for row in report["alphas"]:
        printed = (round(row["val"], 4), round(row["test"], 4), row["alpha"] == chosen)
        assert rows[f"{row['alpha']:g}"] == pytest.approx(printed, abs=1e-9)
    # alpha 1 is the fine-tune itself
    assert report["alphas"][-1]["test"] == _accuracy(runs.ft_a, runs.data / "test")
    assert report["alphas"][-1]["val"] == _accuracy(runs.ft_a, runs.data / "val")
    # the written checkpoint: its test accuracy is the table's, through `test --ckpt_path` and load_classifier
    written = out_dir / f"wise_ft_alpha{chosen:g}.ckpt"
    assert report["chosen_checkpoint"] == str(written.resolve()) and written.is_file()
    expected = next(row["test"] for row in report["alphas"] if row["alpha"] == chosen)
    assert _accuracy(written, runs.data / "test") == expected
    results: list[Any] = []
    original = VisionTransferCLI.test

    def record(self: Any, model: Any, **kwargs: Any) -> Any:
        results.extend(original(self, model, **kwargs))
        return results

    monkeypatch.setattr(VisionTransferCLI, "test", record)
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(["test", f"--ckpt_path={written}", "--trainer.enable_progress_bar=false"], capsys)
    assert code == 0, err
    assert results[0]["test/acc"] == pytest.approx(expected, abs=1e-6)  # logged as float32


@pytest.mark.parametrize("bn_stats", ["recompute", "interpolate"])
def test_wise_ft_checkpoint_holds_the_interpolated_weights_and_its_bn_statistics(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str], bn_stats: str
) -> None:
    from vision_transfer.checkpoint import read_checkpoint

    code, out, err = _run(
        ["wise-ft", str(runs.ft_a), "--alphas", "0.5", "--bn_stats", bn_stats, "--out", str(tmp_path)], capsys
    )
    assert code == 0, err
    written = tmp_path / "wise_ft_alpha0.5.ckpt"
    state, fine = _state(written), _state(runs.ft_a)
    from safetensors.torch import load_file

    pre = {f"backbone.{k}": v for k, v in load_file(str(runs.pretrained)).items()}
    expected = interpolate(pre, {k: fine[k] for k in pre}, 0.5)
    weights = [k for k in pre if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(state[k], expected[k]) for k in weights)
    assert torch.equal(state["head.weight"], fine["head.weight"])  # the fine-tuned head, without --probe
    stats = [k for k in pre if k.endswith("running_mean")]
    if bn_stats == "interpolate":
        assert all(torch.equal(state[k], expected[k]) for k in stats)
        assert "averaged with the weights" in out
    else:
        assert not any(torch.allclose(state[k], expected[k]) for k in stats)
        assert all(int(state[k.replace("running_mean", "num_batches_tracked")]) == TRAIN_BATCHES for k in stats)
        assert f"recomputed for each interpolated model (alpha 0 and 1 keep their own) on {TRAIN_BATCHES} " in out
    # a plain checkpoint that started where the fine-tune did, re-calibrated on val
    entry = read_checkpoint(written)[0]
    assert entry.initial_weights == read_checkpoint(runs.ft_a)[0].initial_weights
    assert entry.calibration is not None and entry.calibration["temperature"] == pytest.approx(
        float(state["temperature"])
    )
    assert float(state["temperature"]) != 1.0 and "calibrated on val: temperature" in out


def test_wise_ft_with_a_probe_interpolates_the_whole_model_between_probe_and_fine_tune(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(
        ["wise-ft", str(runs.ft_a), "--probe", str(runs.probe), "--alphas", "0,1", "--out", str(tmp_path)], capsys
    )
    assert code == 0, err
    report = json.loads((tmp_path / "wise_ft.json").read_text())
    assert report["probe"] == str(runs.probe.resolve()) and report["interpolated"] == "backbone and head"
    assert f"head: interpolated with the probe {runs.probe.resolve()}" in out
    at0, at1 = report["alphas"]
    for split in ("val", "test"):  # alpha 0 is the probe itself, alpha 1 the fine-tune
        assert at0[split] == _accuracy(runs.probe, runs.data / split)
        assert at1[split] == _accuracy(runs.ft_a, runs.data / split)
    code, _, err = _run(
        ["wise-ft", str(runs.ft_a), "--probe", str(runs.probe), "--alphas", "0.5", "--out", str(tmp_path / "half")],
        capsys,
    )
    assert code == 0, err
    state, probe, fine = _state(tmp_path / "half" / "wise_ft_alpha0.5.ckpt"), _state(runs.probe), _state(runs.ft_a)
    for key in ("head.weight", "head.bias", "backbone.conv_stem.weight"):
        assert torch.equal(state[key], ((probe[key].double() + fine[key].double()) / 2).float())
    assert not torch.equal(probe["head.weight"], fine["head.weight"])


def _untrained(tmp_path: Path, name: str, data_dir: Path, **options: Any) -> Path:
    """A checkpoint built for the data without training (what the refusals need)."""
    from vision_transfer.backbones import preprocessing
    from vision_transfer.datamodules import ImageFolderDataModule
    from vision_transfer.tasks import ImageClassifier

    backbone = options.pop("backbone", TINY_BACKBONE)
    size = options.pop("image_size", TINY_SIZE)
    weights = options.pop("weights")
    data_options = options.pop("data", {})
    config = preprocessing(backbone, weights, size)
    data = ImageFolderDataModule(str(data_dir), batch_size=8, num_workers=0, data_config=config, **data_options)
    model = ImageClassifier.for_data(data, backbone=backbone, weights=weights, image_size=size, **options)
    return model.save_standalone_checkpoint(tmp_path / f"{name}.ckpt", data)


def test_wise_ft_refuses_what_it_cannot_interpolate(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = ["--out", str(tmp_path)]
    code, _, err = _run(["wise-ft", str(runs.scratch), *out], capsys)
    assert code == 2 and f"{runs.scratch}: trained from random init" in err and "soup" in err
    code, _, err = _run(["wise-ft", str(runs.ft_a), "--probe", str(runs.ft_b), *out], capsys)
    assert code == 2 and f"{runs.ft_b}: its backbone is not the pre-trained weights" in err
    two = write_folder(tmp_path / "two", per_class=4, classes=("circle", "square"))
    other = _untrained(tmp_path, "two_classes", two, weights=str(runs.pretrained), mode="linear_probe")
    code, _, err = _run(["wise-ft", str(runs.ft_a), "--probe", str(other), *out], capsys)
    assert code == 2 and f"{runs.ft_a} and {other} differ in classes" in err
    torch.manual_seed(5)
    elsewhere = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    model = timm.create_model(TINY_BACKBONE, pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(elsewhere))
    code, _, err = _run(["wise-ft", str(runs.ft_a), "--weights", str(elsewhere), *out], capsys)
    assert code == 2 and "give --weights the weights it started from" in err
    code, _, err = _run(["wise-ft", str(runs.ft_a), "--alphas", "0,1.5", *out], capsys)
    assert code == 2 and "--alphas '0,1.5'" in err
    assert not list(tmp_path.glob("wise_ft*"))  # nothing written by a refusal


# -- soups ----------------------------------------------------------------------------------------
def test_a_uniform_soup_of_one_checkpoint_thrice_is_that_checkpoint(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["soup", *[str(runs.ft_a)] * 3, "--bn_stats", "interpolate", "--out", str(tmp_path)]
    code, _, err = _run(args, capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "soup.json").read_text())
    fine = _state(runs.ft_a)
    for recipe in ("uniform", "greedy"):
        state = _state(tmp_path / f"soup_{recipe}.ckpt")
        assert all(torch.equal(state[k], fine[k]) for k in fine if k.startswith(("backbone.", "head.")))
        assert (report[recipe]["val"], report[recipe]["test"]) == (
            report["ingredients"][0]["val"],
            report["ingredients"][0]["test"],
        )
    assert len(report["greedy"]["ingredients"]) == 3  # an equal val score does not drop: kept


def test_greedy_soup_adds_ingredients_by_val_and_never_scores_below_the_best_one(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoints = [runs.probe, runs.ft_b, runs.ft_a]
    code, out, err = _run(["soup", *map(str, checkpoints), "--out", str(tmp_path)], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "soup.json").read_text())
    ingredients = report["ingredients"]
    for item, path in zip(ingredients, checkpoints, strict=True):
        assert item["checkpoint"] == str(path)
        assert (item["val"], item["test"]) == (_accuracy(path, runs.data / "val"), _accuracy(path, runs.data / "test"))
    greedy, tried = report["greedy"], report["greedy"]["tried"]
    by_val = sorted(ingredients, key=lambda item: -item["val"])  # stable: ties in the order given
    assert [t["checkpoint"] for t in tried] == [item["checkpoint"] for item in by_val]
    current = tried[0]["val"]
    for step in tried[1:]:  # each kept exactly when the soup's val score did not drop
        assert step["kept"] == (step["val"] >= current)
        current = step["val"] if step["kept"] else current
    assert greedy["val"] == current >= max(item["val"] for item in ingredients)
    assert greedy["ingredients"] == [t["checkpoint"] for t in tried if t["kept"]]
    for recipe in ("uniform", "greedy"):
        written = tmp_path / f"soup_{recipe}.ckpt"
        assert report[recipe]["test"] == _accuracy(written, runs.data / "test")
    uniform = _state(tmp_path / "soup_uniform.ckpt")
    states = [_state(p) for p in checkpoints]
    expected = sum(s["head.weight"].double() for s in states) / 3
    assert torch.equal(uniform["head.weight"], expected.float())
    rows = _table_rows(out, "model")
    assert list(rows)[:3] == [str(p) for p in checkpoints]
    assert any(name.startswith("uniform soup (3 of 3)") for name in rows)
    assert f"recomputed for each soup of two or more checkpoints on {TRAIN_BATCHES} training batches" in out


@pytest.mark.parametrize("difference", ["classes", "backbone", "preprocessing", "data"])
def test_soup_refuses_checkpoints_that_are_not_fine_tunes_of_one_model_on_one_task(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str], difference: str
) -> None:
    weights = str(runs.pretrained)
    if difference == "classes":
        two = write_folder(tmp_path / "two", per_class=4, classes=("circle", "square"))
        other = _untrained(tmp_path, "other", two, weights=weights)
        expected = "differ in classes: ['circle', 'square', 'stripes'] vs ['circle', 'square']"
    elif difference == "backbone":
        other = _untrained(tmp_path, "other", runs.data, backbone="test_vit", weights="none")
        expected = f"differ in backbone: '{TINY_BACKBONE}' vs 'test_vit'"
    elif difference == "preprocessing":
        other = _untrained(tmp_path, "other", runs.data, weights=weights, image_size=48)
        expected = "differ in preprocessing (data_config): input_size [3, 32, 32] vs [3, 48, 48]"
    else:
        other = _untrained(tmp_path, "other", runs.data, weights=weights, data={"split_seed": 1})
        expected = "differ in data: split_seed 0 vs 1"
    code, _, err = _run(["soup", str(runs.ft_a), str(other), "--out", str(tmp_path)], capsys)
    assert code == 2, err
    assert f"{runs.ft_a} and {other} {expected}" in err and "a soup averages fine-tunes" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "soup.json").exists()


def test_soup_needs_two_checkpoints(runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["soup", str(runs.ft_a), "--out", str(tmp_path)], capsys)
    assert code == 2 and "two or more checkpoints; 1 given" in err


def test_soups_of_a_backbone_without_batch_norm_say_there_is_nothing_to_recompute(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _untrained(tmp_path, "vit_a", runs.data, backbone="test_vit", weights="none")
    second = _untrained(tmp_path, "vit_b", runs.data, backbone="test_vit", weights="none", drop_rate=0.1)
    code, out, err = _run(["soup", str(first), str(second), "--recipe", "uniform", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "soup.json").read_text())
    assert report["bn_stats"] == "none (no BatchNorm)" and report["uniform"]["bn_batches"] == 0
    assert "test_vit has no BatchNorm" in out and "greedy" not in report
    assert (tmp_path / "soup_uniform.ckpt").is_file() and not (tmp_path / "soup_greedy.ckpt").exists()


# -- adapters ---------------------------------------------------------------------------------------
@pytest.fixture
def lora_checkpoint(runs: Runs, tmp_path: Path) -> Iterator[Path]:
    pytest.importorskip("peft")
    model = _train(tiny_data(runs.data), 4, 4, weights=str(runs.pretrained), mode="full", peft="lora", lr=1e-2)
    yield model.save_standalone_checkpoint(tmp_path / "lora.ckpt", tiny_data(runs.data))


def test_wise_ft_of_a_lora_checkpoint_interpolates_its_merged_weights_and_writes_a_plain_model(
    runs: Runs, lora_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vision_transfer.checkpoint import read_checkpoint

    code, _, err = _run(["wise-ft", str(lora_checkpoint), "--alphas", "1", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    written = tmp_path / "wise_ft_alpha1.ckpt"
    entry, content = read_checkpoint(written)
    assert entry.settings["peft"] == "none"
    assert not any("lora" in key for key in content["state_dict"])
    report = json.loads((tmp_path / "wise_ft.json").read_text())
    assert report["alphas"][0]["test"] == _accuracy(lora_checkpoint, runs.data / "test")
    assert _accuracy(written, runs.data / "test") == report["alphas"][0]["test"]
