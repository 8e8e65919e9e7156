"""Training losses of classifier heads: cross-entropy and its variants for imbalanced data; multi-label.

- class weights (``balanced``: n / (C * n_c), scikit-learn's definition);
- logit adjustment (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021): the loss
  sees ``logits + tau * log prior``, so the raw logits learn balanced scores;
- focal loss (Lin et al. 2017), ``(1 - p_t) ** gamma`` down-weighting of easy examples;
- multi-label: binary cross-entropy with logits, or the asymmetric loss of Ridnik et al. 2021
  (timm's implementation).
Targets are class indices, or soft/multi-hot ``(N, C)`` rows (mixup, multi-label).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def balanced_class_weights(counts: torch.Tensor) -> torch.Tensor:
    """``n / (C * n_c)`` per class (a class without samples gets weight 0)."""
    counts = counts.float()
    weights = counts.sum() / (len(counts) * counts.clamp_min(1))
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


def log_prior(counts: torch.Tensor) -> torch.Tensor:
    """Log of the class frequencies (a class without samples counts as half a sample)."""
    counts = counts.float().clamp_min(0.5)
    return (counts / counts.sum()).log()


class CrossEntropyLoss(nn.Module):
    """The training loss of a single-label (softmax) head.

    Args:
        label_smoothing: smoothing of every target, hard or mixed, towards ``1/C`` (also under focal loss).
        class_weight: a weight per class, or None.
        logit_prior: ``tau * log prior`` added to the logits inside the loss (logit adjustment), or None.
        focal_gamma: > 0 uses the focal loss with this gamma.
    """

    class_weight: torch.Tensor | None
    logit_prior: torch.Tensor | None

    def __init__(
        self,
        *,
        label_smoothing: float = 0.0,
        class_weight: torch.Tensor | None = None,
        logit_prior: torch.Tensor | None = None,
        focal_gamma: float = 0.0,
    ) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.focal_gamma = focal_gamma
        self.register_buffer("class_weight", class_weight, persistent=False)
        self.register_buffer("logit_prior", logit_prior, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        eps = self.label_smoothing
        if self.logit_prior is not None:
            logits = logits + self.logit_prior
        hard = target.ndim == 1
        if hard and self.focal_gamma == 0:
            return F.cross_entropy(logits, target, weight=self.class_weight, label_smoothing=eps)
        # one definition for every other case, the same loss as F.cross_entropy's at gamma 0:
        # smoothing towards 1/C on hard and soft (mixed) targets alike, then class weights
        num_classes = logits.shape[1]
        soft = F.one_hot(target, num_classes).float() if hard else target.float()
        soft = soft * (1 - eps) + eps / num_classes
        log_probs = logits.log_softmax(dim=1)
        per_class = -soft * log_probs
        if self.focal_gamma > 0:
            per_class = per_class * (1 - log_probs.exp()).pow(self.focal_gamma)
        if self.class_weight is not None:
            per_class = per_class * self.class_weight
            if hard:  # F.cross_entropy's weighted mean: over the weights of the samples' classes
                return per_class.sum() / self.class_weight[target].sum()
        return per_class.sum(dim=1).mean()


class MultiLabelLoss(nn.Module):
    """The training loss of a multi-label (sigmoid per class) head.

    Args:
        label_smoothing: smoothing of every multi-hot or mixed target towards 0.5 (timm's convention).
        asymmetric: the asymmetric loss (gamma_neg 4, gamma_pos 1, clip 0.05) instead of BCE.
    """

    def __init__(self, *, label_smoothing: float = 0.0, asymmetric: bool = False) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.asymmetric = None
        if asymmetric:
            from timm.loss import AsymmetricLossMultiLabel

            self.asymmetric = AsymmetricLossMultiLabel(gamma_neg=4, gamma_pos=1, clip=0.05)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        target = target.float() * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        if self.asymmetric is not None:
            # timm's ASL sums over the batch ("batchmean" in name only); per sample, as BCE's mean
            return self.asymmetric(logits, target) / len(logits)
        return F.binary_cross_entropy_with_logits(logits, target)
