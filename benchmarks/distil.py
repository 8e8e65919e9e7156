"""Distillation side by side: a small student alone, and the same student distilled from a larger fine-tuned
teacher, at equal epochs.

Packaged ImageNet EfficientNet-Lite0 (student) and -Lite2 (teacher) on Fashion-MNIST (4,000 train / 1,000 val /
2,000 test at 64 px, the README's main job's split and recipe). The teacher is fine-tuned once (seed 0) with the
recipe; each student seed trains once alone, once with ``teacher=`` (Hinton's logit distillation, ``kd_alpha``,
``kd_temperature``) and once with feature distillation added (``kd_feature_weight``: the similarity-preserving
term, 3000 as Tung & Mori used on CIFAR; 0 leaves the row out), everything else equal. ``--kd-cache`` adds the
logit-KD student with ``kd_cache`` (the teacher's outputs computed once, in seed 0's first epoch, kept in
``<out>/teacher_cache`` and read by every later epoch and seed; the folder is emptied first); its test top-1
is the on-the-fly row's up to float noise (a view first seen alone in its batch runs through the teacher as a
batch of one, whose convolution kernel differs in the last bits; training amplifies it), and
``test_top1_change`` records the difference.
Prints test top-1 (mean +- 95% CI over seeds) and fit seconds per seed, and writes ``<out>/results.json``.

    python benchmarks/distil.py --out benchmarks/results/distil
    python benchmarks/distil.py --out /tmp/distil --train 200 --val 60 --test 60 --epochs 1 --image-size 32 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
STUDENT, TEACHER = "tf_efficientnet_lite0", "tf_efficientnet_lite2"
LOGIT_KD, FEATURE_KD = "student <- teacher (logit KD)", "student <- teacher (logit + feature KD)"
CACHED_KD = "student <- teacher (logit KD, kd_cache)"


def fit(args: argparse.Namespace, backbone: str, seed: int, **options: Any) -> dict[str, Any]:
    """The quickstart recipe for ``backbone`` (plus ``options``) at one seed: test top-1, fit seconds, checkpoint."""
    import pytorch_lightning as pl
    import yaml

    from vision_transfer.backbones import preprocessing
    from vision_transfer.datamodules import FashionMNISTDataModule
    from vision_transfer.tasks import ImageClassifier

    recipe = yaml.safe_load(QUICKSTART.read_text())["model"]
    recipe = {k: v for k, v in recipe.items() if k not in ("backbone", "weights", "image_size")}
    pl.seed_everything(seed, verbose=False)
    data = FashionMNISTDataModule(
        batch_size=64, num_workers=1, val_fraction=0.1, augment="none",
        max_train_samples=args.train, max_val_samples=args.val, max_test_samples=args.test,
        data_config=preprocessing(backbone, "packaged", args.image_size),
    )  # fmt: skip
    model = ImageClassifier.for_data(data, backbone=backbone, weights="packaged", image_size=args.image_size,
                                     **{**recipe, **options})  # fmt: skip
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    top1 = float(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"])
    kind = "feature_kd" if options.get("kd_feature_weight") else "kd" if options.get("teacher") else "alone"
    kind += "_cached" if options.get("kd_cache") else ""
    name = f"{backbone}_{kind}_seed{seed}.ckpt"
    path = model.save_standalone_checkpoint(Path(args.out) / name, datamodule=data)
    return {"backbone": backbone, "seed": seed, "test_top1": top1, "fit_s": seconds, "checkpoint": str(path),
            **{k: v for k, v in options.items() if k not in ("teacher", "cache_dir")}}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distil"))
    for name, default in (("train", 4000), ("val", 1000), ("test", 2000), ("epochs", 3), ("image-size", 64),
                          ("threads", 2)):  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kd-alpha", type=float, default=0.5)
    parser.add_argument("--kd-temperature", type=float, default=2.0)
    parser.add_argument("--kd-feature-weight", type=float, default=3000.0, help="0: no feature-distillation row")
    parser.add_argument("--teacher", default=None, help="a fine-tuned teacher checkpoint (default: fine-tune lite2)")
    parser.add_argument("--kd-cache", action="store_true", help="add the logit-KD student with kd_cache")
    args = parser.parse_args(argv)
    import torch

    from vision_transfer.evaluation.stats import mean_ci

    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    cache = Path(args.out) / "teacher_cache"
    if cache.exists():
        import shutil

        shutil.rmtree(cache)  # seed 0 computes the teacher's outputs, the later seeds read them
    rows: list[dict[str, Any]] = []
    if args.teacher is None:
        rows.append({"role": "teacher", **fit(args, TEACHER, 0)})
        print(json.dumps(rows[-1]), flush=True)
        teacher = rows[-1]["checkpoint"]
    else:
        teacher = args.teacher
    for seed in args.seeds:
        rows.append({"role": "student alone", **fit(args, STUDENT, seed)})
        print(json.dumps(rows[-1]), flush=True)
        distil = {"teacher": teacher, "kd_alpha": args.kd_alpha, "kd_temperature": args.kd_temperature}
        rows.append({"role": LOGIT_KD, **fit(args, STUDENT, seed, **distil)})
        print(json.dumps(rows[-1]), flush=True)
        if args.kd_cache:
            rows.append({"role": CACHED_KD, **fit(args, STUDENT, seed, **distil, kd_cache=True, cache_dir=str(cache))})
            rows[-1]["test_top1_change"] = rows[-1]["test_top1"] - rows[-2]["test_top1"]
            print(json.dumps(rows[-1]), flush=True)
        if args.kd_feature_weight:
            rows.append({"role": FEATURE_KD, **fit(args, STUDENT, seed, **distil,
                                                    kd_feature_weight=args.kd_feature_weight)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    (Path(args.out) / "results.json").write_text(json.dumps({"teacher": teacher, "rows": rows}, indent=2) + "\n")
    print(f"\n| student | teacher | test top-1 (mean ± 95% CI, {len(args.seeds)} seeds) | fit s, per seed |")
    print("| --- | --- | --- | --- |")
    for role in ("teacher", "student alone", LOGIT_KD, CACHED_KD, FEATURE_KD):
        chosen = [r for r in rows if r["role"] == role]
        if not chosen:
            continue
        mean, low, high = mean_ci([r["test_top1"] for r in chosen])
        spread = f" ± {(high - low) / 2:.4f}" if len(chosen) > 1 else ""
        who = (TEACHER, "-") if role == "teacher" else (STUDENT, "-" if role == "student alone" else TEACHER)
        extra = {FEATURE_KD: " (logit + feature KD)", CACHED_KD: " (logit KD, kd_cache)"}.get(role, "")
        fit_s = " / ".join(f"{r['fit_s']:.0f}" for r in chosen)
        print(f"| {who[0]} | {who[1]}{extra} | {mean:.4f}{spread} | {fit_s} |")


if __name__ == "__main__":
    main()
