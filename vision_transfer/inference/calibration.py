"""Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017).

One scalar T divides the logits; it is fitted on held-out (validation) logits by minimising the
negative log-likelihood, which leaves every argmax (so accuracy) unchanged.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

__all__ = ["fit_temperature", "nll", "view_log_probs"]


def view_log_probs(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Log of the probabilities predictions use: ``softmax(logits / T)``, or for ``(views, N, C)``
    logits (test-time augmentation) the log of the views' mean probability, as
    :class:`~vision_transfer.inference.PredictionHead` computes it."""
    views = logits.float() if logits.ndim == 3 else logits.float()[None]
    return (views / temperature).log_softmax(dim=-1).logsumexp(dim=0) - math.log(len(views))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature minimising the NLL of the predicted probabilities (L-BFGS on log T).

    ``logits`` are ``(N, C)``, or ``(views, N, C)`` under test-time augmentation: the temperature
    divides each view's logits before their probabilities are averaged, so it is fitted on that average."""
    logits, labels = logits.detach().float().clone(), labels.detach().long().clone()  # inference tensors too
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.nll_loss(view_log_probs(logits, log_t.exp()), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Negative log-likelihood of ``(N, C)`` or ``(views, N, C)`` logits at this temperature."""
    return float(F.nll_loss(view_log_probs(logits, temperature), labels.long()))
