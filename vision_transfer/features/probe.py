"""Linear probes on cached features: a many-head SGD sweep, or L-BFGS logistic regression.

Both follow the Kornblith et al. (2019) / CLIP protocol: choose the regularisation on a
validation split, refit on train+val with it, report the test split once.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm  # text bars: also in notebooks, without ipywidgets

DEFAULT_LRS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
DEFAULT_WDS = (0.0, 1e-5, 1e-4, 1e-3)
# Kornblith et al. 2019 / CLIP: inverse regularisation C on a log grid from 1e-6 to 1e5.
KORNBLITH_C_GRID = tuple(float(c) for c in np.logspace(-6, 5, 45))


@dataclass
class ProbeResult:
    """What a probe chose and scored; ``weight``/``bias`` act on raw (unstandardised) features."""

    solver: str
    val_acc: float
    test_acc: float | None
    test_acc_top5: float | None
    chosen: dict[str, float]
    sweep: list[dict[str, float]]
    seconds: float
    weight: torch.Tensor = field(repr=False)
    bias: torch.Tensor = field(repr=False)

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("weight", "bias")}


class Standardizer:
    """Per-feature mean/std of the training features; folded into the final linear layer."""

    def __init__(self, features: torch.Tensor) -> None:
        self.mean = features.mean(0)
        self.std = features.std(0).clamp_min(1e-6)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std

    def fold(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) on standardised features -> the same map on raw features."""
        raw_weight = weight / self.std
        return raw_weight, bias - raw_weight @ self.mean


def _accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    return float((top == labels[:, None]).any(-1).float().mean())


def train_heads(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    lrs: list[float],
    wds: list[float],
    *,
    epochs: int = 10,
    batch_size: int = 1024,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train ``len(lrs)`` linear heads at once on standardised features, one pass per epoch.

    Head h has learning rate ``lrs[h]`` and L2 penalty ``wds[h]``; their losses are summed
    (DINOv2's linear evaluation). All heads are one ``D x (H*C)`` matrix, so a step is one matmul;
    a per-head learning rate is a per-head gradient scale, exact for SGD with momentum.

    Returns:
        weights ``(H, C, D)`` and biases ``(H, C)``.
    """
    heads = len(lrs)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.zeros(x.shape[1], heads * num_classes, requires_grad=True)
    bias = torch.zeros(heads * num_classes, requires_grad=True)
    lr_scale = torch.tensor(lrs, dtype=torch.float32).repeat_interleave(num_classes)
    wd = torch.tensor(wds, dtype=torch.float32).repeat_interleave(num_classes)
    optimizer = torch.optim.SGD([weight, bias], lr=1.0, momentum=0.9, nesterov=True)
    steps_per_epoch = max(1, math.ceil(len(x) / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    for _ in tqdm(range(epochs), desc=f"probe: {heads} heads", unit="epoch", leave=False, disable=None):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            logits = (x[index] @ weight + bias).view(len(index), heads, num_classes)
            # (N, C, H) logits against (N, H) targets: one cross-entropy over every head, summed
            targets = y[index, None].expand(-1, heads)
            loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="sum") / len(index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            cosine = 0.5 * (1 + math.cos(math.pi * step / total))  # per-step cosine decay to 0
            with torch.no_grad():
                weight.grad.add_(weight * wd)  # type: ignore[union-attr]  # d/dW of 0.5 * wd_h * ||W_h||^2
                weight.grad.mul_(lr_scale * cosine)  # type: ignore[union-attr]
                bias.grad.mul_(lr_scale * cosine)  # type: ignore[union-attr]
            optimizer.step()
            step += 1
    with torch.no_grad():
        w = weight.detach().view(x.shape[1], heads, num_classes).permute(1, 2, 0).contiguous()
        return w, bias.detach().view(heads, num_classes)


def sgd_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor] | None,
    num_classes: int,
    *,
    lrs: tuple[float, ...] = DEFAULT_LRS,
    wds: tuple[float, ...] = DEFAULT_WDS,
    epochs: int = 10,
    batch_size: int = 1024,
    seed: int = 0,
) -> ProbeResult:
    """Sweep ``lrs x wds`` heads in one run, pick on val, refit on train+val, test once."""
    start = time.perf_counter()
    grid = [(lr, wd) for lr in lrs for wd in wds]
    scaler = Standardizer(train[0])
    w, b = train_heads(
        scaler(train[0]), train[1], num_classes, [g[0] for g in grid], [g[1] for g in grid],
        epochs=epochs, batch_size=batch_size, seed=seed,
    )  # fmt: skip
    val_x = scaler(val[0])
    sweep = []
    for h, (lr, wd) in enumerate(grid):
        sweep.append({"lr": lr, "wd": wd, "val_acc": _accuracy(val_x @ w[h].T + b[h], val[1])})
    best = max(sweep, key=lambda r: (r["val_acc"], -r["wd"]))
    scaler, both_x, both_y = _train_val(train, val)
    w, b = train_heads(
        both_x, both_y, num_classes, [best["lr"]], [best["wd"]], epochs=epochs, batch_size=batch_size, seed=seed
    )
    weight, bias = scaler.fold(w[0], b[0])
    return _finish("sgd", weight, bias, best, sweep, test, start)


def lbfgs_logistic_regression(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float, init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 200,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Multinomial logistic regression minimising ``C * sum(CE) + ||W||^2 / 2`` (scikit-learn's
    objective; the bias is not penalised), by full-batch L-BFGS on standardised features."""
    weight = (init[0].clone() if init else torch.zeros(num_classes, x.shape[1])).requires_grad_(True)
    bias = (init[1].clone() if init else torch.zeros(num_classes)).requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-9,
        history_size=20, line_search_fn="strong_wolfe",
    )  # fmt: skip
    penalty = 1.0 / (c * len(x))  # the objective divided by C * N, better conditioned

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def lbfgs_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor] | None,
    num_classes: int,
    *,
    c_grid: tuple[float, ...] = KORNBLITH_C_GRID,
    max_iter: int = 200,
) -> ProbeResult:
    """The classic protocol: L2 logistic regression over a C grid (warm-started from strong to
    weak regularisation), C chosen on val, refit on train+val, test once."""
    start = time.perf_counter()
    scaler = Standardizer(train[0])
    x, val_x = scaler(train[0]), scaler(val[0])
    sweep: list[dict[str, float]] = []
    init = best_params = None
    best: dict[str, float] = {}
    # ascending C: on a tie the first (most regularised) value stays best
    for c in tqdm(sorted(c_grid), desc="probe: C sweep", unit="C", leave=False, disable=None):
        init = lbfgs_logistic_regression(x, train[1], num_classes, c, init, max_iter)
        sweep.append({"C": c, "val_acc": _accuracy(val_x @ init[0].T + init[1], val[1])})
        if not best or sweep[-1]["val_acc"] > best["val_acc"]:
            best, best_params = sweep[-1], init
    scaler, both_x, both_y = _train_val(train, val)
    w, b = lbfgs_logistic_regression(both_x, both_y, num_classes, best["C"], best_params, max_iter)
    weight, bias = scaler.fold(w, b)
    return _finish("lbfgs", weight, bias, best, sweep, test, start)


def _train_val(
    train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor]
) -> tuple[Standardizer, torch.Tensor, torch.Tensor]:
    """The refit data: train+val, standardised with its own statistics (folded into the head later)."""
    x, y = torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]])
    scaler = Standardizer(x)
    return scaler, scaler(x), y


def _finish(
    solver: str,
    weight: torch.Tensor,
    bias: torch.Tensor,
    best: dict[str, float],
    sweep: list[dict[str, float]],
    test: tuple[torch.Tensor, torch.Tensor] | None,
    start: float,
) -> ProbeResult:
    test_acc = test_top5 = None
    if test is not None:
        logits = test[0] @ weight.T + bias
        test_acc, test_top5 = _accuracy(logits, test[1]), _accuracy(logits, test[1], 5)
    chosen = {k: float(v) for k, v in best.items() if k != "val_acc"}
    return ProbeResult(
        solver, best["val_acc"], test_acc, test_top5, chosen, sweep, time.perf_counter() - start, weight, bias
    )


Solver = Literal["sgd", "lbfgs"]


def run_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray] | None,
    num_classes: int,
    solver: Solver = "sgd",
    **options: Any,
) -> ProbeResult:
    """Probe numpy features with ``solver`` (see :func:`sgd_probe` and :func:`lbfgs_probe`)."""

    def tensors(pair: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.as_tensor(np.asarray(pair[0], dtype=np.float32)), torch.as_tensor(pair[1], dtype=torch.long)

    args = (tensors(train), tensors(val), tensors(test) if test is not None else None, num_classes)
    return sgd_probe(*args, **options) if solver == "sgd" else lbfgs_probe(*args, **options)
