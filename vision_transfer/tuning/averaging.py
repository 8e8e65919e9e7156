"""Weight-space ensembles: interpolate or average the weights of models fine-tuned from one pre-trained
model, and give the result BatchNorm statistics of its own.

WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models") interpolates between the
pre-trained and the fine-tuned weights; model soups (Wortsman et al. 2022, "Model soups") average
several fine-tunes. Both only make sense for models that share an initialisation: their weights then
lie in one basin, where the average of two good models is good too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from vision_transfer.errors import ConfigError, DataError, WeightsError

State = Mapping[str, torch.Tensor]


def interpolate(
    state_a: State, state_b: State, alpha: float, names: Sequence[str] = ("a", "b")
) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * a + alpha * b`` of every floating-point tensor of two state dicts.

    Integer and bool tensors (BatchNorm's ``num_batches_tracked``) are counts, not weights: b's are
    taken. At ``alpha`` 0 and 1 the result is a copy of a's or b's floating-point tensors, bit for bit.

    Args:
        alpha: in [0, 1]; 0 is ``state_a``.
        names: what the two states are called in errors (their files).

    Raises:
        WeightsError: the states differ in keys, shapes or dtypes (the first such key is named).
    """
    if not 0.0 <= alpha <= 1.0:  # also refuses NaN
        raise ConfigError(f"alpha={alpha}: must be in [0, 1] (0: {names[0]}, 1: {names[1]}).")
    return _combine([state_a, state_b], [1.0 - alpha, alpha], names, integers_from=1)


def average(
    states: Sequence[State], weights: Sequence[float] | None = None, names: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """The (weighted) mean of every floating-point tensor of several state dicts.

    Integer and bool tensors are taken from the first state. The mean is accumulated in float64, so the
    average of identical states is that state, bit for bit.

    Args:
        weights: one non-negative weight per state (normalised here); None: uniform.
        names: what the states are called in errors (their files); default ``state 0``, ``state 1``...

    Raises:
        WeightsError: the states differ in keys, shapes or dtypes (the first such key is named).
    """
    if not states:
        raise ConfigError("average: no state dicts given.")
    weights = [1.0] * len(states) if weights is None else [float(w) for w in weights]
    if len(weights) != len(states):
        raise ConfigError(f"average: {len(weights)} weights for {len(states)} state dicts.")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"average: weights {weights} must be finite, non-negative and not all zero.")
    labels = list(names) if names is not None else [f"state {i}" for i in range(len(states))]
    return _combine(states, weights, labels, integers_from=0)


def _combine(
    states: Sequence[State], weights: Sequence[float], names: Sequence[str], integers_from: int
) -> dict[str, torch.Tensor]:
    _check_compatible(states, names)
    total = sum(weights)
    used = [(w, state) for w, state in zip(weights, states, strict=True) if w != 0]
    out: dict[str, torch.Tensor] = {}
    for key, reference in states[0].items():
        if not reference.is_floating_point():
            out[key] = states[integers_from][key].detach().clone()
        elif len(used) == 1:  # an endpoint: the tensor itself, not a rounded product with 1.0
            out[key] = used[0][1][key].detach().clone()
        else:
            mixed = sum(w * state[key].detach().double() for w, state in used)
            out[key] = (mixed / total).to(reference.dtype)  # type: ignore[union-attr]
    return out


def _check_compatible(states: Sequence[State], names: Sequence[str]) -> None:
    """Refuse states that are not the same model, naming the first key that differs."""
    first = states[0]
    for name, state in zip(names[1:], states[1:], strict=True):
        for key in itertools.chain(first, state):
            if key not in state or key not in first:
                has, lacks = (names[0], name) if key in first else (name, names[0])
                raise WeightsError(f"{lacks} has no {key!r}, which {has} has: they are not the same model.")
            a, b = first[key], state[key]
            if a.shape != b.shape or a.dtype != b.dtype:
                raise WeightsError(
                    f"{key!r} is {a.dtype} {tuple(a.shape)} in {names[0]}, {b.dtype} {tuple(b.shape)} in {name}: "
                    "they are not the same model."
                )


def batch_norms(module: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``module`` that keep running statistics (timm's ``BatchNormAct2d`` included)."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def has_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` has a BatchNorm layer with running statistics (ViTs, ConvNeXts: no)."""
    return bool(batch_norms(module))


def recompute_bn_statistics(model: nn.Module, loader: Iterable[Any], batches: int) -> int:
    """Replace every BatchNorm's running statistics with their average over ``batches`` batches.

    Averaged weights have no statistics of their own: the average of two models' running means is not
    the mean of the averaged model's activations. Only the BatchNorm layers run in train mode; dropout,
    drop path and everything else stay in eval mode, whose noise would otherwise shift the statistics.
    With ``momentum=None`` the running statistics are the cumulative average over the batches (an
    exponential average would weigh the last ones most). Nothing is trained (no gradients); every
    module's mode and every momentum are restored.

    Args:
        model: called as ``model(inputs)``.
        loader: batches of inputs: tensors, or sequences whose first item is the input; moved to the
            model's device.
        batches: how many batches at most (fewer when the loader ends first).

    Returns:
        The batches run; 0 when the model has no BatchNorm (nothing is changed).
    """
    norms = batch_norms(model)
    if not norms:
        return 0
    if batches < 1:
        raise ConfigError(f"batches={batches}: BatchNorm statistics need at least one batch.")
    items = iter(loader)
    first = next(items, None)
    if first is None:  # checked before the statistics are reset, so a failure changes nothing
        raise DataError("no batch to recompute the BatchNorm statistics on: the loader is empty.")
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    seen = 0
    try:
        for module in model.modules():
            module.training = False  # not model.eval(): a model's train() may set modes of its own
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.training = True
        with torch.no_grad():
            for batch in itertools.islice(itertools.chain([first], items), batches):
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(inputs.to(device))
                seen += 1
    finally:
        for norm, momentum in momenta.items():
            norm.momentum = momentum
        for module, training in modes.items():
            module.training = training
    return seen
