"""Weighted k-nearest-neighbour evaluation of frozen features (DINO, Caron et al. 2021).

Features are L2-normalised and compared by cosine similarity; each of a query's k nearest training
samples votes for its class with weight ``exp(sim / T)``. k is chosen on val (training samples as
the memory), then the test split is scored once against train+val (the k-NN counterpart of the
linear probe's refit). Similarities are computed one query chunk x one memory chunk at a time
against the (memory-mapped) shards, keeping a running top-k, so memory is bounded by the chunk
sizes, not the split: a few chunk-sized arrays (0.65 GiB above the interpreter's own with the
defaults in float64, measured against 1.28M x 1280 rows by benchmarks/imagenet_scale.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.nn import functional as F

from vision_transfer.errors import ConfigError, DataError
from vision_transfer.evaluation.metrics import accuracy, balanced_accuracy, top_k_classes, top_k_hits
from vision_transfer.evaluation.stream import iter_chunks, split_rows

# DINO's eval_knn.py: --nb_knn 10 20 100 200, --temperature 0.07; 50 fills the gap between 20 and 100.
KNN_KS = (10, 20, 50, 100, 200)
DINO_TEMPERATURE = 0.07


@dataclass
class KnnResult:
    """The chosen k and the test split's scores; ``val`` holds every k's val scores."""

    k: int
    temperature: float
    val: dict[int, dict[str, float]]
    test_top1: float
    test_top5: float
    test_balanced: float
    memory: str  # what the test queries searched
    seconds: float

    def summary(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def nearest_neighbours(
    queries: Sequence[np.ndarray],
    memory: Sequence[np.ndarray],
    k: int,
    *,
    query_chunk: int = 1024,
    memory_chunk: int = 16384,
    dtype: torch.dtype = torch.float64,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most cosine-similar memory rows of every query row.

    Args:
        queries: the query split's shards (rows x D).
        memory: the memory split's shards, read ``memory_chunk`` rows at a time per query chunk.
        k: neighbours per query (at most the memory's rows).
        query_chunk: query rows compared at once.
        memory_chunk: memory rows normalised and compared at once.
        dtype: the similarities' precision. float64 (default) makes the neighbours independent of
            the chunk sizes: float32 dot products round differently with the block shapes, and
            near-ties are common (162 gaps under 1e-6 among 500 x 200 Fashion-MNIST neighbours).
            float32 is 1.8x as fast (benchmarks/imagenet_scale.py).
        limit: only the first ``limit`` query rows (for timing a fraction of a large split).

    Returns:
        similarities ``(Q, k)`` in descending order (equal ones by ascending memory row), and the
        neighbours' global memory row indices ``(Q, k)`` int64.
    """
    queries_total, memory_total = int(split_rows(queries)[-1]), int(split_rows(memory)[-1])
    if not 1 <= k <= memory_total:
        raise DataError(f"k={k} nearest neighbours asked of a memory of {memory_total} rows.")
    total = queries_total if limit is None else min(limit, queries_total)
    sims = np.empty((total, k), dtype=np.float64)
    index = np.empty((total, k), dtype=np.int64)
    for q_start, q_rows in iter_chunks(queries, query_chunk):
        if q_start >= total:
            break
        q = F.normalize(torch.from_numpy(q_rows[: total - q_start]).to(dtype), dim=1)
        best = torch.full((len(q), 0), -torch.inf, dtype=dtype)
        best_index = torch.full((len(q), 0), -1, dtype=torch.int64)
        for m_start, m_rows in iter_chunks(memory, memory_chunk):
            m = torch.from_numpy(m_rows).to(dtype)
            m /= m.norm(dim=1, keepdim=True).clamp_min(1e-12)  # F.normalize's eps, in place: one chunk-sized copy less
            similarity = q @ m.T
            top = similarity.topk(min(k, len(m_rows)), dim=1)  # the chunk's best, then merged with the running best
            best, best_index = _merge(
                torch.cat([best, top.values], 1), torch.cat([best_index, top.indices + m_start], 1), k
            )
        sims[q_start : q_start + len(q)] = best.numpy()
        index[q_start : q_start + len(q)] = best_index.numpy()
    return sims, index


def _merge(values: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest values per row, equal values by ascending index (two stable sorts)."""
    by_index = index.argsort(dim=1, stable=True)
    values, index = values.gather(1, by_index), index.gather(1, by_index)
    by_value = values.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, by_value), index.gather(1, by_value)


def knn_votes(
    similarities: np.ndarray, neighbour_labels: np.ndarray, num_classes: int, temperature: float = DINO_TEMPERATURE
) -> np.ndarray:
    """Class scores ``(Q, C)``: each neighbour adds ``exp(sim / T)`` to its class (DINO's weighting)."""
    weights = np.exp(similarities.astype(np.float64) / temperature)
    votes = np.zeros((len(similarities), num_classes), dtype=np.float64)
    np.add.at(votes, (np.arange(len(similarities))[:, None], neighbour_labels), weights)
    return votes


def knn_scores(
    similarities: np.ndarray,
    neighbour_labels: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    temperature: float = DINO_TEMPERATURE,
    rows: int = 4096,
) -> dict[str, float]:
    """Top-1, top-5 and balanced accuracy (mean per-class recall over the classes present) of the votes.

    Votes are formed ``rows`` queries at a time (50k x 1000 classes would be 400 MB at once). A class
    counts in the top 5 only if some neighbour voted for it: with fewer than 5 classes among the
    neighbours, DINO's sort fills the rest with unvoted classes in arbitrary order (a lottery).
    Ties between class scores go to the lower class index.
    """
    predictions = np.zeros(len(labels), dtype=np.int64)
    hit5 = np.zeros(len(labels), dtype=bool)
    for start in range(0, len(labels), rows):
        part = slice(start, start + rows)
        votes = knn_votes(similarities[part], neighbour_labels[part], num_classes, temperature)
        ranked = top_k_classes(votes, 5)
        predictions[part] = ranked[:, 0]
        voted = np.take_along_axis(votes, labels[part, None], 1)[:, 0] > 0  # the true class had a vote
        hit5[part] = top_k_hits(ranked, labels[part]) & voted
    return {
        "top1": accuracy(predictions, labels),
        "top5": float(hit5.mean()),
        "balanced": balanced_accuracy(predictions, labels),
    }


def knn_evaluate(
    train: tuple[Sequence[np.ndarray], np.ndarray],
    val: tuple[Sequence[np.ndarray], np.ndarray],
    test: tuple[Sequence[np.ndarray], np.ndarray],
    num_classes: int,
    *,
    ks: Sequence[int] = KNN_KS,
    temperature: float = DINO_TEMPERATURE,
    test_memory: Literal["train+val", "train"] = "train+val",
    query_chunk: int = 1024,
    memory_chunk: int = 16384,
    dtype: torch.dtype = torch.float64,
) -> KnnResult:
    """Choose k on val (memory: train), then score test once (memory: ``test_memory``).

    Args:
        train: the training split's shards and int64 labels.
        val: the validation split's shards and labels.
        test: the test split's shards and labels.
        num_classes: classes.
        ks: the k values swept; those above the memory's size are dropped.
        temperature: the vote weight's temperature ``exp(sim / T)``.
        test_memory: ``"train+val"`` (the refit counterpart, default) or ``"train"``.
        query_chunk: query rows per similarity block.
        memory_chunk: memory rows per similarity block.
        dtype: the similarities' precision (:func:`nearest_neighbours`).

    Ties on val top-1 go to the smaller k.
    """
    if test_memory not in ("train+val", "train"):
        raise ConfigError(f"test_memory must be 'train+val' or 'train', not {test_memory!r}.")
    start = time.perf_counter()
    train_labels = np.asarray(train[1], dtype=np.int64)
    split_rows(train[0], train_labels)
    usable = sorted(k for k in set(ks) if k <= len(train_labels))
    if not usable:
        raise DataError(f"no k in {sorted(ks)} fits a training split of {len(train_labels)} rows.")
    chunks: dict[str, Any] = {"query_chunk": query_chunk, "memory_chunk": memory_chunk, "dtype": dtype}
    val_labels = np.asarray(val[1], dtype=np.int64)
    split_rows(val[0], val_labels)
    sims, index = nearest_neighbours(val[0], train[0], usable[-1], **chunks)
    # neighbours are sorted by similarity, so the k nearest are the first k columns
    neighbour_labels = train_labels[index]
    val_scores = {
        k: knn_scores(sims[:, :k], neighbour_labels[:, :k], val_labels, num_classes, temperature) for k in usable
    }
    best = max(usable, key=lambda k: (val_scores[k]["top1"], -k))
    memory, memory_labels = list(train[0]), train_labels
    if test_memory == "train+val":
        memory, memory_labels = [*train[0], *val[0]], np.concatenate([train_labels, val_labels])
    test_labels = np.asarray(test[1], dtype=np.int64)
    split_rows(test[0], test_labels)
    sims, index = nearest_neighbours(test[0], memory, best, **chunks)
    scores = knn_scores(sims, memory_labels[index], test_labels, num_classes, temperature)
    return KnnResult(
        best,
        temperature,
        val_scores,
        scores["top1"],
        scores["top5"],
        scores["balanced"],
        test_memory,
        time.perf_counter() - start,
    )
