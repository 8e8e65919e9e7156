"""Imbalanced classes: balanced sampling, class weights, logit adjustment, focal loss, balanced metrics."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from tests.conftest import TINY_BACKBONE, TINY_SIZE, tiny_fit_args, write_folder
from tests.test_cli import run_cli
from vision_transfer.datamodules.image import BalancedSampler
from vision_transfer.losses import CrossEntropyLoss, balanced_class_weights, log_prior


def test_balanced_sampler_draws_every_class_about_equally_and_is_seeded_by_epoch() -> None:
    labels = np.repeat([0, 1, 2], [900, 90, 10])
    sampler = BalancedSampler(labels, seed=3)
    draw = np.array(list(sampler))
    assert len(draw) == len(labels)
    frequencies = np.bincount(labels[draw], minlength=3) / len(draw)
    assert np.allclose(frequencies, 1 / 3, atol=0.05), frequencies  # vs 0.90 / 0.09 / 0.01 in the data
    assert list(sampler) == list(draw)  # the same epoch draws the same indices (a resumed run too)
    sampler.set_epoch(1)
    assert list(sampler) != list(draw)


def test_balanced_sampler_ranks_share_one_global_draw() -> None:
    labels = np.repeat([0, 1], [50, 7])
    single = BalancedSampler(labels, seed=0)
    ranks = []
    for rank in (0, 1):
        sampler = BalancedSampler(labels, seed=0)
        sampler.num_replicas, sampler.rank = 2, rank
        sampler.num_samples = -(-len(labels) // 2)
        ranks.append(list(sampler))
    assert len(ranks[0]) == len(ranks[1]) == 29
    # interleaved, the two ranks' shares are one draw of the same seed and epoch
    generator = torch.Generator().manual_seed(0)
    global_draw = torch.multinomial(single.weights, 58, replacement=True, generator=generator).tolist()
    assert ranks[0] == global_draw[0::2] and ranks[1] == global_draw[1::2]


def test_class_weights_and_logit_adjustment_in_the_loss() -> None:
    counts = torch.tensor([90.0, 9.0, 1.0])
    weights = balanced_class_weights(counts)
    assert torch.allclose(weights, 100 / (3 * counts))  # scikit-learn's "balanced"
    logits, labels = torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    weighted = CrossEntropyLoss(class_weight=weights)(logits, labels)
    assert torch.allclose(weighted, F.cross_entropy(logits, labels, weight=weights))
    prior = 1.5 * log_prior(counts)
    adjusted = CrossEntropyLoss(logit_prior=prior)(logits, labels)
    assert torch.allclose(adjusted, F.cross_entropy(logits + prior, labels))  # Menon et al. 2021, eq. 10


def test_focal_loss_is_cross_entropy_at_gamma_zero_and_discounts_easy_examples() -> None:
    logits, labels = torch.randn(16, 4) * 3, torch.randint(0, 4, (16,))
    plain = F.cross_entropy(logits, labels)
    assert torch.allclose(CrossEntropyLoss(focal_gamma=1e-12)(logits, labels), plain, atol=1e-5)
    assert CrossEntropyLoss(focal_gamma=2.0)(logits, labels) < plain


def test_posthoc_logit_adjustment_moves_predictions_to_the_rare_class() -> None:
    from vision_transfer.tasks import ImageClassifier

    model = ImageClassifier(
        TINY_BACKBONE, weights="none", image_size=TINY_SIZE, logit_adjustment="posthoc",
        class_names=["common", "rare"], class_counts=[99.0, 1.0],
    )  # fmt: skip
    tied = torch.zeros(1, 2)  # the raw scores cannot tell: the adjusted ones favour the rare class
    adjusted = model.prediction_logits(tied)
    assert torch.allclose(adjusted, -log_prior(torch.tensor([99.0, 1.0]))[None]) and adjusted.argmax() == 1
    assert model.prediction_settings()["logit_shift"] == pytest.approx(adjusted[0].tolist())


def test_the_test_confusion_matrix_counts_the_adjusted_predictions() -> None:
    """per_class.csv, the confusion plot and summary.md's recall come from ``test_scores``: it must
    count the predictions the logged test metrics count (post-hoc adjustment applied)."""
    from vision_transfer.tasks import ImageClassifier

    model = ImageClassifier(
        TINY_BACKBONE, weights="none", image_size=TINY_SIZE, logit_adjustment="posthoc", logit_adjustment_tau=50.0,
        class_names=["common", "rare"], class_counts=[99.0, 1.0],
    )  # fmt: skip
    model.eval()
    images, labels = torch.randn(6, 3, TINY_SIZE, TINY_SIZE), torch.tensor([0, 0, 0, 1, 1, 1])
    with torch.no_grad(), pytest.warns(UserWarning, match="trainer"):
        logits = model.test_step((images, labels), 0)
    predicted = model.prediction_logits(logits).argmax(1)
    assert (predicted == 1).all()  # tau 50: the shift decides every prediction
    scores = model.test_scores.compute()
    assert scores["confusion_matrix"].tolist() == [[0, 3], [0, 3]]
    assert scores["balanced_acc"] == pytest.approx(0.5)


def _long_tailed_folder(root: Path) -> Path:
    for name, n, seed in (("circle", 24, 0), ("square", 6, 1), ("stripes", 3, 2)):
        write_folder(root, per_class=n, seed=seed, classes=(name,))
    return root


@pytest.mark.parametrize(
    "option",
    [
        "--data.init_args.balanced_sampling=true",
        "--model.class_weighting=balanced",
        "--model.logit_adjustment=loss",
        "--model.logit_adjustment=posthoc",
        "--model.logit_adjustment=posthoc --model.logit_adjustment_tau=50",  # the shift decides every prediction
        "--model.focal_gamma=2",
    ],
)
def test_every_imbalance_option_trains_from_the_cli_and_logs_balanced_accuracy(tmp_path: Path, option: str) -> None:
    folder = _long_tailed_folder(tmp_path / "images")
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={folder}"]
    assert run_cli(tiny_fit_args(data, tmp_path, *option.split(), "--trainer.max_epochs=2")) == 0
    run = next((tmp_path / "runs" / "lightning_logs").glob("version_*"))
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {"val/balanced_acc", "test/balanced_acc", "val/f1_macro", "test/f1_macro"} <= set(rows[0])
    # the confusion matrix and per_class.csv come from the same predictions as the logged metrics
    # (post-hoc adjustment included), for every option
    test = next(r for r in rows if r.get("test/acc"))
    with (run / "confusion_matrix.csv").open() as f:
        matrix = np.array([[int(v) for v in row[1:]] for row in list(csv.reader(f))[1:]])
    recall = matrix.diagonal() / matrix.sum(axis=1)
    assert matrix.trace() / matrix.sum() == pytest.approx(float(test["test/acc"]), abs=1e-4)
    assert recall.mean() == pytest.approx(float(test["test/balanced_acc"]), abs=1e-4)
    summary = (run / "summary.md").read_text()
    assert "Per-class recall on test, lowest first" in summary


def test_check_data_reports_the_imbalance_ratio_and_names_the_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _long_tailed_folder(tmp_path / "images")
    assert run_cli(["check-data", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "imbalance ratio (largest / smallest class in train): 8.0" in out and "warning" not in out
    write_folder(folder, per_class=40, seed=4, classes=("circle",))  # now 40 : 3
    assert run_cli(["check-data", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "imbalance ratio (largest / smallest class in train): 13.3" in out
    assert "warning: imbalance above 10" in out and "balanced_sampling" in out and "logit_adjustment" in out


@pytest.mark.parametrize("solver", ["lbfgs", "sgd"])
def test_probe_command_weighs_classes_and_reports_balanced_metrics(
    tmp_path: Path, solver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    monkeypatch.chdir(tmp_path)
    folder = _long_tailed_folder(tmp_path / "images")
    common = [
        "probe", f"--backbone={TINY_BACKBONE}", "--weights=none", f"--image_size={TINY_SIZE}",
        "--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.root={folder}", "--data.num_workers=0",
        f"--cache_dir={tmp_path / 'cache'}", f"--solver={solver}",
        *(["--c_grid_size=5"] if solver == "lbfgs" else ["--epochs=3", "--lrs=[0.1]", "--wds=[0.0]"]),
    ]  # fmt: skip
    reports = {}
    for weighting in ("plain", "balanced"):
        extra = ["--class_weight=balanced"] if weighting == "balanced" else []
        assert run_cli([*common, f"--output={weighting}", *extra]) == 0
        reports[weighting] = json.loads((tmp_path / weighting / "probe.json").read_text())
    assert reports["plain"]["class_weight"] is None and reports["balanced"]["class_weight"] == "balanced"
    for report in reports.values():
        assert 0 <= report["balanced_accuracy"] <= 1 and 0 <= report["f1_macro"] <= 1
    # the weights change the fit (the same features, the same grid)
    assert reports["plain"]["chosen"] != reports["balanced"]["chosen"] or (
        reports["plain"]["val_acc"] != reports["balanced"]["val_acc"]
        or reports["plain"]["test_acc"] != reports["balanced"]["test_acc"]
    )
