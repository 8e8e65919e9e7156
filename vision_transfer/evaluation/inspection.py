"""Know the data before trusting a model: likely label errors, near-duplicates (leaks across splits) and
outliers, from features already extracted (the feature cache), without Lightning.

- Label issues: confident learning (Northcutt et al. 2021) by ``cleanlab`` (an optional extra; not
  rewritten here) on *out-of-fold* probabilities: a logistic regression on the features
  (:func:`~vision_transfer.evaluation.linear.lbfgs_logistic_regression`; multinomial, or one-vs-rest for
  multi-hot labels), K stratified folds, so no sample is scored by a head that saw it. Multi-label data
  goes through cleanlab's multi-label functions (an image is flagged when any of its classes looks wrong).
- Near-duplicates: cosine similarity of the features (:func:`~vision_transfer.evaluation.knn.nearest_neighbours`,
  chunked, over memory-mapped shards as well as arrays), within a split or across two.
- Outliers: the mean cosine distance to the ``k`` nearest other samples; the most isolated are flagged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vision_transfer.data.sources import stratification_key
from vision_transfer.errors import ConfigError, DataError
from vision_transfer.evaluation.kinds import kind_of_labels
from vision_transfer.evaluation.knn import nearest_neighbours
from vision_transfer.evaluation.linear import Standardizer, lbfgs_logistic_regression, lbfgs_probe

# The C values tried for the out-of-fold probe (chosen on the first fold's held-out part): a decade apart,
# the span of the Kornblith grid where probes on ImageNet features land (1e-4 .. 1e1).
OOF_C_GRID = tuple(10.0**e for e in range(-4, 2))


@dataclass(frozen=True)
class OutOfFold:
    """Out-of-fold class probabilities of every sample, and how they were made."""

    probabilities: np.ndarray  # (N, C), each row from a head that did not see that sample (multi-label: sigmoids)
    folds: np.ndarray  # (N,) the fold each sample was held out in
    c: float  # the logistic regression's C, chosen on the first fold


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """A fold index per sample: each class's samples dealt round-robin over the folds in a seeded order.
    Multi-hot ``(N, C)`` labels are stratified by each sample's rarest class (a sample without any class:
    a stratum of its own), so every class's few positives are spread over the folds."""
    if folds < 2:
        raise ConfigError(f"folds={folds}: cross-validation needs at least 2.")
    labels = stratification_key(np.asarray(labels))
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        out[rng.permutation(members)] = np.arange(len(members)) % folds
    return out


def out_of_fold_probabilities(
    features: np.ndarray, labels: np.ndarray, num_classes: int, folds: int = 5, seed: int = 0, c: float | None = None
) -> OutOfFold:
    """Class probabilities of every sample from a logistic regression trained on the other folds.

    Args:
        features: ``(N, D)`` features (any float dtype).
        labels: ``(N,)`` class indices, or ``(N, C)`` multi-hot rows (the given labels, errors included).
        c: the inverse regularisation; None: chosen on the first fold's held-out part over ``OOF_C_GRID``
            (by accuracy, or mAP for multi-hot labels).
    """
    labels = np.asarray(labels, dtype=np.int64)
    kind = kind_of_labels(labels)
    if len(features) != len(labels):
        raise DataError(f"{len(features)} feature rows for {len(labels)} labels.")
    kind.check_labels(torch.from_numpy(labels), num_classes, "inspect:")
    counts = kind.targets(torch.from_numpy(labels), num_classes).sum(0).numpy()
    if (small := np.flatnonzero((counts > 0) & (counts < folds))).size:
        raise DataError(
            f"classes {small.tolist()[:5]} have fewer than folds={folds} samples: each fold needs one of each; "
            "use fewer folds."
        )
    fold_of = stratified_folds(labels, folds, seed)
    for fold in range(folds):  # each trained part must be learnable (multi-label: a positive and a negative)
        if why := kind.unlearnable_classes(torch.from_numpy(labels[fold_of != fold]), num_classes, False):
            raise DataError(f"outside fold {fold}: {why} (or use fewer folds).")
    x = torch.from_numpy(np.asarray(features)).double()
    y = torch.from_numpy(labels)
    if c is None:
        held = fold_of == 0
        result = lbfgs_probe((x[~held], y[~held]), (x[held], y[held]), None, num_classes, c_grid=OOF_C_GRID)
        c = float(result.chosen["C"])
    probabilities = np.empty((len(labels), num_classes), dtype=np.float64)
    for fold in range(folds):
        held = torch.from_numpy(fold_of == fold)
        scaler = Standardizer(x[~held])
        weight, bias = lbfgs_logistic_regression(scaler(x[~held]), y[~held], num_classes, c)
        probabilities[held.numpy()] = kind.probabilities(scaler(x[held]) @ weight.T + bias).numpy()
    return OutOfFold(probabilities, fold_of, c)


@dataclass(frozen=True)
class LabelIssues:
    """Samples whose given label confident learning doubts, most doubtful first."""

    indices: np.ndarray  # flagged samples, ranked (lowest label quality first)
    suggested: np.ndarray  # (N,) the most probable class out of fold; multi-label: (N, C) probability >= 0.5
    quality: np.ndarray  # (N,) cleanlab's label quality score in [0, 1] (self-confidence)


def label_issues(labels: np.ndarray, probabilities: np.ndarray) -> LabelIssues:
    """Rank likely label errors with ``cleanlab`` from out-of-fold ``probabilities``: class indices
    ``(N,)``, or multi-hot ``(N, C)`` rows with per-class probabilities (cleanlab's multi-label functions)."""
    labels = np.asarray(labels, dtype=np.int64)
    kind = kind_of_labels(labels)
    try:
        flagged, quality = kind.rank_label_issues(labels, probabilities)
    except ImportError as e:  # an optional extra: imported only when used
        raise ConfigError("label issues need cleanlab: pip install 'vision-transfer[inspect]'.") from e
    probs = torch.from_numpy(probabilities)
    suggested = kind.decide(probs, torch.full((probs.shape[1],), 0.5, dtype=probs.dtype)).numpy()
    return LabelIssues(np.asarray(flagged, dtype=np.int64), suggested, np.asarray(quality))


@dataclass(frozen=True)
class Duplicates:
    """Pairs of samples whose features are at least ``threshold`` cosine-similar."""

    query: np.ndarray  # row in the query split
    match: np.ndarray  # its most similar row in the memory split
    similarity: np.ndarray
    threshold: float


def near_duplicates(
    queries: Sequence[np.ndarray], memory: Sequence[np.ndarray] | None = None, threshold: float = 0.95
) -> Duplicates:
    """Each query row's most similar memory row, where the cosine similarity is at least ``threshold``.

    Args:
        queries: the query split's shards (e.g. test); or arrays.
        memory: the split searched (e.g. train); None: the queries' own split, each row's best *other* row
            (a pair is reported once, from its later row).
    """
    if not -1 <= threshold <= 1:
        raise ConfigError(f"threshold={threshold}: a cosine similarity is in [-1, 1].")
    within = memory is None
    sims, index = nearest_neighbours(queries, queries if within else memory, 2 if within else 1)  # type: ignore[arg-type]
    rows = np.arange(len(sims))
    if within:  # drop the row itself (ties with an exact duplicate: whichever is not this row)
        other = np.where(index[:, 0] == rows, 1, 0)
        sims, index = sims[rows, other], index[rows, other]
        keep = (sims >= threshold) & (index < rows)
    else:
        sims, index = sims[:, 0], index[:, 0]
        keep = sims >= threshold
    return Duplicates(rows[keep], index[keep], sims[keep], threshold)


@dataclass(frozen=True)
class Outliers:
    """Each sample's isolation and the most isolated ones."""

    scores: np.ndarray  # (N,) mean cosine distance to the k nearest other samples
    indices: np.ndarray  # flagged, most isolated first
    k: int


def outliers(features: Sequence[np.ndarray], k: int = 10, fraction: float = 0.01) -> Outliers:
    """Low-density samples: the ``fraction`` with the largest mean cosine distance to their ``k`` nearest others."""
    if not 0 < fraction < 1:
        raise ConfigError(f"fraction={fraction}: must be in (0, 1).")
    sims, index = nearest_neighbours(features, features, k + 1)
    rows = np.arange(len(sims))[:, None]
    others = np.where(index == rows, np.nan, 1 - sims)  # the row itself is not a neighbour
    scores = np.array([row[~np.isnan(row)][:k].mean() for row in others])
    count = max(1, round(fraction * len(scores)))
    return Outliers(scores, np.argsort(-scores, kind="stable")[:count], k)
