"""vision_transfer.evaluation: every metric against scikit-learn (and scipy), on the awkward splits too.

The awkward cases are the ones where definitions part ways: a class predicted but absent from the
labels, a class absent from both, a single-class split, tied scores, a multi-label column without a
positive, and top-k with k at or above the number of classes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy import special, stats
from sklearn import metrics as sk

from vision_transfer.errors import VisionTransferError
from vision_transfer.evaluation import metrics as m
from vision_transfer.evaluation.scores import EpochScores

C = 6


def _quiet(function: Callable[..., float], *args: object, **kwargs: object) -> float:
    """A scikit-learn metric without its warnings (classes absent from y_true, ill-defined F1)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(function(*args, **kwargs))  # type: ignore[arg-type]


def _hard_cases() -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """(predictions, labels, num_classes) for each awkward multi-class split."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, C, 300)
    noisy = np.where(rng.random(300) < 0.6, labels, rng.integers(0, C, 300))
    absent_true = rng.integers(0, C - 1, 200)  # class 5 never in the labels ...
    predicted_absent = np.where(rng.random(200) < 0.5, absent_true, rng.integers(0, C, 200))
    predicted_absent[:7] = C - 1  # ... but predicted
    both_absent = rng.integers(0, 4, 150)  # classes 4 and 5 in neither labels nor predictions
    single = np.full(40, 2)
    return {
        "random": (noisy, labels, C),
        "predicted_but_absent_from_labels": (predicted_absent, absent_true, C),
        "absent_from_both": (np.where(rng.random(150) < 0.5, both_absent, rng.integers(0, 4, 150)), both_absent, C),
        "single_class_split": (rng.integers(0, 4, 40), single, C),
        "all_correct": (labels, labels, C),
    }


HARD = _hard_cases()


@pytest.mark.parametrize("case", list(HARD))
def test_hard_prediction_metrics_match_scikit_learn(case: str) -> None:
    predictions, labels, n = HARD[case]
    assert m.accuracy(predictions, labels) == pytest.approx(sk.accuracy_score(labels, predictions))
    assert m.balanced_accuracy(predictions, labels) == pytest.approx(
        _quiet(sk.balanced_accuracy_score, labels, predictions)
    )
    assert m.f1_macro(predictions, labels) == pytest.approx(
        _quiet(sk.f1_score, labels, predictions, average="macro", zero_division=0)
    )
    assert m.f1_micro(predictions, labels) == pytest.approx(
        _quiet(sk.f1_score, labels, predictions, average="micro", zero_division=0)
    )
    matrix = m.confusion_matrix(predictions, labels, n)
    np.testing.assert_array_equal(matrix, sk.confusion_matrix(labels, predictions, labels=range(n)))
    recall = m.per_class_recall(predictions, labels, n)
    expected = sk.recall_score(labels, predictions, labels=range(n), average=None, zero_division=np.nan)
    np.testing.assert_allclose(recall, expected, equal_nan=True)
    np.testing.assert_allclose(m.recall_from_confusion(matrix), recall, equal_nan=True)
    # balanced accuracy is the mean recall over the classes present in the labels, nothing else
    assert m.balanced_accuracy(predictions, labels) == pytest.approx(float(np.nanmean(recall)))


def test_a_class_predicted_but_absent_from_the_labels_is_not_a_recall_of_zero() -> None:
    """Audit finding 8: torchmetrics' macro recall counted such a class as recall 0 (0.5246 vs 0.6558)."""
    from torchmetrics.functional.classification import multiclass_recall

    predictions, labels, n = HARD["predicted_but_absent_from_labels"]
    ours = m.balanced_accuracy(predictions, labels)
    torchmetrics_value = float(
        multiclass_recall(torch.from_numpy(predictions), torch.from_numpy(labels), n, average="macro")
    )
    assert ours == pytest.approx(_quiet(sk.balanced_accuracy_score, labels, predictions))
    assert torchmetrics_value == pytest.approx(ours * (n - 1) / n)  # the absent class as a sixth recall of 0


def _scores(n: int = 250, classes: int = C, seed: int = 1, tied: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    scores = rng.normal(size=(n, classes)) + 1.5 * np.eye(classes)[labels]
    if tied:  # a handful of values: most rows have ties, many at the k-th place
        scores = np.round(scores).clip(-1, 2)
    return scores.astype(np.float32), labels


@pytest.mark.parametrize("k", [1, 2, 5, C, C + 3])
def test_top_k_accuracy_matches_scikit_learn(k: int) -> None:
    scores, labels = _scores()
    expected = _quiet(sk.top_k_accuracy_score, labels, scores, k=k, labels=range(C))
    assert m.top_k_accuracy(scores, labels, k) == pytest.approx(expected)
    if k >= C:
        assert m.top_k_accuracy(scores, labels, k) == 1.0
    single = np.full(len(labels), 3)  # a single-class split
    expected = _quiet(sk.top_k_accuracy_score, single, scores, k=k, labels=range(C))
    assert m.top_k_accuracy(scores, single, k) == pytest.approx(expected)


@pytest.mark.parametrize("k", range(1, 14))
def test_ties_rank_the_lower_class_index_first(k: int) -> None:
    """Ties go to the lower class index, as argmax does, so top-1 is the accuracy of the argmax
    predictions. (scikit-learn's top_k_accuracy_score ranks the higher index first on a tie.)"""
    scores, labels = _scores(classes=12, tied=True)  # k up to 12 and beyond: every path of top_k_classes
    scores[:20, :4] = -np.inf  # -inf ties too
    scores[20:25] = -np.inf
    reference = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(m.top_k_classes(scores, k), reference)
    hits = (reference == labels[:, None]).any(1)
    np.testing.assert_array_equal(m.top_k_hits(m.top_k_classes(scores, k), labels), hits)
    assert m.top_k_accuracy(scores, labels, k) == pytest.approx(hits.mean())
    if k == 1:
        assert m.top_k_accuracy(scores, labels) == pytest.approx(sk.accuracy_score(labels, scores.argmax(1)))


def _multilabel(seed: int = 2, tied: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scores and 0/1 targets over 5 columns: column 1 has no positive, column 3 only positives."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((120, 5)) < 0.35).astype(np.int64)
    targets[:, 1] = 0
    targets[:, 3] = 1
    scores = rng.normal(size=targets.shape) + targets
    if tied:
        scores = np.round(scores, 1)
    return scores, targets


@pytest.mark.parametrize("tied", [False, True])
def test_average_precision_matches_scikit_learn_and_skips_a_column_without_positives(tied: bool) -> None:
    scores, targets = _multilabel(tied=tied)
    per_class = m.average_precision_per_class(scores, targets)
    assert np.isnan(per_class[1])  # no positive: no average precision, not 0
    present = [c for c in range(targets.shape[1]) if targets[:, c].any()]
    for c in present:
        assert per_class[c] == pytest.approx(sk.average_precision_score(targets[:, c], scores[:, c]))
        assert m.average_precision(scores[:, c], targets[:, c]) == per_class[c]
    expected = sk.average_precision_score(targets[:, present], scores[:, present], average="macro")
    assert m.mean_average_precision(scores, targets) == pytest.approx(expected)
    assert np.isnan(m.mean_average_precision(scores[:, [1]], targets[:, [1]]))


def test_mean_average_precision_is_not_lowered_by_a_column_without_positives() -> None:
    """Audit finding 8: torchmetrics' macro mAP scored a column without positives as 0."""
    from torchmetrics.functional.classification import multilabel_average_precision

    scores, targets = _multilabel()
    ours = m.mean_average_precision(scores, targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = float(multilabel_average_precision(torch.from_numpy(scores).sigmoid(), torch.from_numpy(targets), 5))
    assert theirs == pytest.approx(ours * 4 / 5)


@pytest.mark.parametrize("threshold", [-0.5, 0.5, 10.0])
def test_multilabel_f1_matches_scikit_learn(threshold: float) -> None:
    scores, targets = _multilabel()
    predictions = (scores > threshold).astype(np.int64)
    assert m.f1_micro(predictions, targets) == pytest.approx(
        _quiet(sk.f1_score, targets, predictions, average="micro", zero_division=0)
    )
    # macro over the columns with a positive label or a positive prediction (column 1, empty in
    # both at the high threshold, is left out rather than scored 0 as scikit-learn's default does)
    union = [c for c in range(5) if targets[:, c].any() or predictions[:, c].any()]
    expected = _quiet(sk.f1_score, targets, predictions, average="macro", labels=union, zero_division=0)
    assert m.f1_macro(predictions, targets) == pytest.approx(expected)
    if len(union) < 5:
        every_column = _quiet(sk.f1_score, targets, predictions, average="macro", zero_division=0)
        assert m.f1_macro(predictions, targets) >= every_column


def test_f1_without_any_positive_label_or_prediction() -> None:
    nothing = np.zeros((10, 3), dtype=np.int64)
    assert m.f1_micro(nothing, nothing) == _quiet(sk.f1_score, nothing, nothing, average="micro", zero_division=0)
    assert np.isnan(m.f1_macro(nothing, nothing))  # no class to average over


def _binned_reference(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """ECE from scipy's binned_statistic: equal-width bins, all half-open but the last, [a, b)."""
    confidence, correct = probs.max(1).astype(np.float64), (probs.argmax(1) == labels).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    count = stats.binned_statistic(confidence, confidence, "count", bins=edges).statistic
    mean_conf = np.nan_to_num(stats.binned_statistic(confidence, confidence, "mean", bins=edges).statistic)
    mean_acc = np.nan_to_num(stats.binned_statistic(confidence, correct, "mean", bins=edges).statistic)
    return float(np.sum(count / len(labels) * np.abs(mean_acc - mean_conf)))


def test_expected_calibration_error_matches_scipy_binning_and_torchmetrics() -> None:
    from torchmetrics.functional.classification import multiclass_calibration_error

    scores, labels = _scores(n=2000)
    probs = special.softmax(2 * scores.astype(np.float64), axis=1)
    ours = m.expected_calibration_error(probs, labels)
    assert ours == pytest.approx(_binned_reference(probs, labels, m.ECE_BINS))
    assert m.expected_calibration_error(probs, labels, bins=7) == pytest.approx(_binned_reference(probs, labels, 7))
    theirs = multiclass_calibration_error(torch.from_numpy(probs).float(), torch.from_numpy(labels), C, m.ECE_BINS)
    assert ours == pytest.approx(float(theirs), abs=1e-6)  # no confidence of exactly 1 here: the same bins
    table = m.reliability(probs, labels)
    assert sum(table["count"]) == len(labels) and len(table["count"]) == m.ECE_BINS
    gaps = [n * abs(a - c) for n, a, c in zip(table["count"], table["accuracy"], table["confidence"], strict=True) if n]
    assert ours == pytest.approx(sum(gaps) / len(labels))


def test_a_confidence_of_one_or_on_an_edge_falls_in_the_bin_the_reliability_diagram_draws() -> None:
    edges = np.linspace(0, 1, m.ECE_BINS + 1)
    top = np.r_[edges[8:], 1.0, 1.0, 0.99]  # on the edges from 0.53 up, and saturated softmaxes
    probs = np.stack([top, 1 - top], axis=1)
    labels = np.arange(len(top)) % 2
    assert m.expected_calibration_error(probs, labels) == pytest.approx(_binned_reference(probs, labels, m.ECE_BINS))
    assert m.reliability(probs, labels)["count"][-1] == 5  # 14/15 itself, 0.99 and three at 1.0


def test_nll_matches_scikit_learn_and_is_stable_for_extreme_logits() -> None:
    scores, labels = _scores()
    logits = scores.astype(np.float64)
    expected = sk.log_loss(labels, special.softmax(logits, axis=1), labels=range(C))
    assert m.nll(logits, labels) == pytest.approx(expected)
    extreme = logits * 1000  # float softmax underflows to 0 here; the log-softmax does not
    reference = -special.log_softmax(extreme, axis=1)[np.arange(len(labels)), labels].mean()
    assert m.nll(extreme, labels) == pytest.approx(reference)


def test_torch_tensors_give_the_numbers_numpy_arrays_give() -> None:
    scores, labels = _scores()
    predictions = scores.argmax(1)
    s, y, p = torch.from_numpy(scores), torch.from_numpy(labels), torch.from_numpy(predictions)
    assert m.top_k_accuracy(s, y, 5) == m.top_k_accuracy(scores, labels, 5)
    assert m.balanced_accuracy(p, y) == m.balanced_accuracy(predictions, labels)
    assert m.nll(s.to(torch.bfloat16), y) == pytest.approx(m.nll(s.to(torch.bfloat16).float().numpy(), labels))
    ml_scores, targets = _multilabel()
    assert m.mean_average_precision(torch.from_numpy(ml_scores), torch.from_numpy(targets)) == pytest.approx(
        m.mean_average_precision(ml_scores, targets)
    )


def test_mismatched_or_out_of_range_inputs_are_one_line_errors() -> None:
    scores, labels = _scores()
    bad = [
        lambda: m.top_k_accuracy(scores, labels[:-1]),
        lambda: m.balanced_accuracy(labels[:-1], labels),
        lambda: m.confusion_matrix(labels, labels, 3),
        lambda: m.top_k_accuracy(scores, labels, 0),
        lambda: m.f1_macro(np.zeros((4, 2)), np.zeros((4, 3))),
        lambda: m.expected_calibration_error(scores, labels, bins=0),
    ]
    for call in bad:
        with pytest.raises(VisionTransferError) as error:
            call()
        assert "\n" not in str(error.value)


# -- the epoch accumulator -----------------------------------------------------------------------
def _batches(array: np.ndarray, parts: int = 3) -> list[torch.Tensor]:
    return [torch.from_numpy(a) for a in np.array_split(array, parts)]


def test_epoch_scores_multiclass_equal_the_plain_functions() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, C - 1, 200)  # class 5 absent from the labels
    logits = (rng.normal(size=(200, C)) + 2 * np.eye(C)[labels]).astype(np.float32)
    logits[:9, C - 1] = 10  # ... but predicted
    metric = EpochScores("multiclass", C, per_class=True)
    for x, y in zip(_batches(logits), _batches(labels), strict=True):
        metric.update(x, y)
    out = metric.compute()
    predictions = logits.argmax(1)
    probs = torch.from_numpy(logits).softmax(1).numpy()
    expected = {
        "acc": m.top_k_accuracy(logits, labels),
        "acc_top5": m.top_k_accuracy(logits, labels, 5),
        "balanced_acc": m.balanced_accuracy(predictions, labels),
        "f1_macro": m.f1_macro(predictions, labels),
        "ece": m.expected_calibration_error(probs, labels),
        "nll": m.nll(logits, labels),
    }
    assert set(out) == {*expected, "confusion_matrix", "recall_per_class"}
    for name, value in expected.items():
        assert float(out[name]) == pytest.approx(value, rel=1e-6), name
    assert float(out["balanced_acc"]) == pytest.approx(_quiet(sk.balanced_accuracy_score, labels, predictions))
    np.testing.assert_array_equal(out["confusion_matrix"].numpy(), m.confusion_matrix(predictions, labels, C))
    np.testing.assert_allclose(out["recall_per_class"].numpy(), m.per_class_recall(predictions, labels, C))
    metric.reset()
    metric.update(torch.from_numpy(logits[:50]), torch.from_numpy(labels[:50]))
    assert float(metric.compute()["acc"]) == pytest.approx(m.top_k_accuracy(logits[:50], labels[:50]))


def test_epoch_scores_multilabel_use_the_thresholds_and_skip_columns_without_positives() -> None:
    scores, targets = _multilabel()
    logits = scores.astype(np.float32)
    thresholds = torch.tensor([0.3, 0.5, 0.6, 0.7, 0.55])
    metric = EpochScores("multilabel", 5, thresholds=thresholds, per_class=True)
    for x, y in zip(_batches(logits), _batches(targets), strict=True):
        metric.update(x, y)
    out = metric.compute()
    predictions = (torch.from_numpy(logits).sigmoid() >= thresholds).numpy()
    assert set(out) == {"map", "f1_micro", "f1_macro", "ap_per_class", "positives"}
    assert out["positives"].tolist() == targets.sum(0).tolist()
    assert float(out["map"]) == pytest.approx(m.mean_average_precision(logits, targets))
    assert float(out["f1_micro"]) == pytest.approx(m.f1_micro(predictions, targets))
    assert float(out["f1_macro"]) == pytest.approx(m.f1_macro(predictions, targets))
    np.testing.assert_allclose(out["ap_per_class"].numpy(), m.average_precision_per_class(logits, targets))
    metric.thresholds.fill_(0.5)  # changed in place after a calibration: the next compute uses them
    at_half = (torch.from_numpy(logits).sigmoid() >= 0.5).numpy()
    assert float(metric.compute()["f1_micro"]) == pytest.approx(m.f1_micro(at_half, targets))


def test_epoch_scores_refuse_a_task_they_do_not_know() -> None:
    with pytest.raises(VisionTransferError):
        EpochScores("regression", 3)  # type: ignore[arg-type]
    with pytest.raises(VisionTransferError):
        EpochScores("multilabel", 3, thresholds=torch.zeros(4))
