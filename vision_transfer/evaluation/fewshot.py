"""Few-shot linear probes: k labelled samples per class, many seeded episodes, mean ± 95% CI.

Each episode draws its shots from the TRAIN split only (a seed per episode), fits L-BFGS logistic
regression on the standardised shots with C chosen by cross-validation inside the shots, and is
scored on the test split. Nothing else is read: no validation split is taken at all, and the test
split only scores the finished episodes, so neither can leak into the shots or the choice of C.
(CLIP_benchmark's few-shot probe refit on the shots plus the whole, unfiltered validation split,
LAION-AI/CLIP_benchmark#125; CLIP's paper chose the few-shot C on the full validation set,
openai/CLIP#128.)
Shots depend only on the labels and the seed, so two backbones on the same split get the same
episodes. The interval over one run's episodes measures the draw of the shots only: its episodes
share one split and one test set. Across seeds, a benchmark averages each seed's episodes first and
takes the interval (and the paired differences) over those per-seed means (:mod:`vision_transfer.report.grid`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vision_transfer.errors import DataError
from vision_transfer.evaluation.linear import Standardizer, lbfgs_logistic_regression
from vision_transfer.evaluation.metrics import accuracy
from vision_transfer.evaluation.stats import mean_ci
from vision_transfer.evaluation.stream import iter_chunks, split_rows, take_rows

FEW_SHOT_SHOTS = (1, 5, 10)
FEW_SHOT_EPISODES = 20
# The decades of Kornblith et al.'s (2019) C grid (probe.KORNBLITH_C_GRID) from 1e-4 to 1e3: a few
# shots cannot rank 45 values, and below 1e-4 every C gives the same (class-mean) decision rule.
FEW_SHOT_C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
# One shot per class leaves nothing to cross-validate: scikit-learn's LogisticRegression default C=1.
ONE_SHOT_C = 1.0
CV_FOLDS = 5  # at most; never more folds than shots per class


@dataclass
class Episode:
    """One episode: its shots (train rows and sample ids), the C it used and its scores."""

    index: int
    seed: tuple[int, int]  # (run seed, episode index): np.random.default_rng(seed) drew the shots
    rows: np.ndarray = field(repr=False)  # train row indices of the shots, ascending
    ids: list[str] = field(repr=False)
    c: float
    cv_acc: dict[float, float] | None  # held-out accuracy of every C tried; None with one shot
    test_acc: float
    folds: np.ndarray | None = field(default=None, repr=False)  # each shot's cross-validation fold


@dataclass
class FewShotResult:
    """Mean test accuracy over episodes with its Student-t 95% interval (the variation of the shots
    drawn, for this split and test set); per-episode scores kept."""

    shots: int
    episodes: list[Episode]
    mean: float
    ci_low: float
    ci_high: float
    c_selection: str
    seconds: float

    @property
    def scores(self) -> np.ndarray:
        """Per-episode test accuracy, in episode order (pair these across backbones)."""
        return np.array([e.test_acc for e in self.episodes])

    def summary(self) -> dict[str, Any]:
        return {
            "shots": self.shots,
            "episodes": len(self.episodes),
            "mean": self.mean,
            "ci95": [self.ci_low, self.ci_high],
            "c_selection": self.c_selection,
            "per_episode": [
                {"seed": list(e.seed), "C": e.c, "cv_acc": e.cv_acc, "test_acc": e.test_acc} for e in self.episodes
            ],
            "seconds": self.seconds,
        }


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: a few-shot fit is ~50 x 1280, far below what pays for a thread hand-off.

    Measured on the 2-core dev machine under load: 1.5 ms per L-BFGS evaluation on one thread,
    30-125 ms on two.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def class_rows(labels: np.ndarray) -> list[np.ndarray]:
    """Each class's rows, ascending, classes in ascending order (one sort, not a scan per class)."""
    order = np.argsort(labels, kind="stable")
    starts = np.unique(labels[order], return_index=True)[1]
    return [order[a:b] for a, b in zip(starts, [*starts[1:], len(order)], strict=True)]


def draw_shots(groups: Sequence[np.ndarray], shots: int, rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """``shots`` distinct rows of every class (``groups`` from :func:`class_rows`), ascending."""
    chosen = []
    for rows in groups:
        if len(rows) < shots:
            raise DataError(f"class {labels[rows[0]]} has {len(rows)} training sample(s), fewer than {shots} shots.")
        chosen.append(rng.choice(rows, shots, replace=False))
    return np.sort(np.concatenate(chosen))


def _folds(labels: np.ndarray, shots: int, rng: np.random.Generator) -> np.ndarray:
    """Fold number of each shot: every class spread evenly over ``min(CV_FOLDS, shots)`` folds."""
    folds = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        folds[rows] = np.arange(len(rows)) % min(CV_FOLDS, shots)
    return folds


def in_span(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x``'s rows in an orthonormal basis ``V`` of their span, and ``V``; ``(x, None)`` unless rows < features.

    L2 logistic regression's weights lie in the span of its training rows (their loss gradient does,
    and the penalty only shrinks), and ``X V^T`` with ``||W V^T|| = ||W||`` makes fitting on the
    coordinates the same problem: weights ``B`` there are ``W = B V``. A few-shot fit of 40 rows in
    1,280 dimensions then works on 40 coordinates: the same iterates, about 2x faster a few-shot episode
    here (5 Fashion-MNIST lite0 episodes: 15.8 s -> 7.6 s).
    """
    if len(x) >= x.shape[1]:
        return x, None
    basis = torch.linalg.svd(x.double(), full_matrices=False).Vh  # (rows, features), orthonormal rows
    return x.double() @ basis.T, basis


def fit_shots(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    folds: np.ndarray | None,
    c_grid: Sequence[float] = FEW_SHOT_C_GRID,
    fixed_c: float = ONE_SHOT_C,
    *,
    span: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, float, dict[float, float] | None]:
    """Logistic regression on the shots ``x`` (raw features), C chosen by cross-validation over ``folds``.

    Each fold standardises with its own training part; C values are fitted in ascending order,
    warm-started, and ties go to the smaller C. ``folds`` None uses ``fixed_c``. ``span`` fits in the
    span of the (standardised) training rows (:func:`in_span`): the same model, fewer coordinates.

    Returns:
        weight ``(C, D)`` and bias on raw features, the C used and every C's cross-validated accuracy.
    """
    c, cv_acc = fixed_c, None
    if folds is not None:
        correct = np.zeros(len(c_grid))
        for fold in np.unique(folds):
            held = torch.from_numpy(folds == fold)
            scaler = Standardizer(x[~held])
            fit_x, basis = in_span(scaler(x[~held])) if span else (scaler(x[~held]), None)
            held_x = scaler(x[held]) if basis is None else scaler(x[held]).double() @ basis.T
            init = None
            for i, value in enumerate(sorted(c_grid)):
                init = lbfgs_logistic_regression(fit_x, y[~held], num_classes, value, init)
                correct[i] += int(((held_x @ init[0].T + init[1]).argmax(1) == y[held]).sum())
        grid = sorted(c_grid)
        c = grid[int(np.argmax(correct))]  # the first maximum: the smallest C among ties
        cv_acc = {value: float(n / len(y)) for value, n in zip(grid, correct, strict=True)}
    scaler = Standardizer(x)
    fit_x, basis = in_span(scaler(x)) if span else (scaler(x), None)
    weight, bias = lbfgs_logistic_regression(fit_x, y, num_classes, c)
    if basis is not None:
        weight = (weight.double() @ basis).to(x.dtype)
        bias = bias.to(x.dtype)
    weight, bias = scaler.fold(weight, bias)
    return weight, bias, c, cv_acc


@torch.no_grad()
def few_shot(
    train: tuple[Sequence[np.ndarray], np.ndarray, Sequence[str]],
    test: tuple[Sequence[np.ndarray], np.ndarray],
    num_classes: int,
    *,
    shots: int = 5,
    episodes: int = FEW_SHOT_EPISODES,
    seed: int = 0,
    c_grid: Sequence[float] = FEW_SHOT_C_GRID,
    one_shot_c: float = ONE_SHOT_C,
    chunk_rows: int = 1024,
) -> FewShotResult:
    """``episodes`` few-shot linear probes with ``shots`` training samples per class.

    Args:
        train: the training split's shards, int64 labels and sample ids (the only split shots come from).
        test: the test split's shards and labels, read once at the end to score every episode.
        num_classes: classes.
        shots: samples per class per episode (1, 5 and 10 are the usual settings).
        episodes: how many episodes; episode e draws with ``np.random.default_rng((seed, e))``.
        seed: the run's seed: the same seed gives the same episodes.
        c_grid: C values cross-validated inside the shots (``min(5, shots)`` folds).
        one_shot_c: the C used with one shot, where there is nothing to cross-validate.
        chunk_rows: test rows scored at once.
    """
    start = time.perf_counter()
    shards, labels, ids = train
    labels = np.asarray(labels, dtype=np.int64)
    split_rows(shards, labels)
    if len(ids) != len(labels):
        raise DataError(f"{len(ids)} sample ids for {len(labels)} training labels.")
    groups = class_rows(labels)
    fitted = []
    for e in range(episodes):
        rng = np.random.default_rng((seed, e))
        rows = draw_shots(groups, shots, rng, labels)
        y = labels[rows]
        folds = _folds(y, shots, rng) if shots > 1 else None
        x = torch.from_numpy(take_rows(shards, rows))
        with torch.enable_grad(), single_thread():
            weight, bias, c, cv_acc = fit_shots(x, torch.from_numpy(y), num_classes, folds, c_grid, one_shot_c)
        fitted.append((rows, folds, weight, bias, c, cv_acc))
    test_labels = np.asarray(test[1], dtype=np.int64)
    split_rows(test[0], test_labels)
    weights = torch.stack([f[2] for f in fitted])  # (E, C, D): every episode scored in one pass
    biases = torch.stack([f[3] for f in fitted])
    flat_w, flat_b = weights.reshape(-1, weights.shape[-1]).T.contiguous(), biases.reshape(-1)
    predicted = np.zeros((len(test_labels), episodes), dtype=np.int64)  # every episode's test predictions
    for row, chunk in iter_chunks(test[0], chunk_rows):
        logits = (torch.from_numpy(chunk) @ flat_w + flat_b).view(len(chunk), episodes, num_classes)
        predicted[row : row + len(chunk)] = logits.argmax(-1).numpy()
    results = [
        Episode(e, (seed, e), rows, [ids[i] for i in rows], c, cv_acc, accuracy(predicted[:, e], test_labels), folds)
        for e, (rows, folds, _, _, c, cv_acc) in enumerate(fitted)
    ]
    mean, low, high = mean_ci([r.test_acc for r in results])
    if shots == 1:
        selection = f"fixed C={one_shot_c:g}: one shot per class leaves nothing to cross-validate"
    else:
        selection = f"{min(CV_FOLDS, shots)}-fold cross-validation inside the shots over C in {list(c_grid)}"
    return FewShotResult(shots, results, mean, low, high, selection, time.perf_counter() - start)
