"""Linear probing: with vs without the feature cache, 32 heads vs 1, ours vs scikit-learn.

Packaged tf_efficientnet_lite0 on a Fashion-MNIST subset; every comparison runs both sides in
this one process on the same data, and prints the ratio.

    python benchmarks/probe.py [--train 3000] [--val 500] [--test 2000] [--image-size 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time

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
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as cache_dir:
        options = {"image_size": args.image_size, "cache_dir": cache_dir, "progress": False}
        start = time.perf_counter()
        data = datamodule(args)
        caches, passes = extract_datamodule(data, "tf_efficientnet_lite0", "packaged", **options)
        extraction = time.perf_counter() - start
        arrays = split_arrays(caches, data)
        train, val, test = (tensors(arrays, s) for s in ("train", "val", "test"))

        start = time.perf_counter()
        one = sgd_probe(train, val, test, 10, lrs=(0.03,), wds=(0.0,), epochs=EPOCHS)
        one_head = time.perf_counter() - start
        start = time.perf_counter()
        sweep = sgd_probe(train, val, test, 10, epochs=EPOCHS)  # 8 learning rates x 4 penalties
        sweep_time = time.perf_counter() - start
        start = time.perf_counter()
        _, warm_passes = extract_datamodule(datamodule(args), "tf_efficientnet_lite0", "packaged", **options)
        warm_lookup = time.perf_counter() - start

        start = time.perf_counter()
        ours = lbfgs_probe(train, val, test, 10, c_grid=KORNBLITH_C_GRID)
        lbfgs_time = time.perf_counter() - start
        sk_acc, sk_c, sk_time = sklearn_protocol(train, val, test)

    no_cache_time, no_cache_acc = probe_without_cache(args)
    cold = extraction + one_head
    warm = warm_lookup + one_head
    print(f"\nFashion-MNIST {args.train} train / {args.val} val / {args.test} test, {args.image_size} px, "
          f"tf_efficientnet_lite0 packaged, {torch.get_num_threads()} threads")  # fmt: skip
    rows = [
        (f"extraction (one pass, {passes} forward batches)", f"{extraction:.1f} s"),
        ("10-epoch probe without cache (Lightning, images)", f"{no_cache_time:.1f} s, test top-1 {no_cache_acc:.4f}"),
        ("10-epoch probe, cold cache (extract + 1 head)", f"{cold:.1f} s, test top-1 {one.test_acc:.4f}"),
        ("10-epoch probe, warm cache (lookup + 1 head)", f"{warm:.2f} s ({warm_passes} forward passes)"),
        ("speed-up with cache: cold / warm", f"{no_cache_time / cold:.1f}x / {no_cache_time / warm:.0f}x"),
        (
            "1 head vs 32-head sweep (heads only)",
            f"{one_head:.2f} s vs {sweep_time:.2f} s: {sweep_time / one_head:.2f}x",
        ),
        ("1 head vs 32-head sweep (cold, with extraction)", f"{(sweep_time + extraction) / cold:.2f}x"),
        ("32-head sweep: chosen, test top-1", f"{sweep.chosen}, {sweep.test_acc:.4f}"),
        (
            "L-BFGS, 45 C values: chosen C, test top-1",
            f"{ours.chosen['C']:.3g}, {ours.test_acc:.4f}, {lbfgs_time:.1f} s",
        ),
        ("scikit-learn LogisticRegression, same grid", f"{sk_c:.3g}, {sk_acc:.4f}, {sk_time:.1f} s"),
        ("L-BFGS minus scikit-learn (points)", f"{100 * (ours.test_acc - sk_acc):+.2f}"),
    ]
    print("| measurement | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


def sklearn_protocol(train, val, test):  # type: ignore[no-untyped-def]
    """The same protocol with scikit-learn: standardise, fit on train, choose C on val, test that model."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()
    scaler = StandardScaler().fit(train[0].numpy())
    best_c, best_acc, best_model = None, -1.0, None
    for c in KORNBLITH_C_GRID:
        model = LogisticRegression(C=c, max_iter=1000).fit(scaler.transform(train[0].numpy()), train[1].numpy())
        acc = model.score(scaler.transform(val[0].numpy()), val[1].numpy())
        if acc > best_acc:
            best_c, best_acc, best_model = c, acc, model
    return best_model.score(scaler.transform(test[0].numpy()), test[1].numpy()), best_c, time.perf_counter() - start


if __name__ == "__main__":
    main()
