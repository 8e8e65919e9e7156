"""Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017).

One scalar T divides the logits; it is fitted on held-out (validation) logits by minimising the
negative log-likelihood, which leaves every argmax (so accuracy) unchanged.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

# The calibration metrics live with the others (one definition each); these names stay importable here.
from vision_transfer.evaluation.metrics import ECE_BINS, reliability
from vision_transfer.evaluation.metrics import expected_calibration_error as calibration_error

__all__ = ["ECE_BINS", "calibration_error", "fit_temperature", "reliability"]


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature minimising the NLL of ``softmax(logits / T)`` (L-BFGS on log T)."""
    logits, labels = logits.detach().float().clone(), labels.detach().long().clone()  # inference tensors too
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())
