"""``vision-transfer fit|validate|test|predict``: LightningCLI with run defaults and checkpoint-driven configs."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace, lazy_instance
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_only

from vision_transfer.app.checkpoints import checkpoint_defaults
from vision_transfer.backbones import preprocessing
from vision_transfer.callbacks import (
    AtomicCheckpointIO,
    OutOfMemoryAdvice,
    PredictionWriter,
    RunCheckpoint,
    RunLogger,
    RunReport,
)
from vision_transfer.callbacks.checkpointing import newest_last_checkpoint
from vision_transfer.checkpoint import CheckpointEntry, read_checkpoint
from vision_transfer.datamodules import CachedFeatureDataModule, ImageDataModule
from vision_transfer.errors import CheckpointError, ConfigError, VisionTransferError
from vision_transfer.tasks import ImageClassifier

log = logging.getLogger(__name__)
SUBCOMMANDS = ("fit", "validate", "test", "predict")


class VisionTransferCLI(LightningCLI):
    """LightningCLI with run defaults (checkpoints, logs, plots) and checkpoint-driven configs.

    Given ``--ckpt_path``, the model and datamodule settings stored in that checkpoint become
    defaults that ``--config`` files and the command line still override. ``--ckpt_path last``
    is the newest ``last.ckpt`` of the run folder the logger settings name; ``fit`` then logs
    into that same folder, or starts a fresh run when there is none, so one command both starts
    and resumes a run. Model and datamodule are built whole, through argument links: the datamodule
    gets the model's preprocessing when the arguments are parsed (the checkpoint's, given
    ``--ckpt_path``), the model the datamodule's classes, task and training class counts when the
    datamodule is built; a checkpoint's classes and task go into the datamodule's arguments (its
    labels index them) and its class counts into the model's. A ``cache_features`` model trains on a
    :class:`~vision_transfer.datamodules.CachedFeatureDataModule` built over the datamodule.
    Unset ``trainer.precision`` is bf16-mixed on a CUDA GPU that has bf16 (16-mixed on older
    ones) and 32-true on the CPU. Only public LightningCLI hooks are overridden.
    """

    _resumed_step: int | None = None
    _ckpt_path: str | None = None
    _trained_counts: list[float] | None = None  # a checkpoint's training class counts

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
            # --optimizer/--lr_scheduler would replace configure_optimizers (head_lr, layer_decay,
            # no-decay groups, the unfreezing-aware schedule): not offered; parse_arguments explains
            auto_configure_optimizers=False,
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
        # built whole: the data gets the model's preprocessing at parse time, the model the data's classes
        parser.link_arguments(
            ("model.backbone", "model.weights", "model.image_size", "model.data_config"),
            "data.init_args.data_config",
            compute_fn=model_preprocessing,
            apply_on="parse",
        )
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.task", "model.task", apply_on="instantiate")
        parser.link_arguments("data", "model.class_counts", compute_fn=self._class_counts, apply_on="instantiate")

    def _class_counts(self, data: ImageDataModule) -> list[float]:
        """The model's ``class_counts``: a checkpoint's (a trained model's prior), else the data's training split's."""
        if self._trained_counts is not None:
            return self._trained_counts
        return [float(c) for c in data.class_counts()]

    # -- parsing -----------------------------------------------------------------------------
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        argv = list(args) if isinstance(args, list) else sys.argv[1:]  # args=None: the command line
        subcommand = argv[0] if argv and argv[0] in SUBCOMMANDS else None
        for flag in ("--optimizer", "--lr_scheduler"):
            if any(a == flag or a.startswith(flag + "=") or a.startswith(flag + ".") for a in argv):
                raise ConfigError(
                    f"{flag} would replace the model's optimizer and schedule (head_lr, layer_decay, no-decay groups, "
                    "the unfreezing-aware schedule); use --model.optimizer adamw|sgd, --model.lr, --model.head_lr, "
                    "--model.weight_decay and --model.scheduler cosine|plateau|constant instead."
                )
        ckpt = _flag_value(argv, "--ckpt_path")
        last = None
        if subcommand and ckpt == "last":
            self._parse(parser, argv)  # a first pass, for the run folder the settings name
            last = last_checkpoint(self.config[subcommand])
            ckpt = str(last[0]) if last[0] else None
        entry, checkpoint = read_checkpoint(ckpt) if subcommand and ckpt else (None, None)
        if subcommand and entry is not None:
            gives_data = any(a == "--data" or a.startswith("--data=") for a in argv)
            defaults = checkpoint_defaults(entry, with_data=not gives_data)
            # the checkpoint's settings as the first config: later --config files and flags override them
            argv = [subcommand, "--config", json.dumps(defaults), *argv[1:]]
            counts = checkpoint["state_dict"].get("class_counts") if checkpoint else None
            self._trained_counts = [float(c) for c in counts.tolist()] if counts is not None else None
        self._parse(parser, argv)
        if subcommand and entry is not None:
            _data_of_checkpoint(self.config[subcommand], entry)
        if subcommand and last:
            self._use_last_checkpoint(subcommand, *last, checkpoint)
        if subcommand:
            # LightningCLI would load the checkpoint's hyperparameters once more, over the command
            # line's values; they are already in, as defaults. Restored in before_instantiate_classes.
            self._ckpt_path = self.config[subcommand].ckpt_path
            self.config[subcommand].ckpt_path = None

    def _parse(self, parser: LightningArgumentParser, argv: list[str]) -> None:
        with warnings.catch_warnings(), _link_errors():  # argv is the command line itself, passed on as a list
            warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
            super().parse_arguments(parser, argv)

    def _use_last_checkpoint(
        self, subcommand: str, path: Path | None, version: int | None, searched: str, checkpoint: Any
    ) -> None:
        config = self.config[subcommand]
        config.ckpt_path = str(path) if path else None
        if path is None and subcommand != "fit":
            raise CheckpointError(f"--ckpt_path last: no last.ckpt in {searched}.")
        if subcommand == "fit" and path is not None:
            logger = config.trainer.logger
            logger = logger[0] if isinstance(logger, list) and logger else logger
            if version is not None and isinstance(logger, Namespace):
                logger.init_args.version = version  # log into the resumed run's folder
            self._resumed_step = int(checkpoint.get("global_step", 0))
        _print_once(f"resuming from {path}" if path else f"no last.ckpt in {searched}: starting a new run")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand:
            config.ckpt_path = self._ckpt_path
        if config.trainer.get("precision") is None:
            config.trainer.precision = default_precision(config.trainer.get("accelerator"))

    def instantiate_classes(self) -> None:
        with _link_errors():
            super().instantiate_classes()
        if self.model.hparams.get("cache_features"):
            self.datamodule = CachedFeatureDataModule(self.datamodule, self.model)
        checkpoint = self.trainer.checkpoint_callback
        if isinstance(checkpoint, RunCheckpoint) and checkpoint.monitor == "val/acc":
            checkpoint.monitor = self.model.monitor  # the default follows the task kind (multi-label: val/map)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # keep any other plugin given
            trainer.strategy.checkpoint_io = AtomicCheckpointIO("free some space, then add --ckpt_path last to resume")
        trainer.callbacks.append(OutOfMemoryAdvice())  # type: ignore[attr-defined]
        return trainer

    # -- running -----------------------------------------------------------------------------
    # LightningCLI runs a method named after the subcommand when the CLI has one: each runs the
    # Trainer's own, with the warnings that are expected here silenced for that call only
    def fit(self, model: ImageClassifier, **kwargs: Any) -> None:
        with _expected_warnings(resumed=self._resumed_step is not None):
            logger = self.trainer.logger
            if self._resumed_step is not None and isinstance(logger, RunLogger) and self.trainer.global_rank == 0:
                logger.keep_history_before(self._resumed_step)  # earlier metrics.csv rows stay
            self.trainer.fit(model, **kwargs)

    def validate(self, model: ImageClassifier, **kwargs: Any) -> Any:
        with _expected_warnings():
            return self.trainer.validate(model, **kwargs)

    def test(self, model: ImageClassifier, **kwargs: Any) -> Any:
        with _expected_warnings():
            return self.trainer.test(model, **kwargs)

    def predict(self, model: ImageClassifier, **kwargs: Any) -> Any:
        with _expected_warnings():
            return self.trainer.predict(model, **kwargs)

    def after_fit(self) -> None:
        if not self.config.fit.get("test_after_fit", True) or self.trainer.interrupted:
            return
        checkpoint = self.trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") or None
        if best and self.model.hparams.get("calibrate", True) and "val" in self.datamodule.splits:
            if self.trainer.global_rank == 0:
                from vision_transfer.app.calibrate import calibrate_checkpoint, calibration_line

                report = calibrate_checkpoint(best, self.datamodule, device=self.trainer.strategy.root_device)
                _print_once(calibration_line(report))
            self.trainer.strategy.barrier()  # every rank tests the calibrated checkpoint
        results = self.test(self.model, datamodule=self.datamodule, ckpt_path=best, weights_only=True)
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank must ask
        if self.trainer.global_rank == 0:
            print_summary(self.trainer, log_dir, results[0] if results else {}, best)

    def after_predict(self) -> None:
        writer = next((c for c in self.trainer.callbacks if isinstance(c, PredictionWriter)), None)  # type: ignore[attr-defined]
        if writer is not None and writer.path is not None and self.trainer.global_rank == 0:
            print(f"predictions: {writer.path.resolve()}")


def model_preprocessing(
    backbone: str, weights: str | None, image_size: int | None, data_config: dict[str, Any] | None
) -> dict[str, Any]:
    """The datamodule's ``data_config`` from the model's arguments (:func:`vision_transfer.backbones.preprocessing`)."""
    return preprocessing(backbone, weights, image_size, data_config).to_dict()


def _data_of_checkpoint(config: Namespace, entry: CheckpointEntry) -> None:
    """Put a checkpoint's classes and task into the parsed datamodule arguments (before anything is built):
    the labels index the trained head's classes. Classes given otherwise are refused."""
    data = config.get("data")
    init = data.get("init_args") if isinstance(data, Namespace) else None
    if init is None:
        return  # no datamodule given: instantiating says so
    given = init.get("classes")
    if given is not None and list(given) != entry.class_names:
        raise ConfigError(
            f"--data.init_args.classes {list(given)}: {entry.source} was trained on {entry.class_names}; "
            "drop the option (the checkpoint's classes are used)."
        )
    init["classes"], init["task"] = list(entry.class_names), entry.task  # arguments, before anything is built


@contextlib.contextmanager
def _link_errors() -> Iterator[None]:
    """A user error inside an argument link's computation as itself (jsonargparse wraps it in a ValueError)."""
    try:
        yield
    except ValueError as e:
        cause = e.__cause__
        if isinstance(cause, VisionTransferError):
            raise cause from None
        raise


@contextlib.contextmanager
def _expected_warnings(resumed: bool = False) -> Iterator[None]:
    """Silences, for one Trainer call, warnings about what this package does on purpose."""
    with warnings.catch_warnings():
        # the model normalises batches on the device, after the datamodule's transfer
        warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
        # configure_model only checks that the head exists: weight averaging copies it as it is
        warnings.filterwarnings("ignore", message=".*callback with a model that overrides the configure_model.*")
        if resumed:  # a resumed run logs into its own folder
            warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        yield


def default_precision(accelerator: Any) -> str | None:
    """bf16-mixed on a CUDA GPU with bf16 (16-mixed without), None (32-true) elsewhere."""
    if not torch.cuda.is_available() or (isinstance(accelerator, str) and accelerator not in ("auto", "gpu", "cuda")):
        return None
    precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    _print_once(f"precision {precision} (the default on this GPU; --trainer.precision 32-true to change it)")
    return precision


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


def run(args: list[str]) -> None:
    """Run ``fit``/``validate``/``test``/``predict`` with these command-line arguments."""
    VisionTransferCLI(args=args)


__all__ = ["VisionTransferCLI", "VisionTransferError", "last_checkpoint", "run"]
