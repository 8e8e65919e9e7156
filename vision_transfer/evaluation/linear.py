"""Linear probes on cached features: a many-head SGD sweep, or L-BFGS logistic regression.

Both fit on train, choose the regularisation on a validation split and report the test split once,
with the train-only head chosen on val. Kornblith et al. (2019) and CLIP then refit on train+val; we
do not, because a refit head has trained on val, which leaves nothing held out to tune what comes
after the probe on (the temperature and multi-label thresholds of ``probe.ckpt``): tuned on the refit
head's val outputs they were fitted in-sample (in the audit: val accuracy 0.933 vs test 0.894, a
temperature of 0.413 where held-out data gives 0.583). It is also fine-tuning's protocol (train on
train, choose on val), so probe and fine-tuning scores in one table come from the same training data.

Labels are either a 1-D vector of class indices (multi-class: softmax cross-entropy, chosen on
val accuracy) or an ``(N, C)`` 0/1 matrix (multi-label: one binary logistic regression per class,
chosen on val mAP).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any, Literal

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm  # text bars: also in notebooks, without ipywidgets

from vision_transfer.errors import DataError, VisionTransferError
from vision_transfer.evaluation.kinds import SINGLE, TaskName, kind_of_labels, task_kind

DEFAULT_LRS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
DEFAULT_WDS = (0.0, 1e-5, 1e-4, 1e-3)
# Kornblith et al. 2019 / CLIP: inverse regularisation C on a log grid from 1e-6 to 1e5.
KORNBLITH_C_GRID = tuple(float(c) for c in np.logspace(-6, 5, 45))
# L-BFGS's relative tolerance (see _Objective.converged): 1e-4 matched a 1e-12-gradient solve's
# val accuracy at 44 of the 45 Cs on real features (one sample apart at the 45th), 1e-3 at 39.
LBFGS_TOL = 1e-4

Task = TaskName
ClassWeight = Literal["balanced"] | None
Pair = tuple[torch.Tensor, torch.Tensor]
# standardised features, labels, loss weights (None: unweighted): one step of the SGD probe
Minibatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


@cache
def _blas_controller() -> Any:
    from threadpoolctl import ThreadpoolController  # finding the loaded BLAS libraries takes a while: once

    return ThreadpoolController()


def blas_threads(limit: int) -> AbstractContextManager[Any]:
    """At most ``limit`` threads in numpy's BLAS (not torch's) inside the ``with`` block."""
    return _blas_controller().limit(limits=limit, user_api="blas")  # type: ignore[no-any-return]


class ProbeOptionError(VisionTransferError, ValueError):
    """A probe option with a value the probes do not support."""


@dataclass
class ProbeResult:
    """What a probe chose and scored; ``weight``/``bias``: the head chosen on val, fitted on train
    only, acting on raw (unstandardised) features.

    Multi-class results fill the accuracy fields (``balanced_accuracy``: mean recall over the classes
    present in the test split; ``f1_macro``: its macro F1); multi-label ones fill the mAP fields (macro
    average precision over the classes with a positive example; micro-F1 of the logit > 0
    predictions) and leave the accuracies None. Test metrics are None without a test split.
    Definitions: :mod:`vision_transfer.evaluation.metrics`.
    """

    solver: str
    val_acc: float | None
    test_acc: float | None
    test_acc_top5: float | None
    chosen: dict[str, float]
    sweep: list[dict[str, float]]
    seconds: float
    weight: torch.Tensor = field(repr=False)
    bias: torch.Tensor = field(repr=False)
    task: Task = SINGLE
    class_weight: str | None = None
    balanced_accuracy: float | None = None
    f1_macro: float | None = None
    val_map: float | None = None
    test_map: float | None = None
    val_f1_micro: float | None = None
    test_f1_micro: float | None = None
    test_ap_per_class: list[float | None] | None = None  # None for a class without a test positive

    def test_scores(self) -> dict[str, float]:
        """The test scores, keyed as :meth:`TaskKind.scores <vision_transfer.evaluation.kinds.TaskKind.scores>`."""
        fields = {"acc": self.test_acc, "acc_top5": self.test_acc_top5, "balanced_acc": self.balanced_accuracy,
                  "f1_macro": self.f1_macro, "map": self.test_map, "f1_micro": self.test_f1_micro}  # fmt: skip
        return {key: value for key, value in fields.items() if value is not None}

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("weight", "bias")}


# Floor on a feature's standard deviation, so constant features stay finite after standardising.
MIN_STD = 1e-6


class Standardizer:
    """Per-feature mean/std of the training features; folded into the final linear layer.

    Built from the features in memory, or with :meth:`from_moments` from statistics computed elsewhere
    (a streamed pass over shards); either way a standard deviation is floored at ``MIN_STD``.
    """

    def __init__(self, features: torch.Tensor) -> None:
        self.mean = features.mean(0)
        self.std = features.std(0).clamp_min(MIN_STD)

    @classmethod
    def from_moments(
        cls, mean: np.ndarray | torch.Tensor, std: np.ndarray | torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> Standardizer:
        """The standardisation with a given per-feature ``mean`` and ``std``, in ``dtype``."""
        scaler = cls.__new__(cls)
        scaler.mean = torch.as_tensor(mean).to(dtype)
        scaler.std = torch.as_tensor(std).to(dtype).clamp_min(MIN_STD)
        return scaler

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std

    def fold(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) on standardised features -> the same map on raw features."""
        raw_weight = weight / self.std
        return raw_weight, bias - raw_weight @ self.mean


def task_of(labels: torch.Tensor | np.ndarray) -> Task:
    """The task kind's name of these labels: an ``(N, C)`` label matrix is multi-label."""
    return kind_of_labels(labels).name


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """scikit-learn's ``class_weight="balanced"`` as per-sample (multi-class, ``(N,)``) or per-entry
    (multi-label, ``(N, C)``) loss weights.

    Multi-class: class c weighs ``n_samples / (n_present_classes * count_c)``. Multi-label: each
    class is its own binary problem (as in ``OneVsRestClassifier``), so its positives weigh
    ``n / (2 * n_pos)`` and its negatives ``n / (2 * n_neg)``. Either way the weights sum to N per
    problem, so the regularisation strength C keeps its meaning.
    """
    n = len(labels)
    if labels.ndim == 2:
        positives = labels.sum(0)
        return torch.where(labels > 0, n / (2 * positives), n / (2 * (n - positives))).float()
    counts = torch.bincount(labels, minlength=num_classes).double()
    per_class = n / (int((counts > 0).sum()) * counts.clamp_min(1))
    return per_class[labels].float()


def _sample_weight(labels: torch.Tensor, num_classes: int, class_weight: ClassWeight) -> torch.Tensor | None:
    if class_weight is None:
        return None
    if class_weight != "balanced":
        raise ProbeOptionError(f"class_weight must be None or 'balanced', not {class_weight!r}.")
    return class_weights(labels, num_classes)


def epoch_steps(rows: int, batch_size: int) -> int:
    """Minibatches in one epoch over ``rows`` rows (the last one may be short)."""
    return max(1, math.ceil(rows / batch_size))


def tensor_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 10,
    batch_size: int = 1024,
    seed: int = 0,
    sample_weight: torch.Tensor | None = None,
) -> Iterator[Minibatch]:
    """``epochs`` passes over in-memory (standardised) features, each in a fresh seeded permutation."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            yield x[index], y[index], None if sample_weight is None else sample_weight[index]


def train_heads(
    batches: Iterable[Minibatch],
    dim: int,
    num_classes: int,
    lrs: Sequence[float],
    wds: Sequence[float],
    *,
    steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train ``len(lrs)`` linear heads at once on standardised minibatches: the one SGD loop of the
    linear probes, fed from memory (:func:`tensor_batches`) or from shards (``stream.shard_batches``).

    Head h has learning rate ``lrs[h]`` and L2 penalty ``wds[h]``; their losses are summed
    (DINOv2's linear evaluation). All heads are one ``D x (H*C)`` matrix, so a step is one matmul;
    a per-head learning rate is a per-head gradient scale, exact for SGD with Nesterov momentum 0.9.
    The learning rate decays to 0 on a per-step cosine over ``steps``; training stops when ``batches``
    runs out (which may be before ``steps``, e.g. to time a few steps).

    Args:
        batches: ``(features (B, D), labels, loss weights or None)``: labels are class indices ``(B,)``
            (softmax cross-entropy) or a ``(B, C)`` 0/1 matrix (a binary cross-entropy per class,
            summed over classes); weights are per-sample ``(B,)`` or, multi-label, per-entry ``(B, C)``.
        dim: the feature dimension D.
        steps: the schedule's length in minibatches (:func:`epoch_steps` times the epochs).

    Returns:
        weights ``(H, C, D)`` and biases ``(H, C)`` acting on standardised features.
    """
    heads = len(lrs)
    weight = torch.zeros(dim, heads * num_classes, requires_grad=True)
    bias = torch.zeros(heads * num_classes, requires_grad=True)
    lr_scale = torch.tensor(list(lrs), dtype=torch.float32).repeat_interleave(num_classes)
    wd = torch.tensor(list(wds), dtype=torch.float32).repeat_interleave(num_classes)
    optimizer = torch.optim.SGD([weight, bias], lr=1.0, momentum=0.9, nesterov=True)
    progress = tqdm(batches, desc=f"probe: {heads} heads", total=steps, unit="step", leave=False, disable=None)
    for step, (x, y, weights) in enumerate(progress):
        logits = (x @ weight + bias).view(len(x), heads, num_classes)
        if y.ndim == 2:  # (N, H, C) logits against the (N, C) targets, repeated for every head
            targets = y[:, None, :].expand(-1, heads, -1).float()
            losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
            if weights is not None:
                losses = losses * weights[:, None, :]
        else:  # (N, C, H) logits against (N, H) targets: one cross-entropy over every head
            losses = F.cross_entropy(logits.transpose(1, 2), y[:, None].expand(-1, heads), reduction="none")
            if weights is not None:
                losses = losses * weights[:, None]
        # balanced weights average 1 over the data set, so the per-sample scale (and lr) is unchanged
        loss = losses.sum() / len(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        cosine = 0.5 * (1 + math.cos(math.pi * step / steps))  # per-step cosine decay to 0
        with torch.no_grad():
            weight.grad.addcmul_(weight, wd)  # type: ignore[union-attr]  # d/dW of 0.5 * wd_h * ||W_h||^2, in place
            weight.grad.mul_(lr_scale * cosine)  # type: ignore[union-attr]
            bias.grad.mul_(lr_scale * cosine)  # type: ignore[union-attr]
        optimizer.step()
    with torch.no_grad():
        w = weight.detach().view(dim, heads, num_classes).permute(1, 2, 0).contiguous()
        return w, bias.detach().view(heads, num_classes)


def choose_head(sweep: Sequence[dict[str, float]], metric: str) -> int:
    """The head with the best val ``metric``; ties go to the smaller weight decay, then the earlier head."""
    return max(range(len(sweep)), key=lambda h: (sweep[h][metric], -sweep[h]["wd"]))


def sgd_probe(
    train: Pair,
    val: Pair,
    test: Pair | None,
    num_classes: int,
    *,
    lrs: tuple[float, ...] = DEFAULT_LRS,
    wds: tuple[float, ...] = DEFAULT_WDS,
    epochs: int = 10,
    batch_size: int = 1024,
    seed: int = 0,
    class_weight: ClassWeight = None,
) -> ProbeResult:
    """Sweep ``lrs x wds`` heads on train in one run, pick on val (accuracy, or mAP for multi-label
    labels), test that head once. ``class_weight="balanced"`` weighs each sample's loss as
    scikit-learn does (see :func:`class_weights`)."""
    start = time.perf_counter()
    task = _check_labels(train, val, test, num_classes, "sgd")
    grid = [(lr, wd) for lr in lrs for wd in wds]
    scaler = Standardizer(train[0])
    sample_weight = _sample_weight(train[1], num_classes, class_weight)
    batches = tensor_batches(
        scaler(train[0]), train[1], epochs=epochs, batch_size=batch_size, seed=seed, sample_weight=sample_weight
    )
    steps = epochs * epoch_steps(len(train[0]), batch_size)
    w, b = train_heads(batches, train[0].shape[1], num_classes, [g[0] for g in grid], [g[1] for g in grid], steps=steps)
    val_x = scaler(val[0])
    sweep = [{"lr": lr, "wd": wd, **_val_score(val_x @ w[h].T + b[h], val[1])} for h, (lr, wd) in enumerate(grid)]
    chosen = choose_head(sweep, _metric(task))
    weight, bias = scaler.fold(w[chosen], b[chosen])  # the train-only head: val stays held out (module notes)
    return _finish("sgd", weight, bias, sweep[chosen], sweep, val, test, start, task, class_weight)


class _Objective:
    """scikit-learn's L2 logistic regression ``C * sum_i s_i * loss_i + ||W||^2 / 2`` (bias not
    penalised) divided by ``C * sum_i s_i``: the mean loss plus ``||W||^2 / (2 C sum_i s_i)``.

    Multi-class: softmax cross-entropy. Multi-label: one binary cross-entropy per class, summed, so
    each class is scikit-learn's binary problem with that C. Value and gradient by hand: no graph.
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float, sample_weight: torch.Tensor | None
    ):
        self.x, self.num_classes, self.labels = x, num_classes, y
        self.kind = kind_of_labels(y)
        self.targets = self.kind.targets(y, num_classes, x.dtype)
        self.weight = None if sample_weight is None else self.kind.entry_weights(sample_weight.to(x.dtype))
        total = float(len(x)) if sample_weight is None else self.kind.weight_total(sample_weight, num_classes)
        self.scale = 1.0 / total
        self.l2 = 1.0 / (c * total)

    def split(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.x.shape[1]
        return theta[: self.num_classes * d].view(self.num_classes, d), theta[self.num_classes * d :]

    def converged(self, theta: torch.Tensor, grad: torch.Tensor, tol: float) -> bool:
        """Whether ``theta`` is optimal to a relative ``tol``.

        The W gradient is ``l2 * W`` minus the loss gradient that W balances at the optimum: below
        ``tol * l2 * max|W|`` it is a relative error, whatever C is (an absolute bound on the gradient
        of the divided objective is met at once at small C, and far from the optimum at large C).
        The bias gradient is the mean residual (predicted minus true frequency), bounded absolutely.
        """
        weight, _ = self.split(theta)
        grad_w, grad_b = self.split(grad)
        w_bound = max(tol * self.l2 * float(weight.abs().max()), 1e-15)
        return float(grad_w.abs().max()) <= w_bound and float(grad_b.abs().max()) <= 1e-5 * tol

    def __call__(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        weight, bias = self.split(theta)
        logits = torch.addmm(bias, self.x, weight.T)
        losses, residual = self.kind.logistic_terms(logits, self.labels, self.targets)
        if self.weight is not None:
            losses, residual = losses * self.weight, residual * self.weight
        residual *= self.scale
        grad_w = torch.addmm(weight, residual.T, self.x, beta=self.l2)
        value = float(losses.sum()) * self.scale + 0.5 * self.l2 * float(weight.pow(2).sum())
        return value, torch.cat([grad_w.flatten(), residual.sum(0)])


def _lbfgs(
    objective: _Objective | _Preconditioned, theta: torch.Tensor, max_iter: int, tol: float, history: int = 20
) -> tuple[torch.Tensor, int, bool]:
    """Minimise the (convex) objective by L-BFGS until it has converged to a relative ``tol``.

    Written out rather than ``torch.optim.LBFGS``, whose absolute thresholds (it drops curvature pairs
    with ``s.y <= 1e-10`` and stops on loss changes under ``tolerance_change``) halt it far from the
    optimum once the steps get small, e.g. at very small C. A backtracking line search suffices on a
    convex function: every pair has ``s.y > 0``. Returns the point, iterations and whether it converged.
    The vector algebra runs in numpy (zero-copy views of the CPU tensors): on few-shot problems of a
    few hundred parameters, torch's per-operation overhead was most of the time. numpy's BLAS runs on
    one thread meanwhile: its idle threads spinning beside torch's made every operation ~5x slower.
    """

    def evaluate(point: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = objective(torch.from_numpy(point))
        return value, grad.numpy()

    def converged(point: np.ndarray, grad: np.ndarray) -> bool:
        return objective.converged(torch.from_numpy(point), torch.from_numpy(grad), tol)

    with blas_threads(1):  # numpy's BLAS pool beside torch's: contended, every operation ran 5x slower
        return _lbfgs_loop(evaluate, converged, theta.detach().cpu().numpy().copy(), max_iter, history)


def _lbfgs_loop(
    evaluate: Callable[[np.ndarray], tuple[float, np.ndarray]],
    converged: Callable[[np.ndarray, np.ndarray], bool],
    x: np.ndarray,
    max_iter: int,
    history: int,
) -> tuple[torch.Tensor, int, bool]:
    value, grad = evaluate(x)
    pairs: list[tuple[np.ndarray, np.ndarray, float]] = []  # the last steps s, gradient changes y, 1/s.y
    for iteration in range(max_iter):
        if converged(x, grad):
            return torch.from_numpy(x), iteration, True
        direction = -grad  # two-loop recursion: direction = -H grad
        alphas = []
        for s, y, rho in reversed(pairs):
            alphas.append(rho * float(s @ direction))
            direction = direction - alphas[-1] * y
        if pairs:
            s, y, _ = pairs[-1]
            direction = direction * (float(s @ y) / float(y @ y))
        else:  # first step: at most 1 in the largest coordinate; the line search fixes the scale
            direction = direction / max(1.0, float(np.abs(grad).max()))
        for (s, y, rho), alpha in zip(pairs, reversed(alphas), strict=True):
            direction = direction + s * (alpha - rho * float(y @ direction))
        slope = float(grad @ direction)
        if slope >= 0:  # not a descent direction (rounding): restart from the gradient
            pairs.clear()
            direction = -grad / max(1.0, float(np.abs(grad).max()))
            slope = float(grad @ direction)
        step = 1.0
        while True:
            new_value, new_grad = evaluate(x + step * direction)
            new_slope = float(new_grad @ direction)
            # Armijo; or, where rounding hides the decrease in the value (tiny steps), the slope's
            # decrease (Hager & Zhang's approximate Wolfe condition)
            if new_value <= value + 1e-4 * step * slope:
                break
            if new_value <= value + 1e-13 * abs(value) and new_slope <= 0.1 * abs(slope):
                break
            # the secant step on the slope (exact on a quadratic), kept within [0.1, 0.5] of the step
            secant = step * slope / (slope - new_slope) if new_slope > slope else 0.5 * step
            step = min(0.5 * step, max(0.1 * step, secant))
            if step < 1e-16:
                return torch.from_numpy(x), iteration, False
        s, y = step * direction, new_grad - grad
        sy = float(s @ y)
        if sy > 1e-12 * float(np.linalg.norm(s)) * float(np.linalg.norm(y)):  # relative, unlike torch's 1e-10
            pairs.append((s, y, 1.0 / sy))
            if len(pairs) > history:
                pairs.pop(0)
        x, value, grad = x + s, new_value, new_grad
    return torch.from_numpy(x), max_iter, converged(x, grad)


class _Rotation:
    """Standardised features ``x = z V^T`` with orthogonal columns ``z = x V`` (``V``: the eigenvectors
    of ``x^T x``, ``s2``: its eigenvalues, the columns' squared norms). Logistic regression in the
    rotated weights ``W V`` is the same problem (same logits, same ``||W||``), with a curvature that is
    nearly diagonal, so a diagonal rescaling conditions it (:class:`_Preconditioned`)."""

    def __init__(self, x: torch.Tensor) -> None:
        s2, self.basis = torch.linalg.eigh(x.T @ x)
        self.z, self.s2 = x @ self.basis, s2.clamp_min(0)


class _Preconditioned:
    """The objective in the variables ``theta = d * (W V, b)``, with ``d`` the square root of the
    curvature's diagonal estimated at the starting point: ``l2 + scale * a_k * s2_j`` for weight
    ``(k, j)`` and ``scale * a_k * N`` for bias k, where ``a_k`` is the mean ``p_k (1 - p_k)`` there.
    Without it, L-BFGS's iterations grow with C and the spread of the feature spectrum (about ten
    thousand over the Kornblith grid on 1,280 lite0 features). Convergence is still judged on ``W``
    and its gradient in the original coordinates (:meth:`_Objective.converged`), so the solution is
    the one the unconditioned solver reaches; only the path to it is shorter.
    """

    def __init__(self, objective: _Objective, rotation: _Rotation, start: torch.Tensor) -> None:
        self.objective, self.rotation = objective, rotation
        weight, bias = objective.split(start)
        logits = torch.addmm(bias, objective.x, weight.T)
        _, residual = objective.kind.logistic_terms(logits, objective.labels, objective.targets)
        p = residual + objective.targets
        a = (p * (1 - p)).mean(0).clamp_min(1e-8)  # (K,)
        self.d_w = (objective.l2 + objective.scale * a[:, None] * rotation.s2[None, :]).sqrt()
        self.d_b = (objective.scale * a * len(objective.x)).sqrt()
        self.theta0 = self.scaled(start)

    def scaled(self, theta: torch.Tensor) -> torch.Tensor:
        weight, bias = self.objective.split(theta)
        return torch.cat([(weight * self.d_w).flatten(), bias * self.d_b])

    def unscaled(self, theta: torch.Tensor) -> torch.Tensor:
        weight, bias = self.objective.split(theta)
        return torch.cat([(weight / self.d_w).flatten(), bias / self.d_b])

    def _rotated_back(self, rotated: torch.Tensor) -> torch.Tensor:
        weight, bias = self.objective.split(rotated)
        return torch.cat([(weight @ self.rotation.basis.T).flatten(), bias])

    def original(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, b)`` in the original coordinates."""
        return self.objective.split(self._rotated_back(self.unscaled(theta)))

    def __call__(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        value, grad = self.objective(self.unscaled(theta))
        return value, self.unscaled(grad)  # d/dtheta = (d/d(W V, b)) / d

    def converged(self, theta: torch.Tensor, grad: torch.Tensor, tol: float) -> bool:
        point, gradient = self.unscaled(theta), self.scaled(grad)  # (W V, b) and its gradient
        weight, weight_grad = self.objective.split(point)[0], self.objective.split(gradient)[0]
        # the rotation keeps each row's norm: a gradient row with max|.| above tol * l2 * max|W| in
        # every rotation (norm / sqrt(D)) is not converged, without rotating back (most iterations)
        gradient_norm = float(weight_grad.norm(dim=1).max()) / math.sqrt(weight_grad.shape[1])
        if gradient_norm > max(tol * self.objective.l2 * float(weight.norm(dim=1).max()), 1e-15):
            return False
        return self.objective.converged(self._rotated_back(point), self._rotated_back(gradient), tol)


def _lbfgs_fit(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    c: float,
    init: tuple[torch.Tensor, torch.Tensor] | None,
    max_iter: int,
    sample_weight: torch.Tensor | None,
    tol: float,
    rotation: _Rotation | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    if y.ndim == 1 and num_classes == 2:
        # scikit-learn fits one binary model for 2 classes; the softmax pair (w, -w) with C/2 is the
        # same model (||w1||^2 + ||w2||^2 = ||w1 - w2||^2 / 2 at the optimum), so C means the same
        c = c / 2
    rotation = rotation or _Rotation(x)
    objective = _Objective(rotation.z, y, num_classes, c, sample_weight)
    if init:
        start = torch.cat([(init[0].to(x.dtype) @ rotation.basis).flatten(), init[1].to(x.dtype)])
    else:
        start = x.new_zeros(num_classes * (x.shape[1] + 1))
    problem = _Preconditioned(objective, rotation, start)
    theta, iterations, converged = _lbfgs(problem, problem.theta0, max_iter, tol)
    weight, bias = problem.original(theta)
    return weight, bias, iterations, converged


def lbfgs_logistic_regression(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float, init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 2000, *, sample_weight: torch.Tensor | None = None, tol: float = LBFGS_TOL,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """L2 logistic regression with scikit-learn's objective ``C * sum(loss) + ||W||^2 / 2`` (the bias
    is not penalised), by full-batch L-BFGS in float64 on standardised features.

    Args:
        y: class indices (multinomial, or scikit-learn's binary model for 2 classes) or an ``(N, C)``
            0/1 matrix (one-vs-rest: an independent binary problem per class).
        init: a warm start ``(W, b)``.
        sample_weight: per-sample ``(N,)`` or, multi-label, per-entry ``(N, C)`` loss weights.
        tol: relative tolerance: W within about ``tol`` of its optimum, relative to its largest entry.

    Returns:
        ``W (C, D)`` and ``b (C,)`` in ``x``'s dtype; warns when ``max_iter`` ran out first.
    """
    weight, bias, iterations, converged = _lbfgs_fit(x.double(), y, num_classes, c, init, max_iter, sample_weight, tol)
    if not converged:
        warnings.warn(f"L-BFGS at C={c:g} stopped after {iterations} iterations before converging.", stacklevel=2)
    return weight.to(x.dtype), bias.to(x.dtype)


def lbfgs_probe(
    train: Pair,
    val: Pair,
    test: Pair | None,
    num_classes: int,
    *,
    c_grid: tuple[float, ...] = KORNBLITH_C_GRID,
    max_iter: int = 2000,
    class_weight: ClassWeight = None,
    tol: float = LBFGS_TOL,
) -> ProbeResult:
    """The classic protocol without the refit (see the module notes): L2 logistic regression on train
    over a C grid (warm-started from strong to weak regularisation), C chosen on val (accuracy, or mAP
    for multi-label labels), that model tested once. Agrees with scikit-learn's
    ``LogisticRegression(C)`` (multinomial) or ``OneVsRestClassifier(LogisticRegression(C))``
    (multi-label), ``class_weight`` included."""
    start = time.perf_counter()
    task = _check_labels(train, val, test, num_classes, "lbfgs")
    # float64: at small C the optimum is a tiny correction to the bias and W; float32 rounding hides it
    scaler = Standardizer(train[0].double())
    x, val_x = scaler(train[0].double()), scaler(val[0].double())
    rotation = _Rotation(x)  # once for the whole C path
    sample_weight = _sample_weight(train[1], num_classes, class_weight)
    sweep: list[dict[str, float]] = []
    path: list[tuple[float, tuple[torch.Tensor, torch.Tensor]]] = []  # (log C, solution) so far
    best_params = None
    best: dict[str, float] = {}
    metric = _metric(task)
    unconverged = []
    # ascending C: on a tie the first (most regularised) value stays best
    for c in tqdm(sorted(c_grid), desc="probe: C sweep", unit="C", leave=False, disable=None):
        init = _extrapolate(path, math.log(c))
        weight, bias, iterations, converged = _lbfgs_fit(
            x, train[1], num_classes, c, init, max_iter, sample_weight, tol, rotation
        )
        path.append((math.log(c), (weight, bias)))
        unconverged += [] if converged else [c]
        sweep.append({"C": c, **_val_score(val_x @ weight.T + bias, val[1]), "iterations": float(iterations)})
        if not best or sweep[-1][metric] > best[metric]:
            best, best_params = sweep[-1], (weight, bias)
    assert best_params is not None
    if unconverged:
        warnings.warn(
            f"L-BFGS ran out of iterations (max_iter={max_iter}) before converging at C = "
            f"{', '.join(f'{c:.3g}' for c in unconverged)}; the scores there may be off.",
            stacklevel=2,
        )
    weight, bias = scaler.fold(*best_params)  # the train-only model: val stays held out (module notes)
    return _finish("lbfgs", weight.float(), bias.float(), best, sweep, val, test, start, task, class_weight)


def _extrapolate(
    path: list[tuple[float, tuple[torch.Tensor, torch.Tensor]]], log_c: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A warm start at ``log_c``: the quadratic in log C through the last three solutions (the path is
    smooth in log C; this halves the L-BFGS iterations over the Kornblith grid), else the last one."""
    if len(path) < 3 or len({t for t, _ in path[-3:]}) < 3:
        return path[-1][1] if path else None
    times = [t for t, _ in path[-3:]]
    coefficients = [
        math.prod((log_c - other) / (t - other) for other in times if other != t) for t in times
    ]  # Lagrange basis at log_c
    if max(abs(a) for a in coefficients) > 10:  # far beyond the last step: extrapolation is no guide
        return path[-1][1]
    weight, bias = (
        sum(a * solution[i] for a, (_, solution) in zip(coefficients, path[-3:], strict=True)) for i in (0, 1)
    )
    return weight, bias  # type: ignore[return-value]  # sums of tensors


def _check_labels(train: Pair, val: Pair, test: Pair | None, num_classes: int, solver: str) -> Task:
    """The task the labels describe; DataError for labels a probe cannot use."""
    kind = kind_of_labels(train[1])
    for name, pair in (("train", train), ("val", val), ("test", test)):
        if pair is None:
            continue
        features, labels = pair
        if len(features) != len(labels):
            raise DataError(f"probe: {name} has {len(features)} feature rows but {len(labels)} labels.")
        if kind_of_labels(labels) is not kind:
            raise DataError(
                f"probe: train labels are {kind.name} but {name} labels are not; use one kind for every split."
            )
        kind.check_labels(labels, num_classes, f"probe: {name}")
    if len(train[1]) == 0 or len(val[1]) == 0:
        raise DataError("probe: the train and val splits need at least one sample each.")
    # L-BFGS: a class without examples sends its bias to minus infinity (logistic regression has no optimum)
    why = kind.unlearnable_classes(train[1], num_classes, needs_every_class=solver == "lbfgs")
    if why:
        raise DataError(f"probe: {why}.")
    return kind.name


def _metric(task: Task) -> str:
    return f"val_{task_kind(task).metric}"


def _val_score(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    scores = kind_of_labels(labels).selection_scores(logits, labels)
    return {f"val_{k}": v for k, v in scores.items()}


def _finish(
    solver: str,
    weight: torch.Tensor,
    bias: torch.Tensor,
    best: dict[str, float],
    sweep: list[dict[str, float]],
    val: Pair,
    test: Pair | None,
    start: float,
    task: Task,
    class_weight: ClassWeight,
) -> ProbeResult:
    chosen = {k: float(v) for k, v in best.items() if not k.startswith("val_") and k != "iterations"}
    result = ProbeResult(
        solver, None, None, None, chosen, sweep, 0.0, weight, bias, task=task, class_weight=class_weight
    )
    for key, value in best.items():  # the chosen sweep model's validation scores
        if key.startswith("val_"):
            setattr(result, key, value)
    if test is not None:
        for key, value in task_kind(task).probe_test_scores(test[0] @ weight.T + bias, test[1]).items():
            setattr(result, key, value)
    result.seconds = time.perf_counter() - start
    return result


Solver = Literal["sgd", "lbfgs"]


def run_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray] | None,
    num_classes: int,
    solver: Solver = "sgd",
    *,
    class_weight: ClassWeight = None,
    **options: Any,
) -> ProbeResult:
    """Probe numpy features with ``solver`` (see :func:`sgd_probe` and :func:`lbfgs_probe`).

    The labels pick the task: a vector of class indices is multi-class, an ``(N, num_classes)`` 0/1
    matrix multi-label.
    """
    if solver not in ("sgd", "lbfgs"):
        raise ProbeOptionError(f"solver must be 'sgd' or 'lbfgs', not {solver!r}.")

    def tensors(pair: tuple[np.ndarray, np.ndarray]) -> Pair:
        labels = np.asarray(pair[1])
        dtype = torch.float32 if labels.ndim == 2 else torch.long
        return torch.as_tensor(np.asarray(pair[0], dtype=np.float32)), torch.as_tensor(labels, dtype=dtype)

    args = (tensors(train), tensors(val), tensors(test) if test is not None else None, num_classes)
    probe = sgd_probe if solver == "sgd" else lbfgs_probe
    return probe(*args, class_weight=class_weight, **options)
