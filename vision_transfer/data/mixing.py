"""Mixup and CutMix on training batches (timm's ``Mixup``), with soft targets for the loss."""

from __future__ import annotations

import torch


class BatchMixer:
    """Mixes a normalised image batch and turns its labels into soft targets.

    Mixup (Zhang et al. 2018) blends two images and their targets; CutMix (Yun et al. 2019) pastes
    a box of one into the other, targets by area. With both set, each batch uses one of them (50/50).
    Label smoothing is applied to the mixed targets (timm's convention; multi-label targets are
    smoothed towards 0.5). Every batch size is mixed: the batch is mixed with its mirror, so in a
    batch of odd size the middle sample meets itself (its target stays its own, smoothed).

    Args:
        num_classes: classes of the head.
        mixup_alpha: Beta(alpha, alpha) of the mixup ratio; 0 disables mixup.
        cutmix_alpha: Beta(alpha, alpha) of the cut area; 0 disables CutMix.
        prob: probability that a batch is mixed at all.
        label_smoothing: smoothing of the (mixed) targets.
        multilabel: targets are multi-hot rows.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        label_smoothing: float = 0.0,
        multilabel: bool = False,
    ) -> None:
        from timm.data import Mixup

        self.num_classes = num_classes
        self.multilabel = multilabel
        self.mixup = Mixup(
            mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=0.5, mode="batch",
            label_smoothing=label_smoothing, num_classes=num_classes, multi_label=multilabel,
        )  # fmt: skip

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from timm.data.mixup import mixup_target

        # timm's Mixup.__call__ refuses odd batches; its batch-mode mixing (with the mirror) does not need them even
        lam = self.mixup._mix_batch(images)
        target = mixup_target(
            labels.float() if self.multilabel else labels, self.num_classes, lam, self.mixup.label_smoothing,
            self.multilabel,
        )  # fmt: skip
        return images, target
