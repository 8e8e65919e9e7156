"""``vision-transfer wise-ft`` and ``vision-transfer soup``: weight-space ensembles of checkpoints.

WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models") interpolates a fine-tune's
backbone towards the pre-trained weights it started from (with ``--probe``: the whole model towards a
linear probe of them, as the paper does with its zero-shot head); model soups (Wortsman et al. 2022,
"Model soups") average several fine-tunes of one pre-trained model. Every candidate is scored on the
validation split of the data its checkpoint records, where the choice is made, and on the test split,
which is only reported. The chosen model is re-calibrated on val (as ``fit`` does: a temperature fitted
to other weights does not fit these) and written as an ordinary checkpoint that ``test``, ``predict``,
``export`` and ``load_classifier`` read.

LoRA checkpoints are averaged with their adapters merged into the weights
(:func:`vision_transfer.tuning.adapters.merged_backbone`); the checkpoints written are plain models.

Importing this module is cheap (``--help`` needs no torch); the work imports what it needs when it runs.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from jsonargparse import ArgumentParser

from vision_transfer.errors import CheckpointError, ConfigError, DataError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vision_transfer.checkpoint import CheckpointEntry
    from vision_transfer.datamodules import ImageDataModule
    from vision_transfer.tasks import ImageClassifier

BnStats = Literal["recompute", "interpolate"]
DEFAULT_ALPHAS = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1"  # WiSE-FT's sweep
# SWA (Izmailov et al. 2018) recomputes the statistics over the whole training set; a cap keeps the cost
# per averaged model bounded (a smaller train split is used whole)
BN_BATCHES = 50
# datamodule options that change how the training split is read or augmented, not which images are in
# val and test: fine-tunes may differ in them (augmentation is one of the hyperparameters soups average over)
TRAINING_ONLY_OPTIONS = frozenset(
    {
        "batch_size", "num_workers", "augment", "scale_min", "hflip", "color_jitter", "balanced_sampling",
        "verify_images", "on_bad_image", "predict_paths", "max_train_samples",
    }
)  # fmt: skip
SOUP_HINT = "a soup averages fine-tunes of one pre-trained model on one task, preprocessing and data split"
PROBE_HINT = (
    "--probe takes a linear probe of the fine-tune's pre-trained backbone, with its classes, task, "
    "preprocessing and data split"
)


# -- the commands --------------------------------------------------------------------------------
def wise_ft_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="vision-transfer wise-ft",
        description="WiSE-FT: interpolate a fine-tuned checkpoint's backbone towards the pre-trained weights it "
        "started from, theta(alpha) = (1 - alpha) * pre-trained + alpha * fine-tuned; score every alpha on val "
        "and test, keep the best on val, re-calibrate it and write it as a checkpoint.",
    )
    parser.add_argument("checkpoint", help="the fine-tuned .ckpt (not random init: it needs pre-trained weights)")
    parser.add_argument(
        "--alphas", type=str, default=DEFAULT_ALPHAS, help="comma-separated, in [0, 1]: 0 pre-trained, 1 fine-tuned"
    )
    parser.add_argument(
        "--probe", type=str | None, default=None,
        help="a linear-probe .ckpt of the same pre-trained backbone: interpolate the whole model (backbone and "
        "head) between it and the fine-tune, instead of the backbone only under the fine-tuned head",
    )  # fmt: skip
    parser.add_argument(
        "--weights", type=str | None, default=None,
        help="the pre-trained weights (default: those the checkpoint records it started from; give the file "
        "when it moved, its sha256 must match)",
    )  # fmt: skip
    _bn_arguments(parser)
    parser.add_argument(
        "--out", type=str | None, default=None, help="folder of wise_ft.json and the checkpoint (default: the "
        "checkpoint's folder)"
    )  # fmt: skip
    return parser


def soup_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="vision-transfer soup",
        description="Model soups: average the weights of fine-tunes of one pre-trained model. uniform: all of "
        "them; greedy: best on val first, each next one kept only if the soup's val score does not drop. "
        "The soups and every ingredient are scored on val and test; each soup is re-calibrated and written.",
    )
    parser.add_argument("checkpoints", nargs="+", help="two or more fine-tuned .ckpt files")
    parser.add_argument("--recipe", type=Literal["uniform", "greedy", "both"], default="both")
    _bn_arguments(parser)
    parser.add_argument(
        "--out", type=str | None, default=None, help="folder of soup.json and the soups (default: the first "
        "checkpoint's folder)"
    )  # fmt: skip
    return parser


def _bn_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--bn_stats", type=Literal["recompute", "interpolate"], default="recompute",
        help="BatchNorm running statistics of each averaged model: recompute them on training images (eval "
        "transform), or average them like the weights (nothing to do for backbones without BatchNorm)",
    )  # fmt: skip
    parser.add_argument(
        "--bn_batches", type=int, default=BN_BATCHES, help="recompute: training batches (the whole split if fewer)"
    )


def wise_ft_command(argv: list[str]) -> None:
    args = wise_ft_parser().parse_args(argv)
    alphas = parse_alphas(args.alphas)
    report = wise_ft(
        args.checkpoint, alphas, probe=args.probe, weights=args.weights, bn_stats=args.bn_stats,
        bn_batches=args.bn_batches, out=args.out,
    )  # fmt: skip
    metric = report["metric"]
    head = f"interpolated with the probe {report['probe']}" if report["probe"] else "the fine-tuned head"
    print(f"wise-ft     {report['checkpoint']} <-> pre-trained {_weights_text(report['pretrained'])}; head: {head}")
    print(f"BatchNorm   {report['batch_norm']}")
    rows = [
        (f"{row['alpha']:g}", row["val"], row["test"], row["alpha"] == report["chosen_alpha"])
        for row in report["alphas"]
    ]
    print(_table("alpha", metric, rows))
    print(f"chosen      alpha {report['chosen_alpha']:g}: the highest val/{metric} (ties: the smaller alpha)")
    print(f"calibration {report['calibration_line']}")
    print(f"checkpoint  {report['chosen_checkpoint']}   (vision-transfer test --ckpt_path ...)")
    print(f"report      {report['report']}")


def soup_command(argv: list[str]) -> None:
    args = soup_parser().parse_args(argv)
    report = soup(
        args.checkpoints, recipe=args.recipe, bn_stats=args.bn_stats, bn_batches=args.bn_batches, out=args.out
    )
    metric = report["metric"]
    print(f"BatchNorm   {report['batch_norm']}")
    rows = [(item["checkpoint"], item["val"], item["test"], False) for item in report["ingredients"]]
    for recipe in ("uniform", "greedy"):
        if recipe in report:
            result = report[recipe]
            name = f"{recipe} soup ({len(result['ingredients'])} of {len(report['ingredients'])})"
            rows.append((name, result["val"], result["test"], False))
    print(_table("model", metric, rows))
    for recipe in ("uniform", "greedy"):
        if recipe in report:
            result = report[recipe]
            if recipe == "greedy":
                kept = ", ".join(result["ingredients"])
                print(f"greedy      kept {kept} (in order of val/{metric}; each kept if the soup's val did not drop)")
            print(f"{recipe:<11} {result['calibration_line']}")
            print(f"{'checkpoint':<11} {result['checkpoint']}")
    print(f"report      {report['report']}")


def parse_alphas(text: str) -> list[float]:
    """``--alphas``: comma-separated numbers in [0, 1] -> sorted, without repeats."""
    try:
        alphas = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise ConfigError(f"--alphas {text!r}: give comma-separated numbers in [0, 1], e.g. 0,0.5,1.") from e
    outside = [a for a in alphas if not 0.0 <= a <= 1.0]
    if not alphas or outside:
        raise ConfigError(f"--alphas {text!r}: every alpha must be in [0, 1] (0: pre-trained, 1: fine-tuned).")
    return sorted(set(alphas))


def _table(first: str, metric: str, rows: Sequence[tuple[str, float, float | None, bool]]) -> str:
    width = max(len(first), *(len(name) for name, *_ in rows))
    val, test = f"val/{metric}", f"test/{metric}"
    lines = [f"{first:<{width}}  {val:>10}  {test:>10}"]
    for name, val_score, test_score, chosen in rows:
        test_text = "-" if test_score is None else f"{test_score:.4f}"
        lines.append(f"{name:<{width}}  {val_score:>10.4f}  {test_text:>10}{'  <- chosen' if chosen else ''}")
    return "\n".join(lines)


def _weights_text(record: Mapping[str, Any]) -> str:
    return f"{record.get('kind')}:{record.get('uri')}"


# -- WiSE-FT -------------------------------------------------------------------------------------
def wise_ft(
    checkpoint: str | Path,
    alphas: Sequence[float],
    *,
    probe: str | Path | None = None,
    weights: str | None = None,
    bn_stats: BnStats = "recompute",
    bn_batches: int = BN_BATCHES,
    out: str | Path | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Interpolate a fine-tuned checkpoint towards its pre-trained weights at each alpha, keep the best
    on val and write it (re-calibrated) to ``out``; returns the report written to ``wise_ft.json``."""
    from vision_transfer.tuning.averaging import interpolate

    _check_bn_options(bn_stats, bn_batches)  # before anything is read or built
    path = Path(checkpoint)
    alphas = sorted(set(alphas))
    if not alphas or not all(0.0 <= a <= 1.0 for a in alphas):
        raise ConfigError(f"alphas {list(alphas)}: give one or more, each in [0, 1].")
    finetuned = read_ingredient(path)
    pretrained = pretrained_backbone(finetuned, weights)
    start = {f"backbone.{k}": v for k, v in pretrained.state_dict().items()}
    prefixes: tuple[str, ...] = ("backbone.",)
    if probe is not None:
        linear = read_ingredient(Path(probe))
        check_same_start(finetuned, linear, PROBE_HINT)
        _check_probe_backbone(linear, start)
        prefixes = ("backbone.", "head.")
        start = _part(linear.model.state_dict(), prefixes)
    bench = Bench(finetuned, bn_stats, bn_batches, device)
    end = _part(finetuned.model.state_dict(), prefixes)
    rest = {k: v for k, v in finetuned.model.state_dict().items() if not k.startswith(prefixes)}
    names = (str(probe) if probe is not None else "the pre-trained weights", str(path))
    work = copy.deepcopy(finetuned.model)
    rows: list[dict[str, Any]] = []
    best: Candidate | None = None
    for alpha in alphas:
        work.load_state_dict({**rest, **interpolate(start, end, alpha, names)})
        # the endpoints are models that were trained or pre-trained as they are: their statistics are their own
        batches = bench.settle(work) if 0 < alpha < 1 else 0
        scores = bench.score(work)
        rows.append({"alpha": alpha, "val": scores.val, "test": scores.test, "bn_batches": batches})
        if best is None or scores.val > best.scores.val:  # ascending alphas: a tie keeps the smaller one
            best = Candidate(alpha, scores, _snapshot(work))
    assert best is not None
    folder = Path(out) if out is not None else path.parent
    target = folder / f"wise_ft_alpha{best.alpha:g}.ckpt"
    work.load_state_dict(best.state)
    calibration, line = bench.finish(work, best.scores, target)
    report = {
        "checkpoint": str(path.resolve()),
        "pretrained": dict(finetuned.entry.initial_weights),
        "probe": str(Path(probe).resolve()) if probe is not None else None,
        "interpolated": "backbone and head" if probe is not None else "backbone (head: the fine-tune's)",
        "metric": bench.metric,
        "bn_stats": bench.bn_mode,
        "batch_norm": bench.bn_text("interpolated model (alpha 0 and 1 keep their own)"),
        "alphas": rows,
        "chosen_alpha": best.alpha,
        "chosen_checkpoint": str(target.resolve()),
        "calibration": calibration,
        "calibration_line": line,
    }
    return _write_report(report, folder / "wise_ft.json")


def pretrained_backbone(finetuned: Ingredient, weights: str | None = None) -> nn.Module:
    """The backbone a checkpoint was fine-tuned from, rebuilt from the weights it records (or ``weights``) and
    checked against that record."""
    from vision_transfer.backbones import create_backbone

    entry = finetuned.entry
    record = entry.initial_weights
    if record.get("kind") == "none":
        raise CheckpointError(
            f"{finetuned.path}: trained from random init (weights none): there are no pre-trained weights to "
            "interpolate towards. Average fine-tunes with `vision-transfer soup` instead."
        )
    setting = weights if weights is not None else _weights_setting(entry)
    backbone, _ = create_backbone(entry.backbone, setting, image_size=entry.settings.get("image_size"))
    built = dict(getattr(backbone, "pretrained_cfg", {}).get("weights", {}))
    if _weights_identity(built) != _weights_identity(record):
        raise CheckpointError(
            f"{finetuned.path}: fine-tuned from {_weights_text(record)} (sha256 {record.get('sha256')}), but weights "
            f"{setting!r} are {_weights_text(built)} (sha256 {built.get('sha256')}); give --weights the weights it "
            "started from."
        )
    return backbone


def _weights_setting(entry: CheckpointEntry) -> str:
    """The ``weights`` setting that rebuilds a checkpoint's initial weights (its settings say ``none``: the
    state dict holds the weights)."""
    kind, uri = entry.initial_weights.get("kind"), str(entry.initial_weights.get("uri", ""))
    if kind == "packaged":
        return "packaged"
    if kind == "timm":
        tag = uri.removeprefix(f"{entry.backbone}.") if uri.startswith(f"{entry.backbone}.") else ""
        return f"timm:{tag}" if tag else "timm"
    if kind == "file":
        return uri
    raise CheckpointError(f"{entry.source}: its initial weights {dict(entry.initial_weights)} are of no known kind.")


def _weights_identity(record: Mapping[str, Any]) -> tuple[Any, Any]:
    """What makes two weight records the same weights: the content hash where there is one (a packaged or
    copied file is the same wherever it lies), else the name (timm's hub tags)."""
    sha = record.get("sha256")
    return (record.get("kind"), sha) if sha else (record.get("kind"), record.get("uri"))


def _check_probe_backbone(probe: Ingredient, pretrained: Mapping[str, torch.Tensor]) -> None:
    import torch

    state = _part(probe.model.state_dict(), ("backbone.",))
    for key, value in pretrained.items():
        if key not in state or not torch.equal(state[key], value):
            raise CheckpointError(
                f"{probe.path}: its backbone is not the pre-trained weights ({key} differs); {PROBE_HINT} "
                "(mode linear_probe)."
            )


# -- soups ---------------------------------------------------------------------------------------
def soup(
    checkpoints: Sequence[str | Path],
    *,
    recipe: Literal["uniform", "greedy", "both"] = "both",
    bn_stats: BnStats = "recompute",
    bn_batches: int = BN_BATCHES,
    out: str | Path | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Uniform and/or greedy soups of fine-tuned checkpoints, scored with every ingredient and written
    (re-calibrated) to ``out``; returns the report written to ``soup.json``."""
    if recipe not in ("uniform", "greedy", "both"):
        raise ConfigError(f"recipe={recipe!r}: use uniform, greedy or both.")
    _check_bn_options(bn_stats, bn_batches)
    if len(checkpoints) < 2:
        raise ConfigError(f"a soup needs two or more checkpoints; {len(checkpoints)} given.")
    ingredients = [read_ingredient(Path(p)) for p in checkpoints]
    for other in ingredients[1:]:
        check_same_start(ingredients[0], other, SOUP_HINT)
    bench = Bench(ingredients[0], bn_stats, bn_batches, device)
    scores = []
    for ingredient in ingredients:
        scores.append(bench.score(ingredient.model))
        ingredient.model.cpu()  # one model on the accelerator at a time
    folder = Path(out) if out is not None else Path(checkpoints[0]).parent
    report: dict[str, Any] = {
        "metric": bench.metric,
        "bn_stats": bench.bn_mode,
        "ingredients": [
            {"checkpoint": str(i.path), "val": s.val, "test": s.test} for i, s in zip(ingredients, scores, strict=True)
        ],
    }
    if recipe in ("uniform", "both"):
        work, batches = bench.mix(ingredients, ingredients[0])
        result = bench.score(work)
        report["uniform"] = bench.write_soup(work, result, folder / "soup_uniform.ckpt", ingredients, batches)
    if recipe in ("greedy", "both"):
        report["greedy"] = _greedy_soup(bench, ingredients, scores, folder / "soup_greedy.ckpt")
    report["batch_norm"] = bench.bn_text("soup of two or more checkpoints")
    return _write_report(report, folder / "soup.json")


def _greedy_soup(bench: Bench, ingredients: list[Ingredient], scores: list[Scores], target: Path) -> dict[str, Any]:
    """Wortsman et al.'s greedy soup: ingredients in decreasing val score (ties: as given), each added only if
    the soup's val score does not drop, so the soup is never worse on val than the best ingredient."""
    order = sorted(range(len(ingredients)), key=lambda i: -scores[i].val)
    kept = [ingredients[order[0]]]
    work, current, batches = copy.deepcopy(kept[0].model), scores[order[0]], 0
    tried = [{"checkpoint": str(kept[0].path), "val": current.val, "kept": True}]
    for index in order[1:]:
        candidate = [*kept, ingredients[index]]
        mixed, used = bench.mix(candidate, kept[0])
        result = bench.score(mixed, test=False)
        accepted = result.val >= current.val
        tried.append({"checkpoint": str(ingredients[index].path), "val": result.val, "kept": accepted})
        if accepted:
            kept, work, current, batches = candidate, mixed, result, used
    if len(kept) > 1:  # the test split is scored once, for the soup chosen
        current = bench.score(work)
    written = bench.write_soup(work, current, target, kept, batches)
    return {**written, "tried": tried}


# -- shared --------------------------------------------------------------------------------------
@dataclass
class Ingredient:
    """A checkpoint read as a plain model (adapters merged into its weights), in eval mode on the CPU."""

    path: Path
    entry: CheckpointEntry
    model: ImageClassifier


@dataclass
class Scores:
    """A model's score on val and test (None: no test split), and its val logits, for calibration."""

    val: float
    test: float | None
    val_logits: torch.Tensor
    val_labels: torch.Tensor


@dataclass
class Candidate:
    alpha: float
    scores: Scores
    state: dict[str, torch.Tensor]


def read_ingredient(path: Path) -> Ingredient:
    """A checkpoint's model; a LoRA one with its adapters merged, as a plain model of the same weights."""
    from vision_transfer.app.checkpoints import model_from_checkpoint, model_settings
    from vision_transfer.checkpoint import read_checkpoint
    from vision_transfer.tasks import ImageClassifier
    from vision_transfer.tuning.adapters import merged_backbone, without_adapters

    entry, content = read_checkpoint(path)
    model = model_from_checkpoint(entry, content)
    merged = merged_backbone(model.backbone)
    if merged is not model.backbone:
        plain = ImageClassifier(**without_adapters(model_settings(entry)))
        plain.adopt_checkpoint(entry)
        state = {k: v for k, v in content["state_dict"].items() if not k.startswith("backbone.")}
        plain.load_state_dict({**state, **{f"backbone.{k}": v for k, v in merged.state_dict().items()}})
        model = plain
    return Ingredient(path, entry, model.eval())


def check_same_start(a: Ingredient, b: Ingredient, hint: str) -> None:
    """Refuse two checkpoints that are not fine-tunes of one pre-trained model on one task, preprocessing and
    data split (the validation split must be one that neither trained on)."""
    weights_a, weights_b = dict(a.entry.initial_weights), dict(b.entry.initial_weights)
    for what, x, y, same in (
        ("backbone", a.entry.backbone, b.entry.backbone, None),
        ("classes", a.entry.class_names, b.entry.class_names, None),
        ("task", a.entry.task, b.entry.task, None),
        ("preprocessing (data_config)", a.entry.data_config.to_dict(), b.entry.data_config.to_dict(), None),
        ("initial weights", weights_a, weights_b, _weights_identity(weights_a) == _weights_identity(weights_b)),
        ("data", _split_record(a.entry.datamodule), _split_record(b.entry.datamodule), None),
    ):
        if not (x == y if same is None else same):
            raise CheckpointError(f"{a.path} and {b.path} differ in {what}: {_difference(x, y)}; {hint}.")


def _split_record(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What of a datamodule record decides the images of each split."""
    if record is None:
        return None
    args = {k: v for k, v in record.get("init_args", {}).items() if k not in TRAINING_ONLY_OPTIONS}
    return {"class_path": record.get("class_path"), **args}


def _difference(x: Any, y: Any) -> str:
    if isinstance(x, dict) and isinstance(y, dict):
        key = next(k for k in [*x, *y] if x.get(k, "<unset>") != y.get(k, "<unset>"))
        return f"{key} {x.get(key, '<unset>')!r} vs {y.get(key, '<unset>')!r}"
    if isinstance(x, list) and isinstance(y, list) and len(x) > 6:
        return f"{len(x)} classes ({', '.join(map(str, x[:5]))}...) vs {len(y)} ({', '.join(map(str, y[:5]))}...)"
    return f"{x!r} vs {y!r}"


def _part(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class Bench:
    """Where candidates are made and judged: the recorded data of a reference checkpoint (val chooses, test
    reports), the device, and what is done to the BatchNorm statistics of an averaged model."""

    def __init__(self, reference: Ingredient, bn_stats: BnStats, bn_batches: int, device: str | None) -> None:
        import torch

        from vision_transfer.app.checkpoints import recorded_datamodule
        from vision_transfer.tuning.averaging import has_batch_norm

        _check_bn_options(bn_stats, bn_batches)
        self.reference = reference
        self.has_bn = has_batch_norm(reference.model.backbone)
        self.bn_mode = bn_stats if self.has_bn else "none (no BatchNorm)"
        self.bn_batches = bn_batches
        self.batches_used = 0
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.metric = reference.model.task_kind.metric
        self.data = recorded_datamodule(reference.entry)
        self.data.setup("test")
        if "val" not in self.data.splits:
            raise DataError(
                f"{reference.path}: its data ({self.data.describe()}) has no validation split, which chooses here."
            )
        self._bn_data: ImageDataModule | None = None

    def bn_text(self, averaged: str) -> str:
        """What was done to the BatchNorm statistics, in words."""
        backbone = self.reference.entry.backbone
        if not self.has_bn:
            return f"{backbone} has no BatchNorm: no running statistics to recompute or interpolate"
        if self.bn_mode == "interpolate":
            return "running statistics averaged with the weights (--bn_stats interpolate)"
        if not self.batches_used:
            return f"running statistics to be recomputed for each {averaged}: none here (--bn_stats recompute)"
        return (
            f"running statistics recomputed for each {averaged} on {self.batches_used} training batches "
            "(train split, eval transform; --bn_stats recompute)"
        )

    def settle(self, model: ImageClassifier) -> int:
        """Recompute an averaged model's BatchNorm statistics (``--bn_stats recompute``); the batches run."""
        from vision_transfer.datamodules import ImageDataModule
        from vision_transfer.tuning.averaging import recompute_bn_statistics

        if self.bn_mode != "recompute":
            return 0
        if self._bn_data is None:
            # the training images as the model sees them at prediction time: statistics of augmented
            # images would not be those of the images it is evaluated and used on
            plain = {k: p.default for k, p in inspect.signature(ImageDataModule.__init__).parameters.items()}
            defaults = {k: plain[k] for k in ("scale_min", "hflip", "color_jitter") if k in plain}
            self._bn_data = self.data.with_options(augment=False, **defaults)
            self._bn_data.setup("fit")
        model.to(self.device)
        images = (model.preprocess(b[0].to(self.device)) for b in self._bn_data.train_dataloader())
        self.batches_used = recompute_bn_statistics(model, images, self.bn_batches)
        return self.batches_used

    def score(self, model: ImageClassifier, test: bool = True) -> Scores:
        """The task's metric (top-1 accuracy; multi-label: mAP) on val and test, as ``test`` logs it: on the
        logits predictions come from, of the plain view."""
        val, val_logits, val_labels = self._score(model, self.data.val_dataloader())
        test_score = None
        if test and "test" in self.data.splits:
            test_score = self._score(model, self.data.test_dataloader())[0]
        return Scores(val, test_score, val_logits, val_labels)

    def _score(self, model: ImageClassifier, loader: Any) -> tuple[float, torch.Tensor, torch.Tensor]:
        from vision_transfer.app.calibrate import collect_logits

        logits, labels = collect_logits(model, loader, self.device)
        plain = logits[0] if logits.ndim == 3 else logits  # (views, N, C) with test-time augmentation
        final = model.prediction_logits(plain.to(model.device)).cpu()
        scores = model.task_kind.scores(final, labels, model.thresholds.detach().cpu())
        return float(scores[self.metric]), logits, labels

    def mix(self, ingredients: Sequence[Ingredient], reference: Ingredient) -> tuple[ImageClassifier, int]:
        """The uniform average of the ingredients' backbones and heads, the rest (prediction buffers) of
        ``reference``, its BatchNorm statistics settled; and the batches that took."""
        from vision_transfer.tuning.averaging import average

        prefixes = ("backbone.", "head.")
        state = reference.model.state_dict()
        mixed = average(
            [_part(i.model.state_dict(), prefixes) for i in ingredients], names=[str(i.path) for i in ingredients]
        )
        work = copy.deepcopy(reference.model)
        work.load_state_dict({**state, **mixed})
        return work, self.settle(work)

    def write_soup(
        self, model: ImageClassifier, scores: Scores, target: Path, kept: Sequence[Ingredient], batches: int
    ) -> dict[str, Any]:
        calibration, line = self.finish(model, scores, target)
        return {
            "ingredients": [str(i.path) for i in kept],
            "val": scores.val,
            "test": scores.test,
            "bn_batches": batches,
            "checkpoint": str(target.resolve()),
            "calibration": calibration,
            "calibration_line": line,
        }

    def finish(self, model: ImageClassifier, scores: Scores, target: Path) -> tuple[dict[str, Any] | None, str]:
        """Re-calibrate the chosen model on val (or, with ``calibrate=False``, reset its temperature and
        thresholds) and write it as a checkpoint; the calibration report and its line."""
        from vision_transfer.app.calibrate import calibrate_model, calibration_line
        from vision_transfer.checkpoint import read_checkpoint, save_checkpoint, set_prediction

        model.cpu()
        calibration: dict[str, Any] | None = None
        if model.hparams.get("calibrate", True):
            report = calibrate_model(model, scores.val_logits, scores.val_labels)
            calibration = {k: v for k, v in report.items() if not k.startswith("reliability")}
            line = f"{calibration_line(report)} (fitted again: a calibration belongs to the weights it was fitted on)"
        else:
            model.temperature.fill_(1.0)
            model.thresholds.fill_(0.5)
            line = "temperature 1 and thresholds 0.5 (calibrate=False in the checkpoint's settings)"
        target.parent.mkdir(parents=True, exist_ok=True)
        model.save_standalone_checkpoint(target, self.data)
        if calibration is not None:  # the report, as `vision-transfer calibrate` records it
            _, content = read_checkpoint(target)
            set_prediction(content, model.prediction_settings(), calibration)
            save_checkpoint(content, target)
        return calibration, line


def _check_bn_options(bn_stats: str, bn_batches: int) -> None:
    if bn_stats not in ("recompute", "interpolate"):
        raise ConfigError(f"--bn_stats {bn_stats!r}: use recompute or interpolate.")
    if bn_batches < 1:
        raise ConfigError(f"--bn_batches {bn_batches}: recomputing the statistics needs at least one batch.")


def _write_report(report: dict[str, Any], path: Path) -> dict[str, Any]:
    from vision_transfer.files import write_atomic

    report = {**report, "report": str(path.resolve())}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(report, indent=2, default=float) + "\n").encode(), "report")
    return report
