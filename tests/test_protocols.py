"""Evaluation protocols beyond the linear probe: k-NN, few-shot, streamed probes.

Real features: packaged tf_efficientnet_lite0 on a Fashion-MNIST subset at 64 px, extracted once per
module and re-written as several small fp16 ``.npy`` shards read back as memory maps, as a cache
stores them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from vision_transfer.data.sources import read_fashion_mnist, stratified_subset
from vision_transfer.errors import VisionTransferError
from vision_transfer.evaluation.fewshot import ONE_SHOT_C, _folds, class_rows, draw_shots, few_shot, fit_shots, in_span
from vision_transfer.evaluation.knn import DINO_TEMPERATURE, KNN_KS, knn_evaluate, nearest_neighbours
from vision_transfer.evaluation.linear import Standardizer, epoch_steps, sgd_probe, tensor_batches, train_heads
from vision_transfer.evaluation.stats import mean_ci
from vision_transfer.evaluation.stream import (
    InsufficientMemoryError,
    lbfgs_memory_bytes,
    require_fits_in_memory,
    stream_moments,
    stream_sgd_probe,
    stream_train_heads,
    take_rows,
)
from vision_transfer.features.extract import extract

CLASSES = 10
SHARD_ROWS = {"train": 600, "val": 300, "test": 400}  # uneven last shards on purpose


@dataclass
class Split:
    shards: list[np.ndarray]  # read-only fp16 memory maps
    labels: np.ndarray
    ids: list[str]

    @property
    def dense(self) -> np.ndarray:
        """The whole split as float64, for the in-memory references."""
        return np.concatenate(self.shards).astype(np.float64)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """These problems are small: on 2 shared cores a second thread (torch's or BLAS's) costs far more
    than it gives (a 40-sample scikit-learn fit: 0.03 s on one thread, 2 s on two, under load)."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Split]:
    """Fashion-MNIST: train and val disjoint from its train images, test from its test images."""
    source = read_fashion_mnist()
    train_pool, test_pool = source.splits["train"], source.splits["test"]
    chosen = stratified_subset(train_pool.labels, 2000, seed=0)
    val_index = chosen[stratified_subset(train_pool.labels[chosen], 500, seed=1)]
    samples = {
        "train": train_pool.take(np.setdiff1d(chosen, val_index)),
        "val": train_pool.take(val_index),
        "test": test_pool.take(stratified_subset(test_pool.labels, 1000, seed=2)),
    }
    root = tmp_path_factory.mktemp("protocols")
    caches, _ = extract("tf_efficientnet_lite0", "packaged", samples, image_size=64, cache_root=root, progress=False)
    out = {}
    for name, split in samples.items():
        features, labels = caches[name].load(), split.labels
        folder = root / "shards" / name
        folder.mkdir(parents=True)
        shards = []
        for i, start in enumerate(range(0, len(features), SHARD_ROWS[name])):
            path = folder / f"shard_{i:05d}.npy"
            np.save(path, features[start : start + SHARD_ROWS[name]].astype(np.float16))
            shards.append(np.load(path, mmap_mode="r"))
        out[name] = Split(shards, labels, split.ids)
    return out


# -- k-NN -------------------------------------------------------------------------------------
def brute_force_knn(queries: np.ndarray, memory: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """All similarities at once in float64; ties by ascending memory row."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    m = memory / np.linalg.norm(memory, axis=1, keepdims=True)
    similarity = q @ m.T
    index = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(similarity, index, 1), index


def brute_force_votes(similarity: np.ndarray, labels: np.ndarray) -> np.ndarray:
    votes = np.zeros((len(labels), CLASSES))
    for c in range(CLASSES):
        votes[:, c] = (np.exp(similarity / DINO_TEMPERATURE) * (labels == c)).sum(1)
    return votes


@pytest.mark.slow
def test_knn_equals_brute_force_on_real_features(splits: dict[str, Split]) -> None:
    from sklearn.metrics import balanced_accuracy_score

    train, val, test = splits["train"], splits["val"], splits["test"]
    result = knn_evaluate(
        (train.shards, train.labels), (val.shards, val.labels), (test.shards, test.labels), CLASSES,
        query_chunk=256, memory_chunk=500,
    )  # fmt: skip
    # the reference: one in-memory similarity matrix, k chosen on val by the same votes
    similarity, index = brute_force_knn(val.dense, train.dense, max(KNN_KS))
    val_top1 = {}
    for k in KNN_KS:
        votes = brute_force_votes(similarity[:, :k], train.labels[index[:, :k]])
        val_top1[k] = float((votes.argmax(1) == val.labels).mean())
        assert result.val[k]["top1"] == val_top1[k]
    assert result.k == max(KNN_KS, key=lambda k: (val_top1[k], -k))
    memory = np.concatenate([train.dense, val.dense])
    similarity, index = brute_force_knn(test.dense, memory, result.k)
    votes = brute_force_votes(similarity, np.concatenate([train.labels, val.labels])[index])
    assert result.test_top1 == float((votes.argmax(1) == test.labels).mean())
    truth = votes[np.arange(len(votes)), test.labels]
    assert result.test_top5 == float(((truth > 0) & ((votes > truth[:, None]).sum(1) < 5)).mean())
    assert result.test_balanced == pytest.approx(balanced_accuracy_score(test.labels, votes.argmax(1)))
    print(f"k-NN: k={result.k}, test top-1 {result.test_top1:.4f}, top-5 {result.test_top5:.4f}")
    assert result.test_top1 > 0.7  # measured 0.80: lite0 features really separate Fashion-MNIST
    # the neighbours themselves, not just the scores
    sims, neighbours = nearest_neighbours(test.shards, [*train.shards, *val.shards], result.k, memory_chunk=500)
    assert np.array_equal(neighbours, index)
    np.testing.assert_allclose(sims, similarity, rtol=0, atol=1e-12)


class CountingShard:
    """A shard that records the most rows any single read asked of it."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.largest_read = array, 0
        self.shape, self.ndim = array.shape, array.ndim

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, key: slice) -> np.ndarray:
        rows = self.array[key]
        self.largest_read = max(self.largest_read, len(rows))
        return rows


@pytest.mark.slow
@pytest.mark.parametrize(("query_chunk", "memory_chunk"), [(13, 64), (128, 250), (1000, 100_000)])
def test_knn_chunking_changes_neither_neighbours_nor_the_rows_read_at_once(
    splits: dict[str, Split], query_chunk: int, memory_chunk: int
) -> None:
    train, test = splits["train"], splits["test"]
    _, expected = brute_force_knn(test.dense, train.dense, 50)
    memory = [CountingShard(s) for s in train.shards]
    queries = [CountingShard(s) for s in test.shards]
    _, index = nearest_neighbours(queries, memory, 50, query_chunk=query_chunk, memory_chunk=memory_chunk)  # type: ignore[arg-type]
    assert np.array_equal(index, expected)
    assert max(s.largest_read for s in memory) == min(memory_chunk, SHARD_ROWS["train"])
    assert max(s.largest_read for s in queries) == min(query_chunk, SHARD_ROWS["test"])


# -- few-shot -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_few_shot_episodes_come_from_train_only_and_are_seeded(splits: dict[str, Split]) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, val, test = splits["train"], splits["val"], splits["test"]
    options = {"shots": 5, "episodes": 3, "c_grid": (1e-3, 1e-1, 10.0)}
    run = few_shot((train.shards, train.labels, train.ids), (test.shards, test.labels), CLASSES, seed=0, **options)
    train_ids, val_ids, test_ids = set(train.ids), set(val.ids), set(test.ids)
    assert val_ids.isdisjoint(train_ids) and all(i.startswith("train:") for i in val_ids)  # a tempting pool
    for episode in run.episodes:
        assert set(episode.ids) <= train_ids
        assert set(episode.ids).isdisjoint(val_ids) and set(episode.ids).isdisjoint(test_ids)
        assert episode.ids == [train.ids[i] for i in episode.rows]
        assert np.array_equal(np.bincount(train.labels[episode.rows], minlength=CLASSES), np.full(CLASSES, 5))
        assert episode.cv_acc is not None and sorted(episode.cv_acc) == sorted(options["c_grid"])
        best = max(episode.cv_acc.values())
        assert episode.c == min(c for c, acc in episode.cv_acc.items() if acc == best)
    assert len({tuple(e.ids) for e in run.episodes}) == 3  # every episode draws anew
    # every C's cross-validated accuracy, recomputed with scikit-learn on the episode's own folds
    first = run.episodes[0]
    assert first.folds is not None and first.cv_acc is not None
    x, y = train.dense[first.rows], train.labels[first.rows]
    for c, accuracy in first.cv_acc.items():
        correct = 0
        for fold in np.unique(first.folds):
            held = first.folds == fold
            model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
            correct += int((model.fit(x[~held], y[~held]).predict(x[held]) == y[held]).sum())
        assert abs(correct / len(y) - accuracy) <= 1 / len(y), c  # one borderline shot at most
    assert run.mean > 0.5  # 5 shots of 10 classes: chance is 0.1 (measured ~0.63)
    mean, low, high = mean_ci(run.scores)
    assert (run.mean, run.ci_low, run.ci_high) == (mean, low, high) and low < mean < high

    again = few_shot((train.shards, train.labels, train.ids), (test.shards, test.labels), CLASSES, seed=0, **options)
    assert [(e.ids, e.c, e.test_acc) for e in again.episodes] == [(e.ids, e.c, e.test_acc) for e in run.episodes]
    other = few_shot((train.shards, train.labels, train.ids), (test.shards, test.labels), CLASSES, seed=1, **options)
    assert all(set(a.ids) != set(b.ids) for a, b in zip(run.episodes, other.episodes, strict=True))

    # the test split only scores: scrambled test labels change the scores, not the shots or the C chosen
    scrambled = np.random.default_rng(0).permutation(test.labels)
    blind = few_shot((train.shards, train.labels, train.ids), (test.shards, scrambled), CLASSES, seed=0, **options)
    assert [(e.ids, e.c, e.cv_acc) for e in blind.episodes] == [(e.ids, e.c, e.cv_acc) for e in run.episodes]
    assert blind.mean < 0.2


@pytest.mark.parametrize("shots", [1, 2, 10])
def test_few_shot_fits_in_the_span_of_the_shots_are_the_full_fits(splits: dict[str, Split], shots: int) -> None:
    """Fitting on the shots' coordinates in their span (fewer rows than features) gives the same C,
    cross-validated accuracies and weights as fitting all 1,280 features, for every kind of shot count: one
    (a fixed C, no folds), two (the fewest folds) and many (5 was here too: the same path as 10, 17 s of CI)."""
    train = splits["train"]
    rng = np.random.default_rng((7, shots))
    rows = draw_shots(class_rows(train.labels), shots, rng, train.labels)
    y = train.labels[rows]
    folds = _folds(y, shots, rng) if shots > 1 else None
    x, labels = torch.from_numpy(train.dense[rows]).float(), torch.from_numpy(y)
    grid = (1e-4, 1e-2, 1.0, 100.0)
    fast = fit_shots(x, labels, CLASSES, folds, grid)
    full = fit_shots(x, labels, CLASSES, folds, grid, span=False)
    assert fast[2:] == full[2:]  # C and every C's cross-validated accuracy
    for a, b in zip(fast[:2], full[:2], strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3 * float(b.abs().max()))
    predictions = [(torch.from_numpy(splits["test"].dense).float() @ w.T + b).argmax(1) for w, b, *_ in (fast, full)]
    assert float((predictions[0] == predictions[1]).float().mean()) > 0.995


def test_in_span_keeps_inner_products_and_leaves_tall_matrices_alone() -> None:
    x = torch.randn(12, 40, dtype=torch.float64)
    coordinates, basis = in_span(x)
    assert basis is not None and coordinates.shape == (12, 12)
    torch.testing.assert_close(coordinates @ coordinates.T, x @ x.T)
    torch.testing.assert_close(coordinates @ basis, x)  # x lies in the span
    tall = torch.randn(50, 40)
    assert in_span(tall)[1] is None and in_span(tall)[0] is tall


@pytest.mark.slow
def test_one_shot_uses_the_documented_fixed_c(splits: dict[str, Split]) -> None:
    train, test = splits["train"], splits["test"]
    run = few_shot((train.shards, train.labels, train.ids), (test.shards, test.labels), CLASSES, shots=1, episodes=2)
    assert all(e.c == ONE_SHOT_C and e.cv_acc is None and len(e.ids) == CLASSES for e in run.episodes)
    assert "fixed C=1" in run.c_selection and "nothing to cross-validate" in run.c_selection
    assert run.mean > 0.15  # above chance with a single image per class (measured ~0.3)


# -- streaming -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_streamed_statistics_and_rows_match_numpy(splits: dict[str, Split]) -> None:
    train = splits["train"]
    mean, std = stream_moments(train.shards, rows=128)  # many chunks per shard, merged
    np.testing.assert_allclose(mean, train.dense.mean(0), rtol=0, atol=1e-5)
    np.testing.assert_allclose(std, train.dense.std(0, ddof=1), rtol=0, atol=1e-5)
    # far from zero, a sum of squares would cancel (relative error ~1e-4 at this offset); the merge does not
    rng = np.random.default_rng(0)
    shifted = [(1e6 + rng.normal(size=(500, 4))).astype(np.float64) for _ in range(3)]
    _, std = stream_moments(shifted, rows=100)
    np.testing.assert_allclose(std, np.concatenate(shifted).std(0, ddof=1), rtol=1e-9)
    index = rng.permutation(len(train.labels))[:300]
    assert np.array_equal(take_rows(train.shards, index), train.dense[index].astype(np.float32))


@pytest.mark.slow
def test_streamed_heads_are_train_heads_on_a_single_shard(splits: dict[str, Split]) -> None:
    """With one shard the streamed batches are the in-memory batches, and one loop trains both: equal heads."""
    train = splits["train"]
    x = torch.from_numpy(train.dense.astype(np.float32))
    scaler = Standardizer(x)
    lrs, wds = [0.01, 0.1, 1.0], [0.0, 1e-4, 1e-3]
    options = {"epochs": 3, "batch_size": 256, "seed": 0}
    batches = tensor_batches(scaler(x), torch.from_numpy(train.labels), **options)
    steps = 3 * epoch_steps(len(x), 256)
    expected_w, expected_b = train_heads(batches, x.shape[1], CLASSES, lrs, wds, steps=steps)
    single = [np.concatenate(train.shards)]
    mean, std = scaler.mean.double().numpy(), scaler.std.double().numpy()
    w, b = stream_train_heads(single, train.labels, mean, std, CLASSES, lrs, wds, **options)
    assert torch.equal(w, expected_w) and torch.equal(b, expected_b)
    assert expected_w.abs().max() > 0.1  # the heads really trained


def test_in_memory_and_streamed_minibatches_train_the_same_heads() -> None:
    """The SGD loop exists once: fed the same rows in the same order (one shard, one seed), the
    in-memory and the streamed probe train bit-identical heads; stopping after k steps is the
    first k steps of the same run."""
    rng = np.random.default_rng(0)
    rows, dim = 300, 16
    x16 = (rng.normal(size=(rows, dim)) * rng.uniform(0.5, 3, dim) + rng.normal(size=dim)).astype(np.float16)
    labels = rng.integers(0, 4, rows)
    mean, std = stream_moments([x16])
    scaler = Standardizer.from_moments(mean, std)
    lrs, wds = [0.03, 0.3, 1.0], [0.0, 1e-3, 1e-2]
    options = {"epochs": 3, "batch_size": 64, "seed": 5}
    steps = 3 * epoch_steps(rows, 64)
    x = scaler(torch.from_numpy(x16.astype(np.float32)))
    in_memory = train_heads(tensor_batches(x, torch.from_numpy(labels), **options), dim, 4, lrs, wds, steps=steps)
    streamed = stream_train_heads([x16], labels, mean, std, 4, lrs, wds, **options)
    assert all(torch.equal(a, b) for a, b in zip(in_memory, streamed, strict=True))
    assert float(in_memory[0].abs().max()) > 0.1 and not torch.equal(in_memory[0][0], in_memory[0][2])
    # two shards: another order, hence other heads, over the same number of steps
    two = stream_train_heads([x16[:150], x16[150:]], labels, mean, std, 4, lrs, wds, **options)
    assert not torch.equal(two[0], streamed[0])
    # max_steps truncates the same run: 4 streamed steps are the first 4 in-memory steps
    first = itertools.islice(tensor_batches(x, torch.from_numpy(labels), **options), 4)
    short = stream_train_heads([x16], labels, mean, std, 4, lrs, wds, max_steps=4, **options)
    assert torch.equal(train_heads(first, dim, 4, lrs, wds, steps=steps)[0], short[0])


@pytest.mark.slow
def test_streamed_probe_agrees_with_the_in_memory_probe(splits: dict[str, Split]) -> None:
    """Shuffled differently (shard order, in-shard permutation), converged to the same optimum.

    A well-regularised grid (wd >= 0.01, 60 epochs of 12 steps; wd=1 is clearly worse on val), so both
    runs reach the strongly convex optimum; with the default 32-head grid single runs differ by SGD
    noise, as two seeds of ``sgd_probe`` do.
    """
    train, val, test = splits["train"], splits["val"], splits["test"]
    options = {"lrs": (0.1,), "wds": (0.01, 1.0), "epochs": 60, "batch_size": 128, "seed": 0}

    def dense(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(split.dense.astype(np.float32)), torch.from_numpy(split.labels)

    in_memory = sgd_probe(dense(train), dense(val), dense(test), CLASSES, **options)  # type: ignore[arg-type]
    streamed = stream_sgd_probe(
        (train.shards, train.labels), (val.shards, val.labels), (test.shards, test.labels), CLASSES, **options
    )  # type: ignore[arg-type]
    relative = float((streamed.weight - in_memory.weight).norm() / in_memory.weight.norm())
    print(f"top-1: streamed {streamed.test_acc:.4f}, in memory {in_memory.test_acc:.4f}, weights {relative:.3f} apart")
    assert streamed.chosen == in_memory.chosen
    assert in_memory.test_acc is not None and streamed.test_acc is not None
    assert abs(streamed.test_acc - in_memory.test_acc) <= 0.003
    assert streamed.test_acc > 0.75
    assert in_memory.balanced_accuracy is not None and streamed.balanced_accuracy is not None
    assert abs(streamed.balanced_accuracy - in_memory.balanced_accuracy) <= 0.003
    assert abs(streamed.f1_macro - in_memory.f1_macro) <= 0.003  # type: ignore[operator]
    assert relative < 0.1
    # its test numbers, read in one streamed pass, are those of the head it returns, computed densely
    logits = torch.from_numpy(test.dense).float() @ streamed.weight.T + streamed.bias
    labels = torch.from_numpy(test.labels)
    assert streamed.test_acc == pytest.approx(float((logits.argmax(1) == labels).double().mean()), abs=1e-9)
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1)
    assert streamed.test_acc_top5 == pytest.approx(float(top5.double().mean()), abs=1e-9)


def test_full_batch_memory_check_names_size_memory_and_the_way_out() -> None:
    imagenet = (1_281_167, 1280)
    needed = lbfgs_memory_bytes(*imagenet)
    assert needed >= 2 * 4 * imagenet[0] * imagenet[1]  # the features and their standardised copy
    with pytest.raises(InsufficientMemoryError) as caught:
        require_fits_in_memory(*imagenet, available_bytes=8 * 2**30)
    message = str(caught.value)
    assert isinstance(caught.value, VisionTransferError)
    assert f"{needed / 2**30:.2f} GiB" in message and "8.00 GiB" in message and "`--solver sgd`" in message
    assert "1,281,167 x 1280" in message
    assert require_fits_in_memory(10_000, 1280, available_bytes=8 * 2**30) == lbfgs_memory_bytes(10_000, 1280)
    assert require_fits_in_memory(100, 64) > 0  # the system's own figure: a small problem fits
    with pytest.raises(InsufficientMemoryError):
        require_fits_in_memory(10**12, 1280)  # 10 PB does not


def test_knn_takes_plain_arrays_and_drops_k_beyond_the_memory(tmp_path: Path) -> None:
    """Shards and labels in, no cache object: in-memory arrays work as memory maps do."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 3
    labels = np.repeat(np.arange(3), 40)
    features = (centres[labels] + rng.normal(size=(120, 16))).astype(np.float16)
    np.save(tmp_path / "s.npy", features[60:])
    shards = [features[:60], np.load(tmp_path / "s.npy", mmap_mode="r")]
    result = knn_evaluate((shards, labels), (shards, labels), (shards, labels), 3, ks=(10, 500))
    assert result.k == 10 and result.test_top1 == 1.0  # k=500 exceeds the 120 rows: dropped
