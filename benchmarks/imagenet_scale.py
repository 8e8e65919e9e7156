"""Memory and speed of the streamed probe and k-NN on a feature cache the size of ImageNet-1k.

Builds a synthetic cache (1,281,167 x 1280 fp16 train rows = 3.3 GB in 16384-row ``.npy`` shards,
1000 classes, features = class mean + Gaussian noise so a probe learns; a 50,000-row val split as
the query set), then measures each workload in its own subprocess, so each peak RSS is that
process's own: its ``VmHWM`` from ``/proc/self/status`` (``os.wait4``'s ``ru_maxrss`` is shown too,
but it also counts the parent's memory at spawn). A full epoch of the 32-head x 1000-class SGD
probe is ~3e14 FLOPs and 50k x 1.28M k-NN ~1.6e14: far too long for 2 CPU cores, so those run a
bounded number of steps / queries against the FULL-size train shards; their times are extrapolated
and labelled so. Memory numbers always come from the full-size shards.

    nice -n 19 python benchmarks/imagenet_scale.py [--root /tmp/imagenet_scale] [--sgd-steps 12]
        [--knn-queries 1024] [--keep]

The synthetic cache is deleted at the end unless ``--keep``.

Measured 2026-11-27 on the dev machine (2 cores, 24 GiB, torch 2.14.1, 2 threads), under ``nice -n 19``
while other jobs kept the load average at 4-6: the times are pessimistic, the memory is not.
Defaults (12 SGD steps, 1024 k-NN queries); the float32 k-NN row is a second run with
``--only baseline knn --knn-dtype float32``.

| workload (own subprocess; GiB) | VmHWM | ru_maxrss | measured | rate | extrapolated |
| --- | --- | --- | --- | --- | --- |
| baseline: python, torch (0.50), the package, maps | 0.74 | 0.85 | | | |
| mean/std pass over all 1,281,167 rows | 0.88 | 0.88 | 14 s | 90,546 rows/s | (full pass) |
| the same, pages NOT released | 3.89 | 3.89 | 14 s | 90,597 rows/s | (full pass) |
| SGD 32 heads x 1000 classes, batch 1024 | 1.67 | 1.67 | 51 s, 12 steps | 243 rows/s | epoch 1.5 h, 10: 14.7 h |
| k-NN float64, 1,024 queries, k=200 | 1.39 | 1.39 | 160 s | 6.4 queries/s | 50k queries: 2.2 h |
| k-NN float32, 1,024 queries, k=200 | 1.05 | 1.05 | 87 s | 11.7 queries/s | 50k queries: 1.2 h |

Loading train as float32 in memory (``FeatureCache.load``) would need 4 x N x D = 6.11 GiB; the
full-batch L-BFGS probe ~26.75 GiB (``stream.lbfgs_memory_bytes``). After 12 + 1 steps the best head
scores 0.020 val top-1 on 4,096 val rows (chance 0.001; scored in 7 s, 564 rows/s); k-NN top-1 (k=200)
on the 1,024 queries 0.031. (Measured when the probe still refit one head on train+val; it no longer does.)
Not measured: k-NN outputs for all 50,000 queries add 0.22 GiB. Building the cache took 44 s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROWS = 1_281_167  # ImageNet-1k train images
VAL_ROWS = 50_000  # ImageNet-1k val images
DIM = 1280  # EfficientNet-B0 / lite0 pooled features
CLASSES = 1000
SHARD_ROWS = 16384
HEADS = 32  # probe.DEFAULT_LRS x probe.DEFAULT_WDS: 8 x 4
MEAN_SCALE = 0.1  # class-mean spread against unit noise: pairwise mean distance ~5 noise sd in 1280-D


def build(root: Path, rows: int, val_rows: int, dim: int, classes: int, seed: int = 0) -> float:
    """Write ``train/`` and ``val/`` shards and labels; returns seconds."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    means = (rng.standard_normal((classes, dim), dtype=np.float32) * MEAN_SCALE).astype(np.float32)
    for split, n in (("train", rows), ("val", val_rows)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        labels = rng.permutation(np.arange(n) % classes).astype(np.int64)
        np.save(folder / "labels.npy", labels)
        for i, first in enumerate(range(0, n, SHARD_ROWS)):
            y = labels[first : first + SHARD_ROWS]
            x = rng.standard_normal((len(y), dim), dtype=np.float32)
            x += means[y]
            np.save(folder / f"shard_{i:05d}.npy", x.astype(np.float16))
    return time.perf_counter() - start


def open_split(root: Path, split: str) -> tuple[list[np.ndarray], np.ndarray]:
    shards = [np.load(p, mmap_mode="r") for p in sorted((root / split).glob("shard_*.npy"))]
    return shards, np.load(root / split / "labels.npy")


def proc_status() -> dict[str, int]:
    """VmHWM (peak RSS), VmRSS, RssAnon, RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


# -- children: one workload each --------------------------------------------------------------------
def child_baseline(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """What every child holds before any work: the interpreter, torch, the package, the opened maps."""
    import torch  # noqa: F401

    with_torch = proc_status()["VmRSS"]
    # the protocol modules every workload imports
    from vision_transfer.evaluation import knn, stream  # noqa: F401

    shards, labels = open_split(root, "train")
    return {"shards": len(shards), "rows": len(labels), "rss_after_torch": with_torch}


def child_moments(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from vision_transfer.evaluation import stream

    if args.no_release:  # to show what the page release buys: mapped pages stay resident
        stream.release = lambda shard: None
    shards, labels = open_split(root, "train")
    start = time.perf_counter()
    mean, std = stream.stream_moments(shards)
    seconds = time.perf_counter() - start
    if not args.no_release:
        np.savez(root / "moments.npz", mean=mean, std=std)
    return {"rows": len(labels), "seconds": seconds, "rows_per_s": len(labels) / seconds}


def child_sgd(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from vision_transfer.evaluation.linear import DEFAULT_LRS, DEFAULT_WDS
    from vision_transfer.evaluation.stream import stream_accuracy, stream_train_heads

    shards, labels = open_split(root, "train")
    moments = np.load(root / "moments.npz")
    mean, std = moments["mean"], moments["std"]
    grid = [(lr, wd) for lr in DEFAULT_LRS for wd in DEFAULT_WDS]
    assert len(grid) == HEADS
    options = {"epochs": 10, "batch_size": args.batch_size, "seed": 0}
    lrs, wds = [g[0] for g in grid], [g[1] for g in grid]
    # one warm-up step (allocations, first shard), then the measured steps
    stream_train_heads(shards, labels, mean, std, CLASSES, lrs, wds, max_steps=1, **options)
    start = time.perf_counter()
    w, b = stream_train_heads(shards, labels, mean, std, CLASSES, lrs, wds, max_steps=args.sgd_steps, **options)
    seconds = time.perf_counter() - start
    trained_rows = args.sgd_steps * args.batch_size
    val_shards, val_labels = open_split(root, "val")
    part = [val_shards[0][: args.val_rows]]  # a memmap view: the first val rows only
    start = time.perf_counter()
    top1, _ = stream_accuracy(part, val_labels[: args.val_rows], w, b, mean=mean, std=std)
    val_seconds = time.perf_counter() - start
    return {
        "steps": args.sgd_steps,
        "rows": trained_rows,
        "seconds": seconds,
        "rows_per_s": trained_rows / seconds,
        "epoch_rows": len(labels),
        "val_rows": args.val_rows,
        "val_seconds": val_seconds,
        "val_rows_per_s": args.val_rows / val_seconds,
        "best_head_val_top1": float(top1.max()),
        "threads": torch.get_num_threads(),
    }


def child_knn(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from vision_transfer.evaluation.knn import KNN_KS, knn_scores, nearest_neighbours

    shards, labels = open_split(root, "train")
    queries, query_labels = open_split(root, "val")
    dtype = {"float64": torch.float64, "float32": torch.float32}[args.knn_dtype]
    start = time.perf_counter()
    sims, index = nearest_neighbours(queries, shards, max(KNN_KS), limit=args.knn_queries, dtype=dtype)
    seconds = time.perf_counter() - start
    scores = knn_scores(sims, labels[index], query_labels[: args.knn_queries], CLASSES)
    return {
        "queries": args.knn_queries,
        "memory_rows": len(labels),
        "dtype": args.knn_dtype,
        "seconds": seconds,
        "queries_per_s": args.knn_queries / seconds,
        "top1_k200": scores["top1"],
    }


CHILDREN = {"baseline": child_baseline, "moments": child_moments, "sgd": child_sgd, "knn": child_knn}


def run_child(name: str, argv: list[str], timeout: float) -> dict[str, Any]:
    """Run one workload in a fresh interpreter; its peak RSS from the kernel's accounting of it alone."""
    process = subprocess.Popen([sys.executable, __file__, "--child", name, *argv], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            process.kill()
            pid, status, usage = os.wait4(process.pid, 0)
            return {"child": name, "error": f"killed after {timeout:.0f} s"}
        time.sleep(0.5)
    output = process.stdout.read() if process.stdout else ""
    if status != 0:
        return {"child": name, "error": f"exit status {status}", "output": output[-2000:]}
    result = json.loads(output.strip().splitlines()[-1])
    # Linux reports KiB. At exec the kernel carries the pre-exec (forked) memory's high-water mark
    # into ru_maxrss, so it is at least the parent's RSS at spawn; VmHWM is the child's own.
    result["ru_maxrss"] = usage.ru_maxrss * 1024
    return result


def gib(size: float) -> str:
    return f"{size / 2**30:.2f} GiB"


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def report(args: argparse.Namespace, build_seconds: float, results: dict[str, dict[str, Any]]) -> str:
    from vision_transfer.evaluation.stream import lbfgs_memory_bytes

    n, d = args.rows, args.dim
    lines = [
        f"Synthetic cache: {n:,} x {d} fp16 train rows ({gib(2 * n * d)}) in {math.ceil(n / SHARD_ROWS)} shards of "
        f"{SHARD_ROWS} rows, {CLASSES} classes; {args.val_rows_total:,} val rows; built in {build_seconds:.0f} s. "
        "Reads hit the page cache (the files were just written).",
        "",
        "| workload (own subprocess) | peak RSS (VmHWM) | ru_maxrss | time measured | throughput | extrapolated |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | |")
            continue
        hwm, maxrss = gib(r["status"]["VmHWM"]), gib(r["ru_maxrss"])
        if name == "baseline":
            row = (
                f"| baseline: python + torch ({gib(r['rss_after_torch'])}) + vision_transfer, shards opened "
                f"| {hwm} | {maxrss} | | | |"
            )
        elif name.startswith("moments"):
            what = "mean/std pass, full train" + (", pages NOT released" if "no_release" in name else "")
            row = (
                f"| {what} | {hwm} | {maxrss} | {r['seconds']:.0f} s ({r['rows']:,} rows) "
                f"| {r['rows_per_s']:,.0f} rows/s | (measured, not extrapolated) |"
            )
        elif name == "sgd":
            epoch = r["epoch_rows"] / r["rows_per_s"]
            row = (
                f"| SGD probe, {HEADS} heads x {CLASSES} classes, batch {args.batch_size}: {r['steps']} steps "
                f"| {hwm} | {maxrss} | {r['seconds']:.0f} s ({r['rows']:,} rows) "
                f"| {r['rows_per_s']:,.0f} rows/s | one epoch: {hours(epoch)}; the 10-epoch sweep: "
                f"{hours(10 * epoch)}; scoring {r['val_rows']:,} val rows "
                f"took {r['val_seconds']:.0f} s ({r['val_rows_per_s']:,.0f} rows/s) |"
            )
        else:
            full = args.val_rows_total / r["queries_per_s"]
            row = (
                f"| k-NN ({r['dtype']}), {r['queries']:,} queries x {r['memory_rows']:,} train rows, k=200 "
                f"| {hwm} | {maxrss} | {r['seconds']:.0f} s | {r['queries_per_s']:.1f} queries/s "
                f"| {args.val_rows_total:,} queries: {hours(full)} |"
            )
        lines.append(row)
    lines += [
        "",
        f"An in-memory load (cache.load: float32) would need 4 x N x D = {gib(4 * n * d)} for train alone; "
        f"the full-batch L-BFGS probe ~{gib(lbfgs_memory_bytes(n, d, CLASSES))} (features, standardised copy, "
        "logits, history; stream.lbfgs_memory_bytes).",
    ]
    if "sgd" in results and "error" not in results["sgd"]:
        lines.append(
            f"After {results['sgd']['steps']} + 1 steps the best head scores "
            f"{results['sgd']['best_head_val_top1']:.3f} val top-1 on {args.val_rows:,} val rows (chance 0.001)."
        )
    if "knn" in results and "error" not in results["knn"]:
        lines.append(
            f"k-NN top-1 (k=200) on the measured queries: {results['knn']['top1_k200']:.3f}. Not measured: the "
            f"outputs for all {args.val_rows_total:,} queries add {gib(args.val_rows_total * 200 * 24)} "
            "(float64 similarities, int64 indices and labels, 200 per query)."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/imagenet_scale"))
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--val-rows-total", type=int, default=VAL_ROWS)
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--sgd-steps", type=int, default=12)
    parser.add_argument("--val-rows", type=int, default=4096, help="val rows scored by the partly trained heads")
    parser.add_argument("--knn-queries", type=int, default=1024)
    parser.add_argument("--knn-dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--child-timeout", type=float, default=1800)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic cache")
    parser.add_argument("--skip-no-release", action="store_true", help="skip the pass that keeps pages mapped")
    parser.add_argument("--only", nargs="+", choices=sorted(CHILDREN), help="run only these workloads")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--no-release", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = {"child": args.child, **CHILDREN[args.child](args.root, args)}
        result["status"] = proc_status()
        print(json.dumps(result))
        return

    argv = [
        "--root", str(args.root), "--batch-size", str(args.batch_size), "--sgd-steps", str(args.sgd_steps),
        "--val-rows", str(args.val_rows), "--knn-queries", str(args.knn_queries), "--knn-dtype", args.knn_dtype,
    ]  # fmt: skip
    try:
        if args.root.exists():
            shutil.rmtree(args.root)
        build_seconds = build(args.root, args.rows, args.val_rows_total, args.dim, CLASSES)
        print(f"built {args.root} in {build_seconds:.0f} s", flush=True)
        results: dict[str, dict[str, Any]] = {}
        plan = [("baseline", []), ("moments", [])]
        if not args.skip_no_release:
            plan.append(("moments_no_release", ["--no-release"]))
        plan += [("sgd", []), ("knn", [])]
        if args.only:  # sgd needs the moments child's statistics
            plan = [(n, e) for n, e in plan if n in args.only or (n == "moments" and "sgd" in args.only)]
        for name, extra in plan:
            child = "moments" if name.startswith("moments") else name
            results[name] = run_child(child, argv + extra, args.child_timeout)
            print(name, json.dumps(results[name]), flush=True)
        print()
        print(report(args, build_seconds, results))
    finally:
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
