"""Audit findings of the trust issue: each option acts on the path that accepts it, once, with one definition."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from tests.conftest import TINY_BACKBONE, TINY_SIZE, tiny_data, tiny_model, write_folder
from vision_transfer.data.mixing import BatchMixer
from vision_transfer.losses import CrossEntropyLoss
from vision_transfer.tasks import ImageClassifier


def _quiet(fn, *args):  # type: ignore[no-untyped-def]  # steps without a Trainer warn about self.log
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


def _long_tailed_folder(root: Path) -> Path:
    for name, n, seed in (("circle", 24, 0), ("square", 6, 1), ("stripes", 3, 2)):
        write_folder(root, per_class=n, seed=seed, classes=(name,))
    return root


def _pixel_logits(images: torch.Tensor) -> torch.Tensor:
    """Logits read off the first pixel's channels: views (a mirror) give other logits, no training needed."""
    return images[:, :, 0, 0] * 3.0


@pytest.mark.parametrize("tta", ["flip", "flip_zoom"])
@pytest.mark.parametrize("adjustment", ["none", "posthoc"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_tta_metrics_count_what_predict_returns(tta: str, adjustment: str, temperature: float) -> None:
    """Finding 1: ``test/tta/*`` applied the post-hoc shift and the temperature twice."""
    model = ImageClassifier(
        TINY_BACKBONE, weights="none", image_size=TINY_SIZE, class_names=["a", "b", "c"], tta=tta,
        logit_adjustment=adjustment, logit_adjustment_tau=1.0, class_counts=[60.0, 30.0, 10.0],
    )  # fmt: skip
    model.temperature.fill_(temperature)
    model.forward = _pixel_logits  # type: ignore[method-assign]
    model.eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 3, (64,), generator=generator)
    with torch.no_grad():
        _quiet(model.test_step, (images, labels), 0)
        probs = _quiet(model.predict_step, (images, labels), 0)
    metrics = model.tta_scores.compute()
    expected = float((probs.argmax(1) == labels).float().mean())
    assert float(metrics["acc"]) == pytest.approx(expected, abs=1e-6)
    assert float(metrics["nll"]) == pytest.approx(float(F.nll_loss(probs.log(), labels)), abs=1e-5)


def test_cached_features_keep_balanced_sampling(tmp_path: Path) -> None:
    """Finding 2: ``cache_features`` dropped ``balanced_sampling`` (the epoch shuffle sampler instead)."""
    from vision_transfer.datamodules import CachedFeatureDataModule

    root = _long_tailed_folder(tmp_path / "images")
    shares = {}
    for cached in (False, True):
        images = tiny_data(root, batch_size=4, balanced_sampling=True, val_fraction=0.2, test_fraction=0.2)
        model = tiny_model(
            images, mode="linear_probe", cache_features=cached, cache_dir=str(tmp_path / "cache") if cached else None
        )
        data = CachedFeatureDataModule(images, model) if cached else images
        data.setup("fit")
        shares[cached] = torch.cat([batch[1] for batch in data.train_dataloader()]).numpy()
    # one draw of the same seed and epoch on both paths (the image loader drops its last partial batch)
    assert len(shares[True]) == 19 and np.array_equal(shares[True][: len(shares[False])], shares[False])
    assert (np.bincount(shares[True], minlength=3) / 19).min() > 0.2, shares  # vs 0.05 of the rarest class


@pytest.mark.parametrize("option", [{"logit_adjustment": "posthoc"}, {"class_weighting": "balanced"}])
def test_a_model_for_data_with_given_classes_gets_the_training_class_counts(tmp_path: Path, option: dict) -> None:
    """Finding 3: a model given ``class_names`` never got the training class counts (then from ``connect``;
    now the classes are the datamodule's ``classes``, and ``for_data`` counts them)."""
    root = _long_tailed_folder(tmp_path / "images")
    split = {"batch_size": 4, "val_fraction": 0.2, "test_fraction": 0.2}
    reference = tiny_model(tiny_data(root, **split), **option)
    named = tiny_model(tiny_data(root, classes=["circle", "square", "stripes"], **split), **option)
    assert named.class_counts.tolist() == reference.class_counts.tolist() == [14.0, 4.0, 1.0]
    logits, target = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    assert torch.equal(named._loss(logits, target), reference._loss(logits, target))


@pytest.mark.parametrize("size", [2, 3, 33])
@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
@pytest.mark.parametrize("multilabel", [False, True])
def test_every_batch_size_is_mixed_and_smoothed(size: int, kind: str, multilabel: bool) -> None:
    """Finding 6: odd batches were never mixed and lost label smoothing (hard one-hot targets)."""
    torch.manual_seed(1)
    alphas = {"mixup_alpha": 1.0} if kind == "mixup" else {"cutmix_alpha": 1.0}
    mixer = BatchMixer(4, **alphas, label_smoothing=0.2, multilabel=multilabel)
    images = torch.rand(size, 3, 16, 16)
    labels = torch.randint(0, 2, (size, 4)) if multilabel else torch.arange(size) % 4
    mixed, targets = mixer(images.clone(), labels)
    assert not torch.equal(mixed, images)  # the batch is mixed (its mirror pairs differ)
    hard = labels.float() if multilabel else F.one_hot(labels, 4).float()
    off = 0.1 if multilabel else 0.05  # smoothing: towards 0.5 (multi-label) or towards 1/C
    assert float(targets.min()) >= off - 1e-6 and not torch.equal(targets, hard)
    mirror = hard.flip(0)
    raw = (targets - off) / (1 - 0.2)  # the mixed targets before smoothing
    differ = hard != mirror
    lam = float(((raw - mirror) / (hard - mirror))[differ][0])
    assert torch.allclose(raw, hard * lam + mirror * (1 - lam), atol=1e-5)


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("focal", [False, True])
def test_the_classifier_smooths_once_on_every_training_path(multilabel: bool, mixed: bool, focal: bool) -> None:
    """Finding 6 (cont.): mixed or not, focal or not, the training targets are smoothed once by the
    model's ``label_smoothing``: towards 1/C (multiclass) or 0.5 (multilabel)."""
    if multilabel and focal:
        pytest.skip("focal_gamma is refused for multilabel heads")
    kwargs: dict = {"task": "multilabel"} if multilabel else {"focal_gamma": 1e-9 if focal else 0.0}
    model = ImageClassifier(
        TINY_BACKBONE, weights="none", image_size=TINY_SIZE, class_names=["a", "b", "c", "d"],
        label_smoothing=0.2, mixup_alpha=1.0, mix_prob=1.0 if mixed else 0.0, **kwargs,
    )  # fmt: skip
    labels = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 1]]) if multilabel else torch.tensor([0, 1, 2])
    torch.manual_seed(0)
    _, targets = model._mix(torch.rand(3, 3, 8, 8), labels)
    hard = labels.float() if multilabel else F.one_hot(labels, 4).float()
    if not mixed:
        assert torch.equal(targets, hard)  # the loss smooths, once
    logits = torch.randn(3, 4)
    smoothed = targets * 0.8 + (0.1 if multilabel else 0.05)
    if multilabel:
        expected = F.binary_cross_entropy_with_logits(logits, smoothed)
    else:
        expected = -(smoothed * logits.log_softmax(1)).sum(1).mean()
    assert torch.allclose(model._loss(logits, targets), expected, atol=1e-5)
    if not mixed:
        assert torch.allclose(model._loss(logits, labels), expected, atol=1e-5)


def test_label_smoothing_default_is_per_task() -> None:
    """Unset, label smoothing is 0.1 for multiclass heads and 0 for multilabel heads (as before);
    set, it acts on both."""
    single = ImageClassifier(TINY_BACKBONE, weights="none", image_size=TINY_SIZE, class_names=["a", "b"])
    multi = ImageClassifier(
        TINY_BACKBONE, weights="none", image_size=TINY_SIZE, class_names=["a", "b"], task="multilabel"
    )
    assert single.label_smoothing == 0.1 and multi.label_smoothing == 0.0


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("soft", [False, True])
def test_focal_loss_at_gamma_zero_is_the_cross_entropy_it_replaces(
    smoothing: float, weighted: bool, soft: bool
) -> None:
    """Finding 12: focal loss ignored ``label_smoothing``; with gamma -> 0 it must be the same loss as
    cross-entropy with every option (smoothing, class weights, soft targets)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 5, generator=generator) * 2
    labels = torch.randint(0, 5, (16,), generator=generator)
    target = F.one_hot(labels, 5).float() * 0.6 + 0.08 if soft else labels
    weight = torch.rand(5, generator=generator) + 0.5 if weighted else None
    plain = CrossEntropyLoss(label_smoothing=smoothing, class_weight=weight)(logits, target)
    focal = CrossEntropyLoss(label_smoothing=smoothing, class_weight=weight, focal_gamma=1e-9)(logits, target)
    assert torch.allclose(focal, plain, atol=1e-5)
    if not soft and not weighted:
        assert torch.allclose(plain, F.cross_entropy(logits, labels, label_smoothing=smoothing), atol=1e-6)


def test_multilabel_per_class_csv_counts_positives_without_worst_images(tmp_path: Path) -> None:
    """Finding 11: per_class.csv listed 0 positives for every class when ``worst_images`` was 0."""
    from vision_transfer.callbacks.report import RunReport

    model = ImageClassifier(
        TINY_BACKBONE, weights="none", image_size=TINY_SIZE, class_names=["a", "b", "c"], task="multilabel"
    )
    labels = torch.tensor([[1, 0, 1], [1, 1, 0], [1, 0, 0], [0, 0, 1]])
    images = torch.rand(4, 3, TINY_SIZE, TINY_SIZE)
    rows = {}
    for worst in (0, 4):
        report = RunReport(worst_images=worst)
        report._folder = lambda trainer, folder=tmp_path / str(worst): (folder.mkdir(exist_ok=True), folder)[1]
        model.test_scores.reset()
        report.on_test_epoch_start(None, model)  # type: ignore[arg-type]
        with torch.no_grad():
            logits = _quiet(model.test_step, (images, labels), 0)
        report.on_test_batch_end(None, model, logits, (images, labels), 0)  # type: ignore[arg-type]
        report.on_test_epoch_end(None, model)  # type: ignore[arg-type]
        with (tmp_path / str(worst) / "per_class.csv").open() as f:
            rows[worst] = list(csv.DictReader(f))
    positives = [int(float(r["positives"])) for r in rows[0]]
    assert positives == [3, 1, 2]
    assert rows[0] == rows[4]


@pytest.mark.parametrize("tta", ["none", "flip", "flip_zoom"])
@pytest.mark.parametrize("multilabel", [False, True])
def test_calibration_is_fitted_on_the_probabilities_predict_returns(tta: str, multilabel: bool) -> None:
    """Also-check item: temperature and thresholds were tuned on single-view outputs but applied to
    TTA-averaged ones. The fitted temperature minimises the NLL of predict's probabilities; the
    thresholds are chosen on predict's probabilities."""
    from vision_transfer.app.calibrate import calibrate_model, collect_logits
    from vision_transfer.inference.thresholds import best_f1_thresholds

    kwargs: dict = {"task": "multilabel"} if multilabel else {}
    model = ImageClassifier(
        TINY_BACKBONE, weights="none", image_size=TINY_SIZE, class_names=["a", "b", "c"], tta=tta, **kwargs
    )
    model.forward = _pixel_logits  # type: ignore[method-assign]
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (96, 3, 8, 8), generator=generator, dtype=torch.uint8)
    # labels that follow the mirrored view's logits more than the plain view's: TTA matters
    first = model.preprocess(images)
    labels = (first.flip(-1)[:, :, 0, 0] + 0.8 * torch.randn(96, 3, generator=generator)).argmax(1)
    if multilabel:
        labels = F.one_hot(labels, 3) | (torch.rand(96, 3, generator=generator) < 0.3).long()
    loader = [(images[i : i + 32], labels[i : i + 32]) for i in range(0, 96, 32)]
    logits, collected = collect_logits(model, loader, torch.device("cpu"))
    calibrate_model(model, logits, collected)
    with torch.no_grad():
        probs = _quiet(model.predict_step, (first, labels), 0)
    if multilabel:
        assert torch.allclose(model.thresholds, best_f1_thresholds(probs, labels)[0], atol=1e-5)
        return
    fitted = float(model.temperature)

    def nll_at(t: float) -> float:
        model.temperature.fill_(t)
        with torch.no_grad():
            p = _quiet(model.predict_step, (first, labels), 0)
        return float(F.nll_loss(p.clamp_min(1e-12).log(), labels))

    best = nll_at(fitted)
    assert best <= nll_at(fitted * 0.97) and best <= nll_at(fitted * 1.03), fitted
