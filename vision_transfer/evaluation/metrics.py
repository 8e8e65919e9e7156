"""Classification metrics: one definition of each number, for fine-tuning, the probes and the reports.

Every function takes whole arrays (numpy arrays or CPU/GPU torch tensors) in torchmetrics' order:
scores, logits or predictions first, then the true labels (the reverse of scikit-learn's). Labels are
class indices ``(N,)`` (multi-class) or an ``(N, C)`` 0/1 matrix (multi-label). numpy only, so the
report package can use it without torch.

Where definitions part ways, these follow scikit-learn (the tests check each one against it):

- balanced accuracy: mean recall over the classes present in the labels; a class that is predicted
  but absent from the labels has no recall and is left out (``balanced_accuracy_score``).
- multi-class macro-F1: mean over the classes present in the labels or the predictions (absent from
  both: left out); ``f1_score(average="macro", zero_division=0)``. micro-F1 is accuracy.
- multi-label macro-F1: the same rule per column, so a column with neither a positive label nor a
  positive prediction is left out (scikit-learn's default averages over every column and scores such
  a column 0, or 1 with ``zero_division=1``: a convention, not a measurement); micro-F1 over every
  (row, column) pair, 0 when there is no positive at all.
- average precision: scikit-learn's step-wise area (tied scores form one step); a class without a
  positive label has none (NaN) and mAP averages over the classes that have one.
- top-k: ties go to the lower class index, as argmax does, so top-1 is the accuracy of the argmax
  predictions (scikit-learn's ``top_k_accuracy_score`` breaks ties towards the higher index).
- ECE: top-label, L1, ``ECE_BINS`` equal-width bins of the maximum probability, each ``[lo, hi)``
  but the last ``[lo, 1]`` (``numpy.histogram``'s and ``scipy.stats.binned_statistic``'s bins, those of
  the reliability diagram). torchmetrics' ``CalibrationError`` differs only for a confidence of exactly 1,
  which it puts in a bin of its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vision_transfer.errors import VisionTransferError

ECE_BINS = 15  # Guo et al. 2017's reliability diagrams and ECE use 15 equal-width bins
SMALL_K = 8  # top_k_classes: up to this k, k argmax passes beat a partition of every row


class MetricInputError(VisionTransferError, ValueError):
    """Arrays a metric cannot score: mismatched shapes, labels out of range, a bad option."""


# -- inputs ------------------------------------------------------------------------------------------
def _array(values: Any, dtype: Any = None) -> np.ndarray:
    """A numpy view or copy of ``values`` (torch tensors on any device, in any float precision)."""
    if hasattr(values, "detach"):  # a torch tensor, without importing torch
        values = values.detach().cpu()
        if values.is_floating_point():
            values = values.double()  # numpy has no bfloat16
        values = values.numpy()
    return np.asarray(values, dtype=dtype)


def _labels(labels: Any, rows: int, name: str = "labels") -> np.ndarray:
    array = _array(labels)
    if array.ndim != 1 or len(array) != rows:
        raise MetricInputError(f"{name} must be a vector of {rows} class indices, got shape {array.shape}.")
    if len(array) and (array.min() < 0 or not np.array_equal(array, np.round(array))):
        raise MetricInputError(f"{name} must be non-negative class indices.")
    return array.astype(np.int64)


def _pair(predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true class indices, or two 0/1 matrices of one shape."""
    p, y = _array(predictions), _array(labels)
    if p.ndim == 2 or y.ndim == 2:
        if p.shape != y.shape:
            raise MetricInputError(f"multi-label predictions {p.shape} and labels {y.shape} differ in shape.")
        return p > 0, y > 0
    return _labels(p, len(p), "predictions"), _labels(y, len(p))


def _scores(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _array(scores)
    if s.ndim != 2:
        raise MetricInputError(f"scores must be a (rows, classes) matrix, got shape {s.shape}.")
    y = _labels(labels, len(s))
    if len(y) and y.max() >= s.shape[1]:
        raise MetricInputError(f"a label is {y.max()}, beyond the {s.shape[1]} classes scored.")
    return s, y


# -- top-k and accuracy ------------------------------------------------------------------------------
def top_k_classes(scores: Any, k: int) -> np.ndarray:
    """The ``min(k, C)`` highest-scoring classes of each row ``(N, min(k, C))``, best first; equal
    scores rank the lower class index first (as ``argmax``; ``argsort(-scores, kind="stable")``)."""
    s = _array(scores)
    if s.ndim != 2:
        raise MetricInputError(f"scores must be a (rows, classes) matrix, got shape {s.shape}.")
    if k < 1:
        raise MetricInputError(f"k must be at least 1, not {k}.")
    k = min(k, s.shape[1])
    if k == s.shape[1] or len(s) == 0:
        return np.argsort(-s, axis=1, kind="stable")[:, :k]
    if k <= SMALL_K:
        return _top_k_by_argmax(s, k)
    # Partition instead of sorting every row (C log C): the k-th largest score, then every class above
    # it and, of those equal to it, the lowest indices; only those k are sorted.
    kth = -np.partition(-s, k - 1, axis=1)[:, k - 1 : k]
    above, equal = s > kth, s == kth
    keep = above | (equal & (np.cumsum(equal, axis=1) <= k - above.sum(1, keepdims=True)))
    chosen = np.nonzero(keep)[1].reshape(len(s), k)  # ascending class index in each row
    order = np.argsort(-np.take_along_axis(s, chosen, 1), axis=1, kind="stable")
    return np.take_along_axis(chosen, order, 1)


def _top_k_by_argmax(s: np.ndarray, k: int) -> np.ndarray:
    """k argmax passes (each the first maximum), taking the winner out after each: 3-4x a partition's
    speed at k = 5 over 1,000 classes. A row whose pick is -inf may meet a class taken out before
    (also -inf); such rows are ranked again by a stable sort."""
    work = s.astype(np.result_type(s.dtype, np.float32), copy=True)
    rows = np.arange(len(s))
    out = np.empty((len(s), k), dtype=np.int64)
    for i in range(k):
        out[:, i] = work.argmax(1)
        work[rows, out[:, i]] = -np.inf
    redo = np.flatnonzero(np.isneginf(np.take_along_axis(s, out, 1)).any(1))
    if len(redo):
        out[redo] = np.argsort(-s[redo], axis=1, kind="stable")[:, :k]
    return out


def top_k_hits(ranked: Any, labels: Any) -> np.ndarray:
    """Whether each row's label is among its ranked classes ``(N, k)`` (:func:`top_k_classes`)."""
    r = _array(ranked)
    return (r == _labels(labels, len(r))[:, None]).any(1)


def top_k_accuracy(scores: Any, labels: Any, k: int = 1) -> float:
    """Share of rows whose label is among their ``k`` highest scores (1.0 once ``k >= C``)."""
    s, y = _scores(scores, labels)
    return _mean(top_k_hits(top_k_classes(s, k), y))


def accuracy(predictions: Any, labels: Any) -> float:
    """Share of rows predicted right (``accuracy_score``): ``top_k_accuracy(scores, labels, 1)`` of the
    argmax predictions, for callers that hold predictions rather than scores."""
    p = _array(predictions)
    return _mean(_labels(p, len(p), "predictions") == _labels(labels, len(p)))


# -- counts per class ----------------------------------------------------------------------------------
def confusion_matrix(predictions: Any, labels: Any, num_classes: int) -> np.ndarray:
    """Counts ``(C, C)`` int64: row = true class, column = predicted class."""
    p, y = _pair(predictions, labels)
    if len(y) and max(int(p.max()), int(y.max())) >= num_classes:
        raise MetricInputError(f"a class index is {max(int(p.max()), int(y.max()))}, beyond {num_classes} classes.")
    return np.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _recall(correct: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Recall per class: NaN for a class without a true example (it has no recall, not one of 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, correct / np.maximum(support, 1), np.nan)


def per_class_recall(predictions: Any, labels: Any, num_classes: int | None = None) -> np.ndarray:
    """Recall of each class ``(C,)``; NaN for a class absent from ``labels``."""
    p, y = _pair(predictions, labels)
    size = max(num_classes or 0, int(y.max()) + 1 if len(y) else 0)
    return _recall(np.bincount(y[p == y], minlength=size), np.bincount(y, minlength=size))


def recall_from_confusion(matrix: Any) -> np.ndarray:
    """:func:`per_class_recall` of a confusion matrix (rows = true classes)."""
    counts = _array(matrix)
    return _recall(np.diagonal(counts), counts.sum(1))


def balanced_accuracy(predictions: Any, labels: Any) -> float:
    """Mean recall over the classes present in ``labels`` (``balanced_accuracy_score``)."""
    recall = per_class_recall(predictions, labels)
    present = recall[~np.isnan(recall)]
    return float(present.mean()) if len(present) else float("nan")


# -- F1 ----------------------------------------------------------------------------------------------
def _f1_counts(predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True positives, predicted positives and actual positives per class (per column if multi-label)."""
    p, y = _pair(predictions, labels)
    if p.ndim == 2:
        return (p & y).sum(0), p.sum(0), y.sum(0)
    size = int(max(p.max(), y.max())) + 1 if len(y) else 0
    return np.bincount(y[p == y], minlength=size), np.bincount(p, minlength=size), np.bincount(y, minlength=size)


def f1_macro(predictions: Any, labels: Any) -> float:
    """Mean F1 over the classes (columns) with a true or a predicted positive; NaN if there is none.

    Multi-class: class indices (``f1_score(average="macro", zero_division=0)``). Multi-label: 0/1
    matrices, the same rule per column (a column negative in both is left out, see the module notes).
    """
    tp, predicted, actual = _f1_counts(predictions, labels)
    seen = (predicted + actual) > 0
    return float(np.mean(2 * tp[seen] / (predicted[seen] + actual[seen]))) if seen.any() else float("nan")


def f1_micro(predictions: Any, labels: Any) -> float:
    """F1 of the pooled counts (``f1_score(average="micro", zero_division=0)``): multi-class, the
    accuracy; multi-label, over every (row, column) pair, 0 without any positive."""
    tp, predicted, actual = (int(c.sum()) for c in _f1_counts(predictions, labels))
    return 2 * tp / (predicted + actual) if predicted + actual else 0.0


# -- ranking -----------------------------------------------------------------------------------------
def average_precision(scores: Any, targets: Any) -> float:
    """Area under one class's precision-recall steps (``average_precision_score``): the precision at
    each distinct score, weighted by the recall it adds; tied scores form one step. NaN without a
    positive target."""
    s, t = _array(scores, np.float64).ravel(), _array(targets).ravel() > 0
    if len(s) != len(t):
        raise MetricInputError(f"{len(s)} scores for {len(t)} targets.")
    if not t.any():
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, hits = s[order], np.cumsum(t[order])
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the end of each run of equal scores
    precision, recall = hits[last] / (last + 1), hits[last] / hits[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def average_precision_per_class(scores: Any, targets: Any) -> np.ndarray:
    """Each column's :func:`average_precision` ``(C,)``; NaN for a column without a positive."""
    s, t = _array(scores), _array(targets)
    if s.ndim != 2 or s.shape != t.shape:
        raise MetricInputError(f"scores {s.shape} and targets {t.shape} must be (rows, classes) matrices alike.")
    return np.array([average_precision(s[:, c], t[:, c]) for c in range(s.shape[1])])


def mean_average_precision(scores: Any, targets: Any) -> float:
    """Macro mAP over the classes with a positive target; NaN when no class has one."""
    per_class = average_precision_per_class(scores, targets)
    present = per_class[~np.isnan(per_class)]
    return float(present.mean()) if len(present) else float("nan")


# -- calibration ---------------------------------------------------------------------------------------
def _bins(probs: Any, labels: Any, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per bin: rows, summed confidence, summed correctness; and the bin edges."""
    p, y = _scores(probs, labels)
    if bins < 1:
        raise MetricInputError(f"bins must be at least 1, not {bins}.")
    confidence, correct = p.max(1).astype(np.float64), (p.argmax(1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.searchsorted(edges[1:-1], confidence, side="right")  # [lo, hi), the last bin up to 1 included
    count = np.bincount(index, minlength=bins)
    return count, np.bincount(index, confidence, bins), np.bincount(index, correct, bins), edges


def expected_calibration_error(probs: Any, labels: Any, bins: int = ECE_BINS) -> float:
    """Top-label L1 ECE: ``sum_b n_b / N * |accuracy_b - confidence_b|`` over equal-width bins of the
    maximum probability (see the module notes for the bin edges)."""
    count, confidence, correct, _ = _bins(probs, labels, bins)
    total = int(count.sum())
    return float(np.abs(correct - confidence).sum() / total) if total else float("nan")


def reliability(probs: Any, labels: Any, bins: int = ECE_BINS) -> dict[str, list[float]]:
    """The reliability diagram's data, per bin of :func:`expected_calibration_error`: ``lower``,
    ``upper``, ``count``, mean ``confidence`` and ``accuracy`` (NaN in an empty bin)."""
    count, confidence, correct, edges = _bins(probs, labels, bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence, mean_correct = confidence / count, correct / count
    return {
        "confidence": [float(v) for v in mean_confidence],
        "accuracy": [float(v) for v in mean_correct],
        "count": [float(n) for n in count],
        "lower": [float(v) for v in edges[:-1]],
        "upper": [float(v) for v in edges[1:]],
    }


def nll(logits: Any, labels: Any) -> float:
    """Mean negative log-likelihood (natural log) of the labels under ``softmax(logits)``, from a
    log-softmax in float64, so saturated logits stay finite."""
    z, y = _scores(logits, labels)
    z = z.astype(np.float64)
    shifted = z - z.max(1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(1))
    return float(np.mean(log_norm - shifted[np.arange(len(y)), y])) if len(y) else float("nan")


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")
