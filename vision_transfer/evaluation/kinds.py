"""The task kind: single-label (a softmax, one class per image) or multi-label (a sigmoid per class).

Everything that differs between the two lives here, once: the activation, the decision rule, the
training loss, the scores and the metric that picks the best checkpoint, what calibration fits
(a temperature, or a threshold per class), the prediction settings saved with a model and the
prediction rows. Every other module asks the kind (``task_kind(name)`` or ``kind_of_labels``)
instead of branching on the name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import vision_transfer.evaluation.metrics as metrics
from vision_transfer.errors import ConfigError, DataError
from vision_transfer.evaluation.metrics import ECE_BINS
from vision_transfer.inference.calibration import fit_temperature, nll, view_log_probs
from vision_transfer.inference.thresholds import best_f1_thresholds
from vision_transfer.losses import CrossEntropyLoss, MultiLabelLoss

TaskName = Literal["multiclass", "multilabel"]
SINGLE: TaskName = "multiclass"
MULTI: TaskName = "multilabel"
TASK_NAMES: tuple[TaskName, ...] = (SINGLE, MULTI)
TaskOption = Literal["auto", "multiclass", "multilabel"]  # "auto": the data's kind


class TaskKind:
    """What a task kind decides; :class:`SingleLabel` and :class:`MultiLabel` implement it."""

    name: ClassVar[TaskName]
    multilabel: ClassVar[bool]
    metric: ClassVar[str]  # the validation score that chooses checkpoints, C and learning rates
    default_label_smoothing: ClassVar[float]
    score_keys: ClassVar[tuple[str, ...]]  # the scalar scores, in report order
    grid_columns: ClassVar[dict[str, str]]  # a benchmark grid row's score column -> its score key
    loss_options: ClassVar[tuple[str, ...]]  # the loss options this kind uses (the others are refused)
    headline: ClassVar[tuple[str, str]]  # the two test scores a one-line summary shows
    example: ClassVar[str]  # what a class needs in the training split to be learnt
    activation: ClassVar[str]  # in words, for exported configs
    label_column: ClassVar[str]  # the CSV column the data readers take this kind's labels from
    card: ClassVar[dict[str, Any]]  # a model card's kind-specific words: title, output, Hub metrics, code
    cleanlab_package: ClassVar[str]  # where cleanlab keeps this kind's label-issue functions

    # -- inspection, distillation and model cards ----------------------------------------------------------
    def rank_label_issues(self, labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cleanlab's likely label errors from out-of-fold ``probabilities`` (indices, most doubtful first)
        and every sample's label quality (self-confidence), by this kind's cleanlab functions."""
        import importlib

        find = importlib.import_module(f"{self.cleanlab_package}.filter").find_label_issues
        score = importlib.import_module(f"{self.cleanlab_package}.rank").get_label_quality_scores
        given = self.cleanlab_labels(labels)
        flagged = find(given, probabilities, return_indices_ranked_by="self_confidence")
        return np.asarray(flagged), np.asarray(score(given, probabilities, method="self_confidence"))

    def cleanlab_labels(self, labels: np.ndarray) -> Any:
        """The given labels as cleanlab takes them: class indices, or a list of each sample's classes."""
        raise NotImplementedError

    def distillation_loss(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        """Hinton's term on this kind's softened outputs (softmax, or a sigmoid per class), scaled by T^2."""
        raise NotImplementedError

    def card_scores(
        self, logits: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor
    ) -> tuple[dict[str, float], np.ndarray, str]:
        """A model card's headline scores of final logits, a per-class score (NaN: no example) and its name."""
        raise NotImplementedError

    @property
    def monitor(self) -> str:
        """The logged validation metric that picks the best checkpoint and drives the plateau scheduler."""
        return f"val/{self.metric}"

    def __repr__(self) -> str:
        return f"task_kind({self.name!r})"

    # -- from logits to predictions -----------------------------------------------------------
    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mean_probability_logits(self, view_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits whose probabilities are the mean of the views' (test-time augmentation)."""
        raise NotImplementedError

    def decide(self, probs: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        """Predicted classes: ``(N,)`` indices (single-label) or an ``(N, C)`` bool matrix (multi-label)."""
        raise NotImplementedError

    def class_lists(self, labels: torch.Tensor) -> list[list[int]]:
        """Each row's classes, from targets or :meth:`decide`'s output."""
        raise NotImplementedError

    def targets(self, labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(N, C)`` target matrix: one-hot rows, or the multi-hot rows as they are."""
        raise NotImplementedError

    # -- training -----------------------------------------------------------------------------
    def check_loss_options(self, **options: Any) -> None:
        """Refuse a loss option set away from its default that this kind would ignore."""
        other = task_kind(MULTI if self.name == SINGLE else SINGLE)
        used = [
            f"{k}={v!r}"
            for k, v in options.items()
            if k in other.loss_options and v not in (None, 0, 0.0, False, "none")
        ]
        if used:
            raise ConfigError(
                f"{', '.join(used)}: for {other.name} heads; this head is {self.name} "
                f"(its options: {', '.join(self.loss_options)})."
            )

    def loss(self, label_smoothing: float, **options: Any) -> nn.Module:
        raise NotImplementedError

    def sample_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each sample's unsmoothed loss (the report's worst images)."""
        raise NotImplementedError

    def train_scores(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cheap per-batch training scores on the hard labels."""
        return {}

    def logistic_terms(
        self, logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact probe's loss entries and their gradient in the logits (predicted minus true)."""
        raise NotImplementedError

    def entry_weights(self, sample_weight: torch.Tensor) -> torch.Tensor:
        """Per-sample ``(N,)`` or per-entry ``(N, C)`` weights, shaped to scale :meth:`logistic_terms`."""
        raise NotImplementedError

    def weight_total(self, sample_weight: torch.Tensor, num_classes: int) -> float:
        """Sum of weights per sample: N for unweighted and for balanced weights alike, as in scikit-learn."""
        raise NotImplementedError

    # -- scores -------------------------------------------------------------------------------
    def scores(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        thresholds: torch.Tensor | None = None,
        *,
        top_k: int = 5,
        per_class: bool = False,
        ece_bins: int = ECE_BINS,
    ) -> dict[str, Any]:
        """The scores of prediction logits against targets (definitions: :mod:`~vision_transfer.evaluation.metrics`)."""
        raise NotImplementedError

    def selection_scores(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """The scores a probe's sweep records per setting (the first, :attr:`metric`, chooses)."""
        raise NotImplementedError

    def probe_test_scores(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """A probe's test scores, keyed as :class:`~vision_transfer.evaluation.linear.ProbeResult` fields."""
        raise NotImplementedError

    # -- labels -------------------------------------------------------------------------------
    def require_top1(self, what: str) -> None:
        """ConfigError when ``what`` (which scores top-1 accuracy) cannot apply to this kind."""

    def check_labels(self, labels: torch.Tensor, num_classes: int, where: str) -> None:
        """DataError for labels of this kind that are malformed (``where`` names them)."""
        raise NotImplementedError

    def unlearnable_classes(self, labels: torch.Tensor, num_classes: int, needs_every_class: bool) -> str | None:
        """Why some classes of these training labels cannot be learnt, or None."""
        raise NotImplementedError

    # -- calibration --------------------------------------------------------------------------
    def calibrate(
        self, logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Fit on held-out ``(N, C)`` or ``(views, N, C)`` prediction logits (views: their test-time
        augmentation average, as predictions use): (the model buffers to set, a JSON-able report)."""
        raise NotImplementedError

    def calibration_line(self, report: dict[str, Any]) -> str:
        raise NotImplementedError

    def prediction_settings(self, temperature: torch.Tensor, thresholds: torch.Tensor) -> dict[str, Any]:
        """What turns logits into predictions besides the logit shift and TTA (checkpoint, export)."""
        raise NotImplementedError

    def timm_config(self, prediction: dict[str, Any]) -> dict[str, Any]:
        """The fields of an exported timm ``config.json`` that tell how to read the logits."""
        return {"multi_label": self.multilabel}

    # -- prediction rows ----------------------------------------------------------------------
    def ranked(
        self, probs: torch.Tensor, class_names: Sequence[str], thresholds: torch.Tensor, top_k: int
    ) -> list[list[tuple[str, float]]]:
        """Per row, ``(class name, probability)`` pairs, most probable first: the top k (single-label),
        or every class at or above its threshold (multi-label)."""
        raise NotImplementedError

    def csv_header(self, num_classes: int, top_k: int, calibrated: bool) -> list[str]:
        raise NotImplementedError

    def csv_rows(
        self,
        paths: Sequence[str],
        probs: torch.Tensor,
        class_names: Sequence[str],
        thresholds: torch.Tensor,
        top_k: int,
    ) -> list[list[Any]]:
        raise NotImplementedError


class SingleLabel(TaskKind):
    """One class per image: softmax, argmax, cross-entropy, a fitted temperature."""

    name = SINGLE
    multilabel = False
    metric = "acc"
    default_label_smoothing = 0.1
    score_keys = ("acc", "acc_top5", "balanced_acc", "f1_macro", "ece", "nll")
    grid_columns: ClassVar[dict[str, str]] = {
        "top1": "acc",
        "top5": "acc_top5",
        "balanced_acc": "balanced_acc",
        "f1_macro": "f1_macro",
    }
    loss_options = ("class_weighting", "focal_gamma", "logit_adjustment")
    headline = ("acc", "acc_top5")
    example = "sample"
    activation = "softmax"
    label_column = "label"
    cleanlab_package = "cleanlab"
    card: ClassVar[dict[str, Any]] = {"title": "", "output": "softmax", "scope": "", "metrics": ["accuracy", "f1"],
            "probabilities": "logits.softmax(-1)", "pipeline": "softmax"}  # fmt: skip

    def cleanlab_labels(self, labels: np.ndarray) -> Any:
        return labels

    def distillation_loss(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        from vision_transfer.losses.distillation import softmax_distillation

        return softmax_distillation(student, teacher, temperature)

    def card_scores(
        self, logits: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor
    ) -> tuple[dict[str, float], np.ndarray, str]:
        predictions = logits.argmax(1)
        headline = {"top-1": metrics.top_k_accuracy(logits, labels), "macro-F1": metrics.f1_macro(predictions, labels),
                    "balanced accuracy": metrics.balanced_accuracy(predictions, labels)}  # fmt: skip
        recall = [float((predictions[labels == c] == c).float().mean()) if bool((labels == c).any()) else np.nan
                  for c in range(logits.shape[1])]  # fmt: skip
        return {k: float(v) for k, v in headline.items()}, np.array(recall), "recall"

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=-1)

    def mean_probability_logits(self, view_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        probs = torch.stack([v.softmax(dim=1) for v in view_logits]).mean(0)
        return probs.clamp_min(1e-12).log()  # softmax of this is the mean probability

    def decide(self, probs: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        return probs.argmax(dim=1)  # ties to the lower index, as metrics.top_k_classes

    def class_lists(self, labels: torch.Tensor) -> list[list[int]]:
        return [[int(c)] for c in labels.tolist()]

    def targets(self, labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return F.one_hot(labels.long(), num_classes).to(dtype)

    def loss(self, label_smoothing: float, **options: Any) -> nn.Module:
        return CrossEntropyLoss(
            label_smoothing=label_smoothing,
            class_weight=options.get("class_weight"),
            logit_prior=options.get("logit_prior"),
            focal_gamma=options.get("focal_gamma", 0.0),
        )

    def sample_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, reduction="none")

    def train_scores(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"acc": (logits.argmax(1) == labels).float().mean()}

    def logistic_terms(
        self, logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        log_p = logits.log_softmax(1)
        return -log_p.gather(1, labels[:, None]), log_p.exp() - targets

    def entry_weights(self, sample_weight: torch.Tensor) -> torch.Tensor:
        return sample_weight[:, None]

    def weight_total(self, sample_weight: torch.Tensor, num_classes: int) -> float:
        return float(sample_weight.sum())

    def scores(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        thresholds: torch.Tensor | None = None,
        *,
        top_k: int = 5,
        per_class: bool = False,
        ece_bins: int = ECE_BINS,
    ) -> dict[str, Any]:
        logits = logits.float()
        predictions = self.decide(logits, torch.empty(0))
        out: dict[str, Any] = {
            "acc": metrics.top_k_accuracy(logits, targets, 1),
            "acc_top5": metrics.top_k_accuracy(logits, targets, top_k),
            "balanced_acc": metrics.balanced_accuracy(predictions, targets),
            "f1_macro": metrics.f1_macro(predictions, targets),
            "ece": metrics.expected_calibration_error(logits.softmax(1), targets, ece_bins),
            "nll": metrics.nll(logits, targets),
        }
        if per_class:
            num_classes = logits.shape[1]
            out["confusion_matrix"] = metrics.confusion_matrix(predictions, targets, num_classes)
            out["recall_per_class"] = metrics.per_class_recall(predictions, targets, num_classes)
        return out

    def selection_scores(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return {"acc": metrics.top_k_accuracy(logits, labels)}

    def probe_test_scores(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        predictions = logits.argmax(1)  # the first maximum: top_k_accuracy's tie rule
        return {
            "test_acc": metrics.top_k_accuracy(logits, labels),
            "test_acc_top5": metrics.top_k_accuracy(logits, labels, 5),
            "balanced_accuracy": metrics.balanced_accuracy(predictions, labels),
            "f1_macro": metrics.f1_macro(predictions, labels),
        }

    def check_labels(self, labels: torch.Tensor, num_classes: int, where: str) -> None:
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise DataError(
                f"{where} labels must lie in [0, {num_classes}); found {int(labels.min())}..{int(labels.max())}."
            )

    def unlearnable_classes(self, labels: torch.Tensor, num_classes: int, needs_every_class: bool) -> str | None:
        missing = torch.nonzero(torch.bincount(labels, minlength=num_classes) == 0).flatten().tolist()
        if needs_every_class and missing:
            return f"class(es) {missing} have no training example; the L-BFGS probe needs every class"
        return None

    def calibrate(
        self, logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        temperature = fit_temperature(logits, labels)
        before, after = view_log_probs(logits).exp(), view_log_probs(logits, temperature).exp()
        return {"temperature": torch.tensor(temperature)}, {
            "task": self.name,
            "temperature": temperature,
            "nll_before": nll(logits, labels),
            "nll_after": nll(logits, labels, temperature),
            "ece_before": metrics.expected_calibration_error(before, labels),
            "ece_after": metrics.expected_calibration_error(after, labels),
            "reliability_before": metrics.reliability(before, labels),
            "reliability_after": metrics.reliability(after, labels),
        }

    def calibration_line(self, report: dict[str, Any]) -> str:
        return (
            f"calibrated on val: temperature {report['temperature']:.3f}, NLL {report['nll_before']:.4f} -> "
            f"{report['nll_after']:.4f}, ECE {report['ece_before']:.4f} -> {report['ece_after']:.4f}"
        )

    def prediction_settings(self, temperature: torch.Tensor, thresholds: torch.Tensor) -> dict[str, Any]:
        return {"temperature": float(temperature)}

    def ranked(
        self, probs: torch.Tensor, class_names: Sequence[str], thresholds: torch.Tensor, top_k: int
    ) -> list[list[tuple[str, float]]]:
        values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
        return [
            [(class_names[i], float(v)) for v, i in zip(row_v, row_i, strict=True)]
            for row_v, row_i in zip(values.tolist(), indices.tolist(), strict=True)
        ]

    def csv_header(self, num_classes: int, top_k: int, calibrated: bool) -> list[str]:
        prob = "calibrated_prob" if calibrated else "prob"
        k = min(top_k, num_classes or top_k)
        return ["path"] + [f"{kind}_{i}" for i in range(1, k + 1) for kind in ("label", prob)]

    def csv_rows(
        self,
        paths: Sequence[str],
        probs: torch.Tensor,
        class_names: Sequence[str],
        thresholds: torch.Tensor,
        top_k: int,
    ) -> list[list[Any]]:
        top, classes = torch.topk(probs.float(), min(top_k, probs.shape[1]), dim=1)
        rows = []
        for path, p_row, c_row in zip(paths, top.tolist(), classes.tolist(), strict=True):
            cells: list[Any] = [path]
            for p, c in zip(p_row, c_row, strict=True):
                cells += [class_names[c] if c < len(class_names) else c, f"{p:.5f}"]
            rows.append(cells)
        return rows


class MultiLabel(TaskKind):
    """Any number of classes per image: a sigmoid per class, a threshold per class, binary cross-entropy."""

    name = MULTI
    multilabel = True
    metric = "map"
    default_label_smoothing = 0.0
    score_keys = ("map", "f1_micro", "f1_macro")
    grid_columns: ClassVar[dict[str, str]] = {
        "map": "map",
        "f1_micro": "f1_micro",
        "f1_macro": "f1_macro",
    }  # never an accuracy
    loss_options = ("asymmetric_loss",)
    headline = ("map", "f1_micro")
    example = "positive example"
    activation = "a sigmoid per class, positive at or above its threshold"
    label_column = "labels"
    cleanlab_package = "cleanlab.multilabel_classification"
    card: ClassVar[dict[str, Any]] = {"title": "multi-label ", "output": "sigmoid per class, then per-class thresholds",
            "scope": " (several at once)", "metrics": ["mean_average_precision"],
            "probabilities": "torch.sigmoid(logits)", "pipeline": "sigmoid"}  # fmt: skip

    def cleanlab_labels(self, labels: np.ndarray) -> Any:
        return [np.flatnonzero(row).tolist() for row in labels]

    def distillation_loss(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        from vision_transfer.losses.distillation import sigmoid_distillation

        return sigmoid_distillation(student, teacher, temperature)

    def card_scores(
        self, logits: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor
    ) -> tuple[dict[str, float], np.ndarray, str]:
        headline = {"mAP": metrics.mean_average_precision(logits, labels),
                    "micro-F1": metrics.f1_micro(self.decide(logits.sigmoid(), thresholds), labels)}  # fmt: skip
        return {k: float(v) for k, v in headline.items()}, np.asarray(
            metrics.average_precision_per_class(logits, labels), dtype=float), "average precision"  # fmt: skip

    def require_top1(self, what: str) -> None:
        raise ConfigError(f"{what} measures top-1 accuracy, which a multi-label model does not have.")

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid()

    def mean_probability_logits(self, view_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        probs = torch.stack([v.sigmoid() for v in view_logits]).mean(0).clamp(1e-7, 1 - 1e-7)
        return probs.log() - (1 - probs).log()  # sigmoid of this is the mean probability

    def decide(self, probs: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        return probs >= thresholds.to(probs.device)

    def class_lists(self, labels: torch.Tensor) -> list[list[int]]:
        return [row.nonzero().flatten().tolist() for row in labels]

    def targets(self, labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return labels.to(dtype)

    def loss(self, label_smoothing: float, **options: Any) -> nn.Module:
        return MultiLabelLoss(label_smoothing=label_smoothing, asymmetric=options.get("asymmetric", False))

    def sample_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none").sum(1)

    def logistic_terms(
        self, logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # binary cross-entropy softplus(z) - t * z; softplus written out: F.softplus returns z itself
        # above 20, 2e-9 off, which misleads the line search
        losses = logits.clamp_min(0) + torch.log1p(torch.exp(-logits.abs())) - targets * logits
        return losses, torch.sigmoid(logits) - targets

    def entry_weights(self, sample_weight: torch.Tensor) -> torch.Tensor:
        return sample_weight

    def weight_total(self, sample_weight: torch.Tensor, num_classes: int) -> float:
        return float(sample_weight.sum()) / num_classes

    def scores(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        thresholds: torch.Tensor | None = None,
        *,
        top_k: int = 5,
        per_class: bool = False,
        ece_bins: int = ECE_BINS,
    ) -> dict[str, Any]:
        logits = logits.float()
        if thresholds is None:
            thresholds = torch.full((logits.shape[1],), 0.5)
        predicted = self.decide(logits.sigmoid(), thresholds.float().cpu())  # float32 sigmoid, as predict
        out: dict[str, Any] = {
            "map": metrics.mean_average_precision(logits, targets),
            "f1_micro": metrics.f1_micro(predicted, targets),
            "f1_macro": metrics.f1_macro(predicted, targets),
        }
        if per_class:
            out["ap_per_class"] = metrics.average_precision_per_class(logits, targets)
            out["positives"] = np.asarray(targets.sum(0))
        return out

    def selection_scores(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return {"map": metrics.mean_average_precision(logits, labels), "f1_micro": metrics.f1_micro(logits > 0, labels)}

    def probe_test_scores(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        per_class = metrics.average_precision_per_class(logits, labels)
        return {
            "test_map": metrics.mean_average_precision(logits, labels),
            "test_ap_per_class": [None if np.isnan(ap) else float(ap) for ap in per_class],
            "test_f1_micro": metrics.f1_micro(logits > 0, labels),
        }

    def check_labels(self, labels: torch.Tensor, num_classes: int, where: str) -> None:
        if labels.shape[1] != num_classes:
            raise DataError(f"{where} label matrix has {labels.shape[1]} columns for {num_classes} classes.")
        if len(labels) and not bool(((labels == 0) | (labels == 1)).all()):
            raise DataError(f"{where} multi-label targets must be 0 or 1.")

    def unlearnable_classes(self, labels: torch.Tensor, num_classes: int, needs_every_class: bool) -> str | None:
        positives = labels.sum(0)
        missing = torch.nonzero((positives == 0) | (positives == len(labels))).flatten().tolist()
        if missing:
            return (
                f"multi-label class(es) {missing} have no positive or no negative training example, "
                "so no probe can learn them; drop those columns"
            )
        return None

    def calibrate(
        self, logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        probs = self.probabilities(self.mean_probability_logits(list(logits)) if logits.ndim == 3 else logits)
        thresholds, no_positive = best_f1_thresholds(probs, labels)
        return {"thresholds": thresholds}, {
            "task": self.name,
            "thresholds": [round(float(t), 4) for t in thresholds],
            "classes_without_val_positive": [class_names[c] for c in no_positive if c < len(class_names)],
            "f1_micro_at_0.5": metrics.f1_micro(probs >= 0.5, labels),
            "f1_micro_tuned": metrics.f1_micro(probs >= thresholds, labels),
        }

    def calibration_line(self, report: dict[str, Any]) -> str:
        return (
            f"per-class thresholds tuned on val: micro-F1 {report['f1_micro_at_0.5']:.4f} at 0.5 -> "
            f"{report['f1_micro_tuned']:.4f}"
        )

    def prediction_settings(self, temperature: torch.Tensor, thresholds: torch.Tensor) -> dict[str, Any]:
        # per-class thresholds instead of a temperature
        return {"thresholds": [round(float(t), 6) for t in thresholds], "temperature": None}

    def ranked(
        self, probs: torch.Tensor, class_names: Sequence[str], thresholds: torch.Tensor, top_k: int
    ) -> list[list[tuple[str, float]]]:
        above = self.class_lists(self.decide(probs, thresholds))
        return [
            sorted(((class_names[c], float(row[c])) for c in classes), key=lambda pair: -pair[1])
            for row, classes in zip(probs, above, strict=True)
        ]

    def timm_config(self, prediction: dict[str, Any]) -> dict[str, Any]:
        return {"multi_label": True, "thresholds": prediction.get("thresholds")}

    def csv_header(self, num_classes: int, top_k: int, calibrated: bool) -> list[str]:
        return ["path", "labels", "probabilities", "all_probabilities"]

    def csv_rows(
        self,
        paths: Sequence[str],
        probs: torch.Tensor,
        class_names: Sequence[str],
        thresholds: torch.Tensor,
        top_k: int,
    ) -> list[list[Any]]:
        probs = probs.float().cpu()
        rows = []
        for path, row, above in zip(paths, probs, self.class_lists(self.decide(probs, thresholds.cpu())), strict=True):
            rows.append(
                [
                    path,
                    ";".join(class_names[c] for c in above),
                    ";".join(f"{float(row[c]):.5f}" for c in above),
                    ";".join(f"{float(v):.5f}" for v in row),
                ]
            )
        return rows


_KINDS: dict[str, TaskKind] = {SINGLE: SingleLabel(), MULTI: MultiLabel()}


def task_kind(name: str | TaskKind) -> TaskKind:
    """The kind named ``multiclass`` or ``multilabel`` (a kind is returned as it is)."""
    if isinstance(name, TaskKind):
        return name
    if name not in _KINDS:
        raise ConfigError(f"task={name!r}: use one of {', '.join(TASK_NAMES)}.")
    return _KINDS[name]


def kind_of_labels(labels: torch.Tensor | np.ndarray) -> TaskKind:
    """Multi-label for an ``(N, C)`` label matrix, single-label for a vector of class indices."""
    return _KINDS[MULTI if labels.ndim == 2 else SINGLE]


def kind_of_flag(multilabel: bool) -> TaskKind:
    return _KINDS[MULTI if multilabel else SINGLE]


__all__ = [
    "MULTI",
    "SINGLE",
    "TASK_NAMES",
    "MultiLabel",
    "SingleLabel",
    "TaskKind",
    "TaskName",
    "TaskOption",
    "kind_of_flag",
    "kind_of_labels",
    "task_kind",
]  # fmt: skip
