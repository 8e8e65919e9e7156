"""Linear probing: with vs without the feature cache, 32 heads vs 1, ours vs scikit-learn.

Packaged tf_efficientnet_lite0 on a Fashion-MNIST subset; every comparison runs both sides in
one run on the same features, and prints the ratio. The exact probes (our L-BFGS and scikit-learn's
``LogisticRegression``, the 45-C Kornblith grid, C chosen on val) each run in a fresh process of
their own, so neither inherits the other's thread pools or warm caches.

    python benchmarks/probe.py [--train 3000] [--val 500] [--test 2000] [--image-size 64] [--exact-only]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from vision_transfer.app.protocols import extract_datamodule, split_arrays
from vision_transfer.backbones import preprocessing
from vision_transfer.datamodules import FashionMNISTDataModule
from vision_transfer.evaluation.linear import KORNBLITH_C_GRID, lbfgs_probe, sgd_probe
from vision_transfer.tasks import ImageClassifier

EPOCHS = 10


def datamodule(args: argparse.Namespace) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(
        batch_size=256,
        num_workers=0,
        max_train_samples=args.train,
        max_val_samples=args.val,
        max_test_samples=args.test,
        augment=False,  # a linear probe on frozen features: both sides see eval transforms
        data_config=preprocessing("tf_efficientnet_lite0", "packaged", args.image_size),
    )


def probe_without_cache(args: argparse.Namespace) -> tuple[float, float]:
    """The same 10-epoch linear probe as a Lightning run over images (backbone forward every epoch)."""
    pl.seed_everything(0, verbose=False)
    data = datamodule(args)
    model = ImageClassifier.for_data(
        data, backbone="tf_efficientnet_lite0", weights="packaged", mode="linear_probe", image_size=args.image_size,
        lr=0.03, weight_decay=0.0, warmup_epochs=0, label_smoothing=0.0,
    )  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=EPOCHS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=EPOCHS,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, data)
    acc = trainer.test(model, data, verbose=False)[0]["test/acc"]
    return time.perf_counter() - start, acc


def tensors(arrays, split):  # type: ignore[no-untyped-def]
    x, y = arrays[split]
    return torch.from_numpy(x), torch.from_numpy(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--exact-only", action="store_true", help="only the L-BFGS vs scikit-learn comparison")
    parser.add_argument("--solve", choices=("ours", "sklearn"), help=argparse.SUPPRESS)  # one exact probe
    parser.add_argument("--features", type=Path, help=argparse.SUPPRESS)  # its .npz of features
    args = parser.parse_args()
    if args.solve:
        print(json.dumps(solve(args.solve, args.features)))
        return
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as cache_dir:
        options = {"image_size": args.image_size, "cache_dir": cache_dir, "progress": False}
        start = time.perf_counter()
        data = datamodule(args)
        caches, passes = extract_datamodule(data, "tf_efficientnet_lite0", "packaged", **options)
        extraction = time.perf_counter() - start
        arrays = split_arrays(caches, data)
        train, val, test = (tensors(arrays, s) for s in ("train", "val", "test"))
        features = Path(cache_dir) / "features.npz"
        np.savez(features, **{f"{s}_{k}": arrays[s][i] for s in arrays for i, k in enumerate("xy")})
        exact = {solver: exact_in_own_process(solver, features) for solver in ("ours", "sklearn")}
        if not args.exact_only:
            start = time.perf_counter()
            one = sgd_probe(train, val, test, 10, lrs=(0.03,), wds=(0.0,), epochs=EPOCHS)
            one_head = time.perf_counter() - start
            start = time.perf_counter()
            sweep = sgd_probe(train, val, test, 10, epochs=EPOCHS)  # 8 learning rates x 4 penalties
            sweep_time = time.perf_counter() - start
            start = time.perf_counter()
            _, warm_passes = extract_datamodule(datamodule(args), "tf_efficientnet_lite0", "packaged", **options)
            warm_lookup = time.perf_counter() - start

    print(f"\nFashion-MNIST {args.train} train / {args.val} val / {args.test} test, {args.image_size} px, "
          f"tf_efficientnet_lite0 packaged, {torch.get_num_threads()} threads")  # fmt: skip
    ours, sk = exact["ours"], exact["sklearn"]
    rows = [(f"extraction (one pass, {passes} forward batches)", f"{extraction:.1f} s")]
    if not args.exact_only:
        no_cache_time, no_cache_acc = probe_without_cache(args)
        cold = extraction + one_head
        warm = warm_lookup + one_head
        rows += [
            (
                "10-epoch probe without cache (Lightning, images)",
                f"{no_cache_time:.1f} s, test top-1 {no_cache_acc:.4f}",
            ),
            ("10-epoch probe, cold cache (extract + 1 head)", f"{cold:.1f} s, test top-1 {one.test_acc:.4f}"),
            ("10-epoch probe, warm cache (lookup + 1 head)", f"{warm:.2f} s ({warm_passes} forward passes)"),
            ("speed-up with cache: cold / warm", f"{no_cache_time / cold:.1f}x / {no_cache_time / warm:.0f}x"),
            (
                "1 head vs 32-head sweep (heads only)",
                f"{one_head:.2f} s vs {sweep_time:.2f} s: {sweep_time / one_head:.2f}x",
            ),
            ("1 head vs 32-head sweep (cold, with extraction)", f"{(sweep_time + extraction) / cold:.2f}x"),
            ("32-head sweep: chosen, test top-1", f"{sweep.chosen}, {sweep.test_acc:.4f}"),
        ]
    same_c = sum(abs(a - b) < 1e-12 for a, b in zip(ours["val_acc"], sk["val_acc"], strict=True))
    rows += [
        (
            f"L-BFGS (ours), {len(KORNBLITH_C_GRID)} C values: chosen C, test top-1, time",
            f"{ours['C']:.3g}, {ours['test_acc']:.4f}, {ours['seconds']:.1f} s ({ours['iterations']} iterations)",
        ),
        (
            "scikit-learn LogisticRegression (lbfgs), same grid",
            f"{sk['C']:.3g}, {sk['test_acc']:.4f}, {sk['seconds']:.1f} s ({sk['iterations']} iterations)",
        ),
        ("scikit-learn time / ours", f"{sk['seconds'] / ours['seconds']:.2f}x"),
        ("L-BFGS minus scikit-learn (test points)", f"{100 * (ours['test_acc'] - sk['test_acc']):+.2f}"),
        ("Cs with the same val accuracy", f"{same_c} of {len(KORNBLITH_C_GRID)}"),
    ]
    print("| measurement | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


def exact_in_own_process(solver: str, features: Path) -> dict:  # type: ignore[type-arg]
    command = [sys.executable, __file__, "--solve", solver, "--features", str(features)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def solve(solver: str, features: Path) -> dict:  # type: ignore[type-arg]
    """One exact probe over the 45-C grid on saved features: chosen C, test top-1, val per C, time."""
    arrays = np.load(features)
    train, val, test = ((torch.from_numpy(arrays[f"{s}_x"]), torch.from_numpy(arrays[f"{s}_y"]).long())
                        for s in ("train", "val", "test"))  # fmt: skip
    start = time.perf_counter()
    if solver == "ours":
        result = lbfgs_probe(train, val, test, 10, c_grid=KORNBLITH_C_GRID)
        out = {"C": result.chosen["C"], "test_acc": result.test_acc, "val_acc": [r["val_acc"] for r in result.sweep],
               "iterations": int(sum(r["iterations"] for r in result.sweep))}  # fmt: skip
    else:
        out = sklearn_protocol(train, val, test)
    return {**out, "seconds": time.perf_counter() - start}


def sklearn_protocol(train, val, test):  # type: ignore[no-untyped-def]
    """The same protocol with scikit-learn: standardise, fit on train, choose C on val, test that model.
    Its default ``max_iter=100`` stops short of convergence on these features; 1000 as in most probes."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train[0].numpy())
    x, val_x = scaler.transform(train[0].numpy()), scaler.transform(val[0].numpy())
    best_c, best_acc, best_model, val_accs, iterations = None, -1.0, None, [], 0
    for c in KORNBLITH_C_GRID:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = LogisticRegression(C=c, max_iter=1000).fit(x, train[1].numpy())
        iterations += int(model.n_iter_.max())
        val_accs.append(float(model.score(val_x, val[1].numpy())))
        if val_accs[-1] > best_acc:
            best_c, best_acc, best_model = c, val_accs[-1], model
    test_acc = float(best_model.score(scaler.transform(test[0].numpy()), test[1].numpy()))
    return {"C": best_c, "test_acc": test_acc, "val_acc": val_accs, "iterations": iterations}


if __name__ == "__main__":
    main()
