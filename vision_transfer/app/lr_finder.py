"""Learning-rate range test (Smith 2017; fastai's ``lr_find``) on Lightning's Tuner."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.tuner import Tuner

from vision_transfer.errors import VisionTransferError
from vision_transfer.tuning.policy import TuningPolicy


@dataclass
class LrFinderResult:
    """The sweep, its suggestions and the plot.

    ``valley`` is fastai's default rule (the longest stretch over which the loss keeps falling, two
    thirds of the way down it); ``steepest`` is where the smoothed loss falls fastest (Lightning's
    suggestion); ``min_over_10`` is a tenth of the LR at the lowest loss (fastai's classic rule).
    """

    lrs: list[float]
    losses: list[float]
    steepest: float | None
    min_over_10: float | None
    plot: Path | None
    valley: float | None = None

    @property
    def suggested(self) -> float | None:
        """The valley LR; without one, the steepest-descent LR unless it lies past the loss minimum (a
        noisy curve), then a tenth of the minimum's LR.

        The steepest point alone is fooled by noise early in the sweep: on Fashion-MNIST with
        EfficientNet-Lite0 it suggested 3.3e-5, which trained to 0.61 test top-1 where 2e-3 gives 0.90
        (``benchmarks/peers.py``, README "Measured")."""
        if self.valley is not None:
            return self.valley
        if self.steepest is not None and (self.min_over_10 is None or self.steepest <= 10 * self.min_over_10):
            return self.steepest
        return self.min_over_10


def valley(lrs: list[float], losses: list[float]) -> float | None:
    """fastai's ``valley`` rule: the longest (not necessarily contiguous) decreasing run of the loss curve,
    and the LR two thirds of the way from its start to its end (Smith's "a bit before the minimum")."""
    n = len(losses)
    if n < 3:
        return None
    run = [1] * n  # length of the longest decreasing run ending at i
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
        if run[end] < run[i]:
            end, start = i, i - run[i]
    section = (end - start) / 3
    return float(lrs[max(0, start + int(section) + int(section / 2))])


def find_lr(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    min_lr: float = 1e-7,
    max_lr: float = 1.0,
    num_training: int = 100,
    out: str | Path | None = None,
) -> LrFinderResult:
    """Train ``num_training`` steps with an exponentially growing LR and record the loss.

    Every trainable parameter group gets the same LR during the sweep (head_lr and layer_decay
    are ignored), and the model's weights are restored afterwards. In ``gradual`` or ``lp_ft``
    mode the sweep runs the first stage (the head), the one a first LR matters for, also where its
    steps cross a milestone. The sweep runs all its steps whatever the trainer's ``max_epochs``: on a
    small training set they span several epochs (Lightning's own ``lr_find`` stops at ``max_epochs``,
    which cut a 100-step sweep on scikit-learn's digits, 15 steps an epoch, to 45 steps ending at
    1e-4, and its suggestion to 3.9e-5).
    """
    loop = trainer.fit_loop
    max_epochs = loop.max_epochs
    if max_epochs is not None and max_epochs != -1:
        loop.max_epochs = max(max_epochs, num_training)  # every epoch has a step: max_steps ends the sweep
    policy = getattr(model, "policy", None)
    try:
        with policy.held() if isinstance(policy, TuningPolicy) else contextlib.nullcontext():
            finder = Tuner(trainer).lr_find(
                model, datamodule=datamodule, min_lr=min_lr, max_lr=max_lr, num_training=num_training, update_attr=False
            )
    finally:
        loop.max_epochs = max_epochs
    if finder is None or not finder.results.get("lr"):
        raise VisionTransferError("the LR finder recorded no steps; is the training set empty?")
    # Lightning's bias correction of the smoothed loss is one step off, which pulls the first
    # points far below the true loss: they are left out of the curve and of both rules.
    skip = min(10, len(finder.results["lr"]) // 5)
    lrs = [float(v) for v in finder.results["lr"][skip:]]
    losses = [float(v) for v in finder.results["loss"][skip:]]
    finite = [(loss, lr) for lr, loss in zip(lrs, losses, strict=True) if math.isfinite(loss)]
    min_over_10 = min(finite)[1] / 10 if finite else None
    steepest = finder.suggestion(skip_begin=skip, skip_end=1)
    # the valley ignores the last 5 points, where the loss blows up, as fastai's lr_find does
    curve = [(lr, loss) for lr, loss in zip(lrs[:-5], losses[:-5], strict=True) if math.isfinite(loss)]
    low = valley([lr for lr, _ in curve], [loss for _, loss in curve])
    result = LrFinderResult(lrs, losses, float(steepest) if steepest else None, min_over_10, None, low)
    if out is not None:
        result.plot = _plot(result, Path(out))
    return result


def _plot(result: LrFinderResult, out: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses)
    for value, label, color in (
        (result.valley, "valley", "tab:blue"),
        (result.steepest, "steepest descent", "tab:red"),
        (result.min_over_10, "minimum / 10", "tab:green"),
    ):
        if value is not None:
            ax.axvline(value, color=color, linestyle="--", label=f"{label}: {value:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title(f"LR range test, suggested lr {result.suggested:.2e}" if result.suggested else "LR range test")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def _fmt(value: float | None) -> str:
    return f"{value:.2e}" if value is not None else "none"


def summary_lines(result: LrFinderResult) -> list[str]:
    """What ``vision-transfer lr-find`` prints."""
    return [
        f"valley            {_fmt(result.valley)}",
        f"steepest descent  {_fmt(result.steepest)}",
        f"minimum / 10      {_fmt(result.min_over_10)}",
        f"suggested lr      {_fmt(result.suggested)}   (--model.lr {_fmt(result.suggested)})",
        *([f"plot              {result.plot.resolve()}"] if result.plot else []),
    ]
