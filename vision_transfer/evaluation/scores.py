"""EpochScores: a torchmetrics accumulator whose numbers are :mod:`vision_transfer.evaluation.metrics`'.

torchmetrics' own classification metrics define balanced accuracy and mAP differently from
scikit-learn and the probes when a class is absent from the split (a predicted-but-absent class as
recall 0, a column without positives as AP 0); this keeps every logit of the epoch and scores them
once, with the same functions the probes and reports use.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from vision_transfer.evaluation.kinds import TaskKind, task_kind
from vision_transfer.evaluation.metrics import ECE_BINS, MetricInputError


class EpochScores(Metric):
    """Every logit and target of an epoch, scored at ``compute()``.

    ``update(logits, targets)`` takes the logits predictions come from (after any post-hoc logit
    adjustment and temperature, e.g. ``ImageClassifier.prediction_logits``) and class indices
    ``(N,)`` (multi-class) or a 0/1 matrix ``(N, C)`` (multi-label). The states are concatenated
    (``dist_reduce_fx="cat"``), so under DDP ``compute()`` scores the whole epoch, gathered on every
    rank; they hold ``N x C`` float32 logits (50,000 x 1,000: 200 MB).

    ``compute()`` returns 0-d float64 CPU tensors, keyed as the classifier logs them
    (``self.log_dict({f"val/{k}": v for k, v in scores.compute().items()})``):

    - multiclass: ``acc`` (top-1), ``acc_top5`` (top-``min(top_k, C)``), ``balanced_acc``,
      ``f1_macro``, ``ece`` (of ``softmax(logits)``, ``ECE_BINS`` bins) and ``nll``;
    - multilabel: ``map``, ``f1_micro`` and ``f1_macro``, the F1s of ``sigmoid(logits) >= thresholds``.

    With ``per_class=True`` it adds ``confusion_matrix`` ``(C, C)`` int64 and ``recall_per_class``
    ``(C,)`` (multiclass) or ``ap_per_class`` and ``positives`` ``(C,)`` (multilabel); NaN marks a class absent from
    the targets (no recall, no AP). Definitions: :mod:`vision_transfer.evaluation.metrics`.

    Args:
        task: the task kind, or its name (:func:`~vision_transfer.evaluation.kinds.task_kind`).
        num_classes: C.
        thresholds: multilabel per-class probability thresholds ``(C,)`` (default 0.5 each). A buffer:
            it moves with the metric, and ``scores.thresholds.copy_(model.thresholds)`` after a
            calibration makes the next ``compute()`` use the new values.
        top_k: the k of ``acc_top5``.
        per_class: add the per-class arrays above (not loggable as scalars).
        ece_bins: the ECE's equal-width bins.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False
    thresholds: torch.Tensor
    logits: list[torch.Tensor]  # one tensor once synced across processes; dim_zero_cat reads both
    targets: list[torch.Tensor]

    def __init__(
        self,
        task: TaskKind | str,
        num_classes: int,
        thresholds: torch.Tensor | None = None,
        *,
        top_k: int = 5,
        per_class: bool = False,
        ece_bins: int = ECE_BINS,
        **kwargs: Any,
    ) -> None:
        # no cached result: thresholds changed in place must count at the next compute()
        super().__init__(**{"compute_with_cache": False, **kwargs})
        self.kind = task_kind(task)
        if thresholds is not None and tuple(thresholds.shape) != (num_classes,):
            raise MetricInputError(f"thresholds have shape {tuple(thresholds.shape)}, not ({num_classes},).")
        self.num_classes, self.top_k = num_classes, top_k
        self.per_class, self.ece_bins = per_class, ece_bins
        default = torch.full((num_classes,), 0.5) if thresholds is None else thresholds.detach().float().clone()
        self.register_buffer("thresholds", default)
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.logits.append(logits.detach().float())
        self.targets.append(targets.detach())

    def compute(self) -> dict[str, torch.Tensor]:
        # on the CPU once: the metrics are numpy
        logits, targets = dim_zero_cat(self.logits).cpu(), dim_zero_cat(self.targets).cpu()
        out = self.kind.scores(
            logits, targets, self.thresholds.cpu(), top_k=self.top_k, per_class=self.per_class, ece_bins=self.ece_bins
        )
        return {name: torch.as_tensor(np.asarray(value)) for name, value in out.items()}  # floats as float64
