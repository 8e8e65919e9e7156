"""ImageClassifier: a timm backbone plus a linear head, fine-tuned or linearly probed."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from vision_transfer.backbones import DataConfig, create_backbone
from vision_transfer.callbacks.checkpointing import AtomicCheckpointIO
from vision_transfer.data.dataset import FeatureBatch
from vision_transfer.data.transforms import Normalize
from vision_transfer.errors import CheckpointError, ConfigError, DataError, VisionTransferError
from vision_transfer.tuning import TuningConfig, TuningPolicy, build_param_groups
from vision_transfer.tuning.config import BnPolicy, Mode, Optimizer, Scheduler, Unit
from vision_transfer.tuning.schedule import constant_lr_lambdas, group_lr_lambdas

_D = TuningConfig()  # the one source of the tuning options' defaults


class ImageClassifier(pl.LightningModule):
    """A timm backbone and a linear head, trained in one of the tuning modes.

    Give the classes with ``class_names``, or let :func:`vision_transfer.connect` take them from
    the datamodule (the command line does it). Batches are ``(uint8 images, labels)`` from an
    image datamodule, or :class:`~vision_transfer.data.FeatureBatch` from a
    :class:`~vision_transfer.datamodules.CachedFeatureDataModule`, which only the head sees.

    Args:
        backbone: timm architecture name.
        weights: ``auto``, ``packaged``, ``timm``, ``timm:<tag>``, ``none`` or a file path.
        class_names: the classes, in head order; None: set by :func:`vision_transfer.connect`.
        image_size: square input size replacing the backbone's pretrained one.
        label_smoothing: cross-entropy label smoothing.
        drop_rate: dropout on the pooled features before the head (in every mode, cached features included).
        drop_path_rate: stochastic depth inside the backbone, where timm supports it.
        cache_features: ``linear_probe`` only: train and validate on cached features instead of
            running the frozen backbone every epoch (the command line wraps the datamodule in a
            ``CachedFeatureDataModule``; from Python, :func:`vision_transfer.connect` does).
        cache_dir: feature cache folder; None uses ``$VISION_TRANSFER_CACHE``.
        stop_on_nan: stop with a message (step, last good checkpoint) when the loss is NaN or inf,
            before the optimizer step that would spread it into the weights.
        channels_last: keep weights and batches in NHWC memory format; None: on CUDA only (2.4x
            faster bf16 training on an H200: benchmarks/RESULTS.md).
        compile: ``torch.compile`` the backbone when training starts (the first steps are slow).
        grad_checkpointing: recompute activations in the backward pass instead of storing them
            (timm's ``set_grad_checkpointing``): less memory for about a third more compute.
        data_config: preprocessing that replaces the one the weights imply (checkpoints record it).
        {tuning}
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        weights: str | None = "auto",
        mode: Mode = _D.mode,
        class_names: list[str] | None = None,
        image_size: int | None = None,
        optimizer: Optimizer = _D.optimizer,
        lr: float = _D.lr,
        head_lr: float | None = _D.head_lr,
        layer_decay: float = _D.layer_decay,
        weight_decay: float = _D.weight_decay,
        momentum: float = _D.momentum,
        warmup_epochs: float = _D.warmup_epochs,
        min_lr_ratio: float = _D.min_lr_ratio,
        label_smoothing: float = 0.1,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        bn: BnPolicy = _D.bn,
        trainable_groups: int = _D.trainable_groups,
        unfreeze_every: int = _D.unfreeze_every,
        unfreeze_milestones: list[int] | None = _D.unfreeze_milestones,
        milestone_unit: Unit = _D.milestone_unit,
        lp_epochs: int = _D.lp_epochs,
        rewarm: bool = _D.rewarm,
        scheduler: Scheduler = _D.scheduler,
        plateau_factor: float = _D.plateau_factor,
        plateau_patience: int = _D.plateau_patience,
        cache_features: bool = False,
        cache_dir: str | None = None,
        stop_on_nan: bool = True,
        channels_last: bool | None = None,
        compile: bool = False,
        grad_checkpointing: bool = False,
        data_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.tuning = TuningConfig.from_options(locals())
        if cache_features and mode != "linear_probe":
            raise ConfigError(f"cache_features=True needs mode='linear_probe' (got mode={mode!r}).")
        if not 0 <= drop_rate < 1:
            raise ConfigError(f"drop_rate={drop_rate}: must be in [0, 1).")
        self.save_hyperparameters()
        self.label_smoothing = label_smoothing
        kwargs: dict[str, Any] = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
        self.backbone, implied = create_backbone(backbone, weights, image_size=image_size, **kwargs)
        self.data_config = DataConfig.from_dict(data_config) if data_config else implied
        self.weights_source: dict[str, Any] = dict(self.backbone.pretrained_cfg["weights"])  # type: ignore[index]
        if grad_checkpointing:
            try:
                self.backbone.set_grad_checkpointing(True)  # type: ignore[operator]
            except (AssertionError, NotImplementedError) as e:
                raise ConfigError(f"grad_checkpointing: {backbone} does not support it ({e}).") from e
        self.policy = TuningPolicy(self.backbone, self.tuning)
        self.normalize = Normalize(self.data_config)
        self.dropout = nn.Dropout(drop_rate)
        self._announced = False
        self._handed_out = False  # True once connect() gave data_config to a datamodule
        self._pending_losses: list[tuple[torch.Tensor, torch.Tensor, Any]] = []
        self.class_names: list[str] | None = None
        self.head: nn.Module = nn.Identity()
        if class_names is not None:
            self.set_class_names(list(class_names))

    @property
    def backbone_name(self) -> str:
        return str(self.hparams["backbone"])

    # -- building ----------------------------------------------------------------------------
    def set_class_names(self, class_names: list[str]) -> None:
        """Build the head and metrics for these classes (once; :func:`vision_transfer.connect` calls it)."""
        if self.class_names is not None:
            if list(class_names) != self.class_names:
                raise DataError(
                    f"this model's classes are fixed ({_show(self.class_names)}); got {_show(class_names)}."
                )
            return
        if len(class_names) < 2:
            raise DataError(f"class_names={class_names}: a classifier needs at least 2 classes.")
        n = len(class_names)
        self.class_names = list(class_names)
        self.hparams["class_names"] = self.class_names
        self.head = nn.Linear(self.backbone.num_features, n)  # type: ignore[arg-type]
        metrics: dict[str, Metric | MetricCollection] = {
            "acc": MulticlassAccuracy(n, average="micro"),
            "acc_top5": MulticlassAccuracy(n, top_k=min(5, n), average="micro"),
            "f1_macro": MulticlassF1Score(n, average="macro"),
        }
        self.val_metrics = MetricCollection(metrics, prefix="val/")
        self.test_metrics = self.val_metrics.clone(prefix="test/")
        self.test_confusion = MulticlassConfusionMatrix(n)

    def configure_model(self) -> None:
        """Lightning calls this before callbacks copy the model (EMAWeightAveraging): the head must exist."""
        if self.class_names is None:
            raise ConfigError(
                "ImageClassifier has no classes: pass class_names=[...], or call "
                "vision_transfer.connect(model, datamodule) before the Trainer runs (the command line does it)."
            )

    def setup(self, stage: str) -> None:
        self.configure_model()
        if stage == "fit":
            self._check_ddp()
        # Lightning gives setup the target device already (self.device), before moving the model
        channels_last = self.hparams.get("channels_last")
        if channels_last or (channels_last is None and self.device.type == "cuda"):
            self.normalize.memory_format = torch.channels_last
            self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if self.hparams.get("compile") and stage == "fit" and not getattr(self, "_compiled", False):
            self.backbone.compile()  # in place: parameter names and checkpoints stay the same
            self._compiled = True

    def _check_ddp(self) -> None:
        # DDP must skip frozen parameters: they get no gradient while they are frozen.
        strategy = self.trainer.strategy
        freezes = any(start > 0 for start in self.policy.starts)
        find_unused = getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False)
        if freezes and type(strategy).__name__ in ("DDPStrategy",) and not find_unused:
            raise ConfigError(
                f"mode={self.hparams['mode']!r} freezes stage groups, which DDP must be told about: "
                "use --trainer.strategy ddp_find_unused_parameters_true."
            )

    # -- forward -----------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW batch (as the datamodules yield it) -> normalised float batch."""
        return self.normalize(images)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, FeatureBatch):
            return batch
        images, *rest = batch
        return (self.preprocess(images), *rest)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features; frozen stage groups run without autograd."""
        return self.policy.forward(images, self.training)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from pooled features (dropout first, in training)."""
        return self.head(self.dropout(features))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a normalised image batch."""
        return self.forward_head(self.forward_features(images))

    def _logits(self, batch: Any) -> torch.Tensor:
        if isinstance(batch, FeatureBatch):  # cached features: the backbone already ran
            return self.forward_head(batch.features.float())
        return self(batch[0])

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if mode:
            self.policy.apply_eval_modes()
        return self

    # -- unfreezing schedule -----------------------------------------------------------------
    def _sync_policy(self) -> None:
        """Set the trainable groups for the current epoch/step (also right after a resume)."""
        changed = self.policy.update(self.current_epoch, self.global_step)
        if changed or not self._announced:
            self._announced = True
            self.print(f"epoch {self.current_epoch}, step {self.global_step}: training {self.policy.describe()}")
        self._finish_probe_phase()

    def _finish_probe_phase(self) -> None:
        """LP-FT under ``plateau`` (which scales each group's learning rate in place): the head moves
        from ``head_lr`` to ``lr`` when the fine-tune starts, as the other schedulers' multipliers do.
        Applied once (the flag is saved with the optimizer state, so a resumed run does not apply it
        again)."""
        t = self.tuning
        if t.mode != "lp_ft" or t.scheduler != "plateau" or self.current_epoch < t.lp_epochs:
            return
        if self._trainer is None or not self.trainer.optimizers:
            return
        for group in self.trainer.optimizers[0].param_groups:
            if group.get("stage") == -1 and not group.get("finetune_phase"):
                group["lr"] *= t.lr / t.effective_head_lr
                group["finetune_phase"] = True

    def on_train_epoch_start(self) -> None:
        self._sync_policy()
        self.log("train/frozen_groups", float(self.policy.num_frozen))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.policy.milestone_unit == "step":
            self._sync_policy()

    def on_after_backward(self) -> None:
        self.policy.after_backward()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop on a non-finite loss before this step uses its gradients. On CUDA the loss's
        finiteness was copied to the host asynchronously, so waiting here for the forward pass
        (not for the backward pass queued behind it) keeps the GPU busy."""
        pending, self._pending_losses = self._pending_losses, []
        for flag, loss, event in pending:
            if event is not None:
                event.synchronize()
            if not bool(flag):
                self._stop_on_nan(loss)

    def _watch_loss(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach())
        if finite.device.type == "cuda":
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(finite, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending_losses.append((host, loss.detach(), event))
        else:
            self._pending_losses.append((finite, loss.detach(), None))

    # -- steps -------------------------------------------------------------------------------
    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        labels = batch[1]
        trains_bn = self.policy.num_frozen < len(self.policy.groups)
        if not isinstance(batch, FeatureBatch) and len(labels) < 2 and trains_bn:
            return None  # one image left after on_bad_image=skip: BatchNorm cannot train on it
        logits = self._logits(batch)
        loss = self._loss(logits, labels)
        if self.hparams.get("stop_on_nan", True):
            self._watch_loss(loss)
        acc = (logits.argmax(1) == labels).float().mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", acc, prog_bar=True)
        return loss

    def _stop_on_nan(self, loss: torch.Tensor) -> None:
        checkpoint = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or ""
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        raise VisionTransferError(
            f"training loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}); stopped before "
            f"the weights took it, and {kept}. Try a lower lr/head_lr, a longer warmup, or precision 32-true / "
            "bf16-mixed instead of 16-mixed."
        )

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        labels = batch[1]
        logits = self._logits(batch)
        self.log("val/loss", self._loss(logits, labels), prog_bar=True, sync_dist=True)
        self.val_metrics.update(logits, labels)
        self.log_dict(self.val_metrics, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Returns the logits, so callbacks (RunReport's worst images) can use them."""
        labels = batch[1]
        logits = self._logits(batch)
        self.log("test/loss", self._loss(logits, labels), sync_dist=True)
        self.test_metrics.update(logits, labels)
        self.test_confusion.update(logits, labels)
        self.log_dict(self.test_metrics)
        return logits

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Class probabilities of each image."""
        return self._logits(batch).softmax(dim=1)

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        t = self.tuning
        groups = build_param_groups(
            self.policy.groups, self.backbone, self.head, lr=t.lr, head_lr=t.effective_head_lr,
            layer_decay=t.layer_decay, weight_decay=t.weight_decay,
        )  # fmt: skip
        if t.optimizer == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=True)
        else:
            # fused: one kernel per parameter group on CUDA instead of a loop of small ones
            optimizer = torch.optim.AdamW(groups, lr=t.lr, fused=True if self.device.type == "cuda" else None)
        if t.scheduler == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=t.plateau_factor, patience=t.plateau_patience
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": "val/acc"}}
        total, per_epoch = self._schedule_length()
        starts = self.policy.start_steps(per_epoch)
        stages = [g["stage"] for g in groups]
        phase_start = starts[0] if t.mode == "lp_ft" else None
        if t.scheduler == "constant":
            lambdas = constant_lr_lambdas(stages, starts, phase_start, t.lr / t.effective_head_lr)
        else:
            lambdas = group_lr_lambdas(
                stages, starts, total_steps=total, warmup_steps=int(t.warmup_epochs * per_epoch),
                min_ratio=t.min_lr_ratio, rewarm=t.rewarm, phase_start=phase_start,
                head_scale_after_phase=t.lr / t.effective_head_lr,
            )  # fmt: skip
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _schedule_length(self) -> tuple[int, float]:
        """(optimizer steps in the whole run, optimizer steps per epoch), from the train dataloader.

        Steps per epoch are counted, not derived from ``total / max_epochs``: when ``max_steps``
        ends training before ``max_epochs``, epoch milestones (unfreezing, LP-FT's phase, warmup)
        must still fall where the policy switches, at epoch boundaries.
        """
        estimated = self.trainer.estimated_stepping_batches  # loads the train dataloader; inf with max_epochs=-1
        if not math.isfinite(estimated):
            if self.trainer.max_steps <= 0:
                raise ConfigError(
                    "scheduler='cosine' needs a known length: set --trainer.max_epochs or --trainer.max_steps "
                    "(or use --model.scheduler constant / plateau)."
                )
            estimated = self.trainer.max_steps
        total = max(1, int(estimated))
        batches = self.trainer.num_training_batches
        if not (isinstance(batches, (int, float)) and math.isfinite(batches) and batches > 0):
            return total, float(total)
        return total, float(math.ceil(batches / max(1, self.trainer.accumulate_grad_batches)))

    # -- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The state dict holds the trained weights: rebuilding needs no weights file or network;
        # the preprocessing those weights were trained with travels as an argument.
        hparams = checkpoint.get("hyper_parameters", {})
        checkpoint["hyper_parameters"] = {**hparams, "weights": "none", "data_config": self.data_config.to_dict()}
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        checkpoint["vision_transfer"] = self._checkpoint_meta(datamodule)

    def _checkpoint_meta(self, datamodule: Any = None) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "class_names": self.class_names,
            "data_config": self.data_config.to_dict(),
            "initial_weights": self.weights_source,
            "backbone": self.backbone_name,
            "task": "multiclass",
        }
        images = getattr(datamodule, "images", datamodule)  # a CachedFeatureDataModule records its images
        if images is not None and getattr(images, "hparams", None):
            cls = type(images)
            meta["datamodule"] = {
                "class_path": f"{cls.__module__}.{cls.__qualname__}",
                "init_args": {k: v for k, v in images.hparams.items() if not k.startswith("_")},
            }
        return meta

    def save_standalone_checkpoint(self, path: str | Path, datamodule: Any = None) -> Path:
        """Write a checkpoint without a Trainer (e.g. after a probe on cached features) that
        ``validate``/``test``/``predict`` and :func:`~vision_transfer.export.load_classifier` read."""
        hparams = {**dict(self.hparams), "weights": "none", "data_config": self.data_config.to_dict()}
        checkpoint: dict[str, Any] = {
            "state_dict": self.state_dict(),
            "hyper_parameters": hparams,
            "vision_transfer": self._checkpoint_meta(datamodule),
            "pytorch-lightning_version": pl.__version__,
            "epoch": 0,
            "global_step": 0,
        }
        path = Path(path)
        AtomicCheckpointIO().save_checkpoint(checkpoint, path)
        return path

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("vision_transfer", {})
        names = meta.get("class_names")
        if names is not None and self.class_names is not None and list(names) != self.class_names:
            raise DataError(
                f"checkpoint has {len(names)} classes ({_show(names)}), this model has "
                f"{len(self.class_names)} ({_show(self.class_names)})."
            )
        if "initial_weights" in meta:
            self.weights_source = meta["initial_weights"]
        if "data_config" in meta:
            self._adopt_data_config(DataConfig.from_dict(meta["data_config"]))

    def _adopt_data_config(self, config: DataConfig) -> None:
        if config == self.data_config:
            return
        if self._handed_out:
            raise CheckpointError(
                f"the checkpoint's preprocessing {config} differs from this model's {self.data_config}, which the "
                "datamodule already uses; build the model from the checkpoint (ImageClassifier.load_from_checkpoint, "
                "or data_config=...) before connecting it."
            )
        memory_format = self.normalize.memory_format
        self.data_config = config
        self.normalize = Normalize(config, memory_format).to(self.normalize.mean.device)


def _show(names: list[str]) -> str:
    return ", ".join(names[:5]) + ("..." if len(names) > 5 else "")


def _tuning_docs() -> str:
    """The Args lines of the tuning options, from TuningConfig's docstring (one source for both)."""
    doc = TuningConfig.__doc__ or ""
    block = doc.split("Attributes:", 1)[1] if "Attributes:" in doc else ""
    return re.sub(r"^ {8}", "        ", block.strip("\n"), flags=re.M).strip()


ImageClassifier.__doc__ = (ImageClassifier.__doc__ or "").replace("{tuning}", _tuning_docs())
