"""Linear probes streamed from memory-mapped feature shards, for splits larger than RAM.

A split is given as its shards (2-D arrays, usually the read-only fp16 ``np.memmap`` s of a feature
cache) and one int64 label array; nothing here holds more than one shard (or one chunk) in memory.
The SGD probe is :func:`vision_transfer.evaluation.linear.train_heads` (the one SGD loop) fed by a
stream: standardisation statistics from one float64 pass, minibatches drawn in a seeded shard order
with a seeded permutation inside each shard. At ImageNet-1k scale (1.28M x 1280 fp16, 1000 classes) the
32-head probe peaks at 1.67 GiB resident, 0.93 GiB above the interpreter's own, where loading the
split as float32 would take 6.1 GiB (benchmarks/imagenet_scale.py).
"""

from __future__ import annotations

import itertools
import mmap
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from vision_transfer.errors import DataError, VisionTransferError
from vision_transfer.evaluation.kinds import SINGLE
from vision_transfer.evaluation.linear import (
    DEFAULT_LRS,
    DEFAULT_WDS,
    Minibatch,
    ProbeResult,
    Standardizer,
    choose_head,
    epoch_steps,
    train_heads,
)
from vision_transfer.evaluation.metrics import accuracy, balanced_accuracy, f1_macro, top_k_classes, top_k_hits

# Rows converted to float32 at once when a pass reads a split (16384 x 1280 x 4 B = 84 MB).
CHUNK_ROWS = 16384


class InsufficientMemoryError(VisionTransferError, MemoryError):
    """A full-batch solver whose features would not fit in the memory available."""


# -- reading shards ---------------------------------------------------------------------------
def split_rows(shards: Sequence[np.ndarray], labels: np.ndarray | None = None) -> np.ndarray:
    """Row offsets ``[0, len(s0), len(s0) + len(s1), ...]`` of a split's shards; checks the labels fit."""
    offsets = np.zeros(len(shards) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in shards], out=offsets[1:])
    if any(np.ndim(s) != 2 for s in shards):
        raise DataError("feature shards must be 2-D (rows x features).")
    if len({s.shape[1] for s in shards}) > 1:
        raise DataError(f"feature shards disagree on the feature dimension: {sorted({s.shape[1] for s in shards})}.")
    if labels is not None and len(labels) != offsets[-1]:
        raise DataError(f"{offsets[-1]} feature rows in {len(shards)} shard(s) but {len(labels)} labels.")
    return offsets


def release(shard: np.ndarray) -> None:
    """Drop a memory-mapped shard's pages from this process's resident set (the page cache keeps them).

    Pages read through a mapping stay mapped, and count in RSS, until unmapped; without this a pass
    over a 3.3 GB split would show 3.3 GB resident although none of it is the process's own memory.
    """
    handle = getattr(shard, "_mmap", None)  # np.memmap's underlying mmap.mmap (None for a view or ndarray)
    if isinstance(handle, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        handle.madvise(mmap.MADV_DONTNEED)


def iter_chunks(
    shards: Sequence[np.ndarray], rows: int = CHUNK_ROWS, dtype: type[np.floating] = np.float32
) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, chunk as dtype)`` over a split, at most ``rows`` rows at a time, never across shards."""
    start = 0
    for shard in shards:
        for offset in range(0, len(shard), rows):
            chunk = np.asarray(shard[offset : offset + rows])
            if chunk.dtype == np.float16 and dtype == np.float64:
                chunk = chunk.astype(np.float32)  # exact, and numpy's fp16 -> fp32 path is ~5x its fp16 -> fp64
            yield start + offset, chunk.astype(dtype)  # always a fresh, writable array: callers may work in place
        start += len(shard)
        release(shard)


def take_rows(shards: Sequence[np.ndarray], index: np.ndarray) -> np.ndarray:
    """Float32 rows at global ``index`` (any order) of a split stored as shards."""
    offsets = split_rows(shards)
    out = np.empty((len(index), shards[0].shape[1]), dtype=np.float32)
    owner = np.searchsorted(offsets, index, side="right") - 1
    for s in np.unique(owner):
        where = np.flatnonzero(owner == s)
        local = index[where] - offsets[s]
        order = np.argsort(local)  # ascending reads: sequential pages of the map
        out[where[order]] = shards[s][local[order]]
    return out


def stream_moments(shards: Sequence[np.ndarray], rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation (ddof=1, like ``torch.std``) in one float64 pass.

    A float64 chunk and its two temporaries are ``3 x 8 x rows x D`` bytes (126 MB at 4096 x 1280).
    Chunks are merged with Chan et al.'s (1979) pairwise update, which unlike sum-of-squares does not
    lose precision when a feature's mean is large against its spread.
    """
    count, mean, m2 = 0, None, None
    for _, x in iter_chunks(shards, rows, np.float64):
        n, chunk_mean = len(x), x.mean(0)
        chunk_m2 = ((x - chunk_mean) ** 2).sum(0)
        if mean is None or m2 is None:
            count, mean, m2 = n, chunk_mean, chunk_m2
            continue
        delta = chunk_mean - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + chunk_m2 + delta**2 * (count * n / total)
        count = total
    if mean is None or m2 is None or count < 2:
        raise DataError(f"standardisation needs at least 2 feature rows, got {count}.")
    return mean, np.sqrt(m2 / (count - 1))


# -- the streamed SGD probe ----------------------------------------------------------------------
def minibatches(
    shards: Sequence[np.ndarray],
    labels: np.ndarray,
    batch_size: int,
    shard_rng: np.random.Generator,
    row_generator: torch.Generator,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of ``(fp16 rows, labels)`` batches: shards in a random order, rows permuted inside each.

    One shard is in memory at a time; a shard's last partial batch is completed from the next shard,
    so every batch but the epoch's last has ``batch_size`` rows, as in an in-memory epoch. The shard
    order has its own generator: with a single shard the batches are exactly ``linear.tensor_batches``'.
    """
    offsets = split_rows(shards, labels)
    pending_x: list[np.ndarray] = []
    pending_y: list[np.ndarray] = []
    pending = 0
    for s in shard_rng.permutation(len(shards)):
        block = np.array(shards[s])  # one shard in RAM (its own dtype), then its map's pages are let go
        release(shards[s])
        order = torch.randperm(len(block), generator=row_generator).numpy()
        position = 0
        while position < len(order):
            index = order[position : position + batch_size - pending]
            position += len(index)
            pending_x.append(block[index])
            pending_y.append(labels[offsets[s] + index])
            pending += len(index)
            if pending == batch_size:
                yield np.concatenate(pending_x), np.concatenate(pending_y)
                pending_x, pending_y, pending = [], [], 0
    if pending:
        yield np.concatenate(pending_x), np.concatenate(pending_y)


def shard_batches(
    shards: Sequence[np.ndarray],
    labels: np.ndarray,
    scaler: Standardizer,
    *,
    epochs: int = 10,
    batch_size: int = 1024,
    seed: int = 0,
) -> Iterator[Minibatch]:
    """``epochs`` passes of :func:`minibatches`, standardised by ``scaler``: the streamed counterpart
    of ``linear.tensor_batches`` (the same in-shard generator, so one shard gives its batches)."""
    row_generator = torch.Generator().manual_seed(seed)  # the in-shard order: tensor_batches' generator
    shard_rng = np.random.default_rng([seed, 1])
    for _ in range(epochs):
        for batch, batch_labels in minibatches(shards, labels, batch_size, shard_rng, row_generator):
            yield (
                scaler(torch.from_numpy(batch.astype(np.float32))),
                torch.from_numpy(batch_labels.astype(np.int64)),
                None,
            )


def stream_train_heads(
    shards: Sequence[np.ndarray],
    labels: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    num_classes: int,
    lrs: Sequence[float],
    wds: Sequence[float],
    *,
    epochs: int = 10,
    batch_size: int = 1024,
    seed: int = 0,
    max_steps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear.train_heads`` on features standardised by ``(mean, std)``, streamed from ``shards``.

    ``max_steps`` stops early (for timing); the schedule still spans every epoch.

    Returns:
        weights ``(H, C, D)`` and biases ``(H, C)`` acting on standardised features.
    """
    rows, dim = int(split_rows(shards, labels)[-1]), shards[0].shape[1]
    batches = shard_batches(
        shards, labels, Standardizer.from_moments(mean, std), epochs=epochs, batch_size=batch_size, seed=seed
    )
    steps = epochs * epoch_steps(rows, batch_size)
    if max_steps is not None:
        batches = itertools.islice(batches, max_steps)
    return train_heads(batches, dim, num_classes, lrs, wds, steps=steps)


@torch.no_grad()
def stream_accuracy(
    shards: Sequence[np.ndarray],
    labels: np.ndarray,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
    rows: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 and top-5 accuracy of each head ``(H, C, D)`` / ``(H, C)`` over a streamed split.

    With ``mean``/``std`` the rows are standardised first (heads from :func:`stream_train_heads`).
    """
    split_rows(shards, labels)
    heads, num_classes, _ = weight.shape
    flat_w, flat_b = weight.reshape(heads * num_classes, -1).T.contiguous(), bias.reshape(-1)
    top1 = torch.zeros(heads, dtype=torch.float64)
    top5 = torch.zeros(heads, dtype=torch.float64)
    scaler = None if mean is None or std is None else Standardizer.from_moments(mean, std)
    for start, chunk in iter_chunks(shards, rows):
        x = torch.from_numpy(chunk) if scaler is None else scaler(torch.from_numpy(chunk))
        y = torch.from_numpy(np.asarray(labels[start : start + len(x)], dtype=np.int64))
        logits = (x @ flat_w + flat_b).view(len(x) * heads, num_classes)
        ranked = top_k_classes(logits.numpy(), 5)  # (N * H, 5), metrics' tie rule
        row_labels = y.repeat_interleave(heads).numpy()
        top1 += torch.from_numpy(top_k_hits(ranked[:, :1], row_labels).reshape(len(x), heads).sum(0))
        top5 += torch.from_numpy(top_k_hits(ranked, row_labels).reshape(len(x), heads).sum(0))
    total = max(1, len(labels))
    return (top1 / total).numpy(), (top5 / total).numpy()


STREAMED_TASKS = (SINGLE,)  # the streamed SGD probe: single-label, unweighted


def stream_sgd_probe(
    train: tuple[Sequence[np.ndarray], np.ndarray],
    val: tuple[Sequence[np.ndarray], np.ndarray],
    test: tuple[Sequence[np.ndarray], np.ndarray] | None,
    num_classes: int,
    *,
    lrs: tuple[float, ...] = DEFAULT_LRS,
    wds: tuple[float, ...] = DEFAULT_WDS,
    epochs: int = 10,
    batch_size: int = 1024,
    seed: int = 0,
) -> ProbeResult:
    """``probe.sgd_probe`` on ``(shards, labels)`` splits: sweep ``lrs x wds`` heads on train in one
    streamed run, pick on val, test that train-only head once (no refit: see :mod:`evaluation.linear`).

    Ties on val accuracy go to the smaller weight decay, then the earlier grid entry, as in ``sgd_probe``.
    The returned ``weight``/``bias`` act on raw features.
    """
    start = time.perf_counter()
    grid = [(lr, wd) for lr in lrs for wd in wds]
    mean, std = stream_moments(train[0])
    options = {"epochs": epochs, "batch_size": batch_size, "seed": seed}
    w, b = stream_train_heads(
        train[0], train[1], mean, std, num_classes, [g[0] for g in grid], [g[1] for g in grid], **options
    )
    val_top1, _ = stream_accuracy(val[0], val[1], w, b, mean=mean, std=std)
    sweep = [{"lr": lr, "wd": wd, "val_acc": float(a)} for (lr, wd), a in zip(grid, val_top1, strict=True)]
    chosen_head = choose_head(sweep, "val_acc")
    best = sweep[chosen_head]
    weight, bias = Standardizer.from_moments(mean, std).fold(w[chosen_head], b[chosen_head])  # on raw features
    chosen = {"lr": best["lr"], "wd": best["wd"]}
    result = ProbeResult("sgd-stream", best["val_acc"], None, None, chosen, sweep, 0.0, weight, bias)
    if test is not None:
        split_rows(test[0], test[1])
        top = stream_top_classes(test[0], weight, bias, 5)  # one pass: the top-5 classes of every row
        labels = np.asarray(test[1], dtype=np.int64)
        predictions = top[:, 0]
        result.test_acc, result.test_acc_top5 = accuracy(predictions, labels), float(top_k_hits(top, labels).mean())
        result.balanced_accuracy = balanced_accuracy(predictions, labels)
        result.f1_macro = f1_macro(predictions, labels)
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def stream_top_classes(
    shards: Sequence[np.ndarray], weight: torch.Tensor, bias: torch.Tensor, k: int = 1
) -> np.ndarray:
    """The ``min(k, C)`` highest-scoring classes ``(N, min(k, C))``, best first (ties: the lower index,
    ``evaluation.metrics.top_k_classes``), of every row of a streamed split under one head ``(C, D)`` /
    ``(C,)`` (k int64 a row in memory, never the features)."""
    out = [
        top_k_classes((torch.from_numpy(chunk) @ weight.T + bias).numpy(), k) for _, chunk in iter_chunks(shards, 1024)
    ]
    return np.concatenate(out) if out else np.zeros((0, min(k, len(bias))), dtype=np.int64)


# -- the full-batch path's memory check ---------------------------------------------------------
def available_memory() -> int:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup (container) limit."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    cgroup = Path("/sys/fs/cgroup")
    limit, usage = cgroup / "memory.max", cgroup / "memory.current"
    if limit.is_file() and usage.is_file() and limit.read_text().strip() != "max":
        available = min(available, int(limit.read_text()) - int(usage.read_text()))
    return max(0, available)


def lbfgs_memory_bytes(rows: int, dim: int, num_classes: int = 1000, history: int = 20) -> int:
    """Bytes the full-batch L-BFGS probe needs for ``rows x dim`` features (``probe.lbfgs_probe``).

    The float32 features and their standardised copy (2 x 4 x rows x dim), the logits, softmax and
    its gradient (3 x 4 x rows x classes), and L-BFGS's state: ``history`` (20 in
    ``lbfgs_logistic_regression``) pairs of parameter-sized vectors plus ~4 more.
    """
    parameters = (dim + 1) * num_classes
    return 4 * (2 * rows * dim + 3 * rows * num_classes + (2 * history + 4) * parameters)


def require_fits_in_memory(rows: int, dim: int, available_bytes: int | None = None, *, num_classes: int = 1000) -> int:
    """Raise :class:`InsufficientMemoryError` when the full-batch L-BFGS probe would not fit.

    Args:
        rows: feature rows the solver holds at once (train and val: the sweep scores val as it goes).
        dim: feature dimension.
        available_bytes: memory to fit in; ``None`` reads it from the system (:func:`available_memory`).
        num_classes: classes, for the logits' working memory.

    Returns:
        the bytes needed (:func:`lbfgs_memory_bytes`).
    """
    needed = lbfgs_memory_bytes(rows, dim, num_classes)
    available = available_memory() if available_bytes is None else available_bytes
    if needed > available:
        raise InsufficientMemoryError(
            f"the full-batch L-BFGS probe needs about {_gib(needed)} for {rows:,} x {dim} features "
            f"({_gib(4 * rows * dim)} as float32, plus a standardised copy and working memory), "
            f"but only {_gib(available)} is available; use `--solver sgd`, which streams the features "
            "from the cache a shard at a time."
        )
    return needed


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"
