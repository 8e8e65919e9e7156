"""ImageClassifier: a timm backbone plus a linear head, fine-tuned or linearly probed."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from vision_transfer.backbones import DataConfig, create_backbone
from vision_transfer.data.transforms import Normalize
from vision_transfer.errors import DataError, VisionTransferError
from vision_transfer.tasks.checkpointing import AtomicCheckpointIO
from vision_transfer.tuning import TuningPolicy, build_param_groups
from vision_transfer.tuning.policy import BnPolicy, Mode, Unit
from vision_transfer.tuning.schedule import group_lr_lambdas

# Expected, not a problem: the model normalises batches after the transfer (on the device), and
# configure_model only builds the linear head (nothing that weight averaging cannot copy).
warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
warnings.filterwarnings(
    "ignore", message=".*WeightAveraging callback with a model that overrides the configure_model.*"
)


class ImageClassifier(pl.LightningModule):
    """A timm backbone and a linear head, trained in one of the tuning modes.

    Args:
        backbone: timm architecture name.
        weights: ``auto``, ``packaged``, ``timm``, ``timm:<tag>``, ``none`` or a file path.
        mode: ``linear_probe`` (backbone frozen, in eval mode, no gradient computed for it),
            ``full`` (everything trains), ``gradual`` (ULMFiT: head only, then one more stage
            group, top down, at each milestone), ``lp_ft`` (linear probe for ``lp_epochs``, then
            a full fine-tune from that head at ``lr``), ``partial`` (top ``trainable_groups`` only).
        class_names: the classes, in head order; None takes them from the datamodule.
        image_size: square input size replacing the backbone's pretrained one.
        optimizer: ``adamw`` or ``sgd`` (with Nesterov momentum).
        lr: learning rate of the backbone's top stage group.
        head_lr: learning rate of the head; None uses ``lr``.
        layer_decay: each stage group below the top gets ``lr`` times this, once more per step down.
        weight_decay: decoupled weight decay, not applied to biases and norm parameters.
        momentum: SGD momentum.
        warmup_epochs: linear warmup length, in (fractional) epochs, before the cosine decay.
        min_lr_ratio: the cosine schedule ends at this fraction of each group's learning rate.
        label_smoothing: cross-entropy label smoothing.
        drop_rate: dropout before the head.
        drop_path_rate: stochastic depth inside the backbone, where timm supports it.
        bn: ``frozen_stats`` (BatchNorm of frozen groups in eval mode, the default), ``train``
            (their running statistics keep updating) or ``frozen`` (every BatchNorm in eval mode).
        trainable_groups: ``partial``: how many top stage groups train.
        unfreeze_every: ``gradual``: one more group every this many epochs (or steps).
        unfreeze_milestones: ``gradual``: explicit epochs (or steps) instead.
        milestone_unit: ``epoch`` or ``step``, for the two options above.
        lp_epochs: ``lp_ft``: epochs of linear probing (at ``head_lr``) before the fine-tune.
        rewarm: restart the warmup for each group when it is unfrozen.
        scheduler: ``cosine`` (per step, with warmup, following the unfreezing schedule),
            ``plateau`` (ReduceLROnPlateau on ``val/acc``, per epoch) or ``constant``.
        plateau_factor: ``plateau``: factor applied to every group's learning rate.
        plateau_patience: ``plateau``: epochs without improvement before a reduction.
        cache_features: ``linear_probe`` only: train and validate on features from the feature
            cache (extracted once, reused by later runs and by ``vision-transfer probe``) instead of
            running the frozen backbone every epoch. Batches are then features, not images.
        cache_dir: feature cache folder; None uses ``$VISION_TRANSFER_CACHE``.
        channels_last: keep weights and batches in NHWC memory format (faster convolutions with
            mixed precision on recent GPUs).
        compile: ``torch.compile`` the backbone when training starts (the first steps are slow).
        grad_checkpointing: recompute activations in the backward pass instead of storing them
            (timm's ``set_grad_checkpointing``): less memory for about a third more compute.
        stop_on_nan: stop with a message (step, last good checkpoint) when the loss is NaN or inf;
            costs one device sync per step.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        weights: str | None = "auto",
        mode: Mode = "full",
        class_names: list[str] | None = None,
        image_size: int | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        head_lr: float | None = None,
        layer_decay: float = 1.0,
        weight_decay: float = 0.01,
        momentum: float = 0.9,
        warmup_epochs: float = 0.5,
        min_lr_ratio: float = 0.01,
        label_smoothing: float = 0.1,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        bn: BnPolicy = "frozen_stats",
        trainable_groups: int = 1,
        unfreeze_every: int = 1,
        unfreeze_milestones: list[int] | None = None,
        milestone_unit: Unit = "epoch",
        lp_epochs: int = 1,
        rewarm: bool = False,
        scheduler: Literal["cosine", "plateau", "constant"] = "cosine",
        plateau_factor: float = 0.3,
        plateau_patience: int = 2,
        cache_features: bool = False,
        cache_dir: str | None = None,
        stop_on_nan: bool = True,
        channels_last: bool = False,
        compile: bool = False,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if cache_features and mode != "linear_probe":
            raise VisionTransferError(f"cache_features=True needs mode='linear_probe' (got mode={mode!r}).")
        self.save_hyperparameters()
        self.label_smoothing = label_smoothing
        kwargs: dict[str, Any] = {"drop_rate": drop_rate}
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        self.backbone, self.data_config = create_backbone(backbone, weights, image_size=image_size, **kwargs)
        self.weights_source: dict[str, Any] = dict(self.backbone.pretrained_cfg["weights"])  # type: ignore[index]
        if grad_checkpointing:
            try:
                self.backbone.set_grad_checkpointing(True)  # type: ignore[operator]
            except (AssertionError, NotImplementedError) as e:
                raise VisionTransferError(f"grad_checkpointing: {backbone} does not support it ({e}).") from e
        self.policy = TuningPolicy(
            self.backbone,
            mode=mode,
            bn=bn,
            trainable_groups=trainable_groups,
            unfreeze_every=unfreeze_every,
            unfreeze_milestones=unfreeze_milestones,
            milestone_unit=milestone_unit,
            lp_epochs=lp_epochs,
        )
        self.normalize = Normalize(self.data_config)
        self._announced = False
        self.class_names: list[str] | None = None
        self.head: nn.Module = nn.Identity()
        if class_names is not None:
            self._build_head(list(class_names))

    # -- building ----------------------------------------------------------------------------
    def _build_head(self, class_names: list[str]) -> None:
        n = len(class_names)
        self.class_names = class_names
        self.hparams["class_names"] = class_names
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
        """Build the head from the datamodule's classes. Lightning calls this after the datamodule's
        setup and before callbacks copy the model (EMAWeightAveraging), so they see the head."""
        if self.class_names is not None:
            return
        names = getattr(getattr(self._trainer, "datamodule", None), "class_names", None)
        if names is None:
            raise DataError("ImageClassifier: class_names not given and the datamodule has none.")
        self._build_head(list(names))

    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None)
        self.configure_model()
        if stage == "fit":
            self._check_ddp()
        if self.hparams.get("channels_last"):
            self.normalize.memory_format = torch.channels_last
            self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if self.hparams.get("compile") and stage == "fit" and not getattr(self, "_compiled", False):
            self.backbone.compile()  # in place: parameter names and checkpoints stay the same
            self._compiled = True
        if self.hparams.get("cache_features") and stage in ("fit", "validate") and datamodule is not None:
            self._use_cached_features(datamodule)

    def _use_cached_features(self, datamodule: Any) -> None:
        """Swap the datamodule's train/val datasets for cached features of the same samples."""
        from torch.utils.data import TensorDataset

        from vision_transfer.features.cache import FeatureCache
        from vision_transfer.features.extract import FeatureExtractor, build_spec, extract_splits

        splits = {k: v for k, v in datamodule.splits.items() if k in ("train", "val")}
        spec = build_spec(self.hparams["backbone"], self.weights_source, self.data_config, splits)
        cache = FeatureCache(spec, self.hparams.get("cache_dir"))
        if not cache.is_complete():
            extractor = FeatureExtractor(self.backbone, self.data_config, self.device, "32")
            extract_splits(extractor, cache, splits, self.data_config, list(self.class_names or []))
            # the extractor made the backbone NHWC; back to the layout this model trains and tests in
            self.backbone.to(memory_format=self.normalize.memory_format)  # type: ignore[call-overload]
        for split in splits:
            features, labels = cache.load(split)
            datamodule.datasets[split] = TensorDataset(torch.from_numpy(features), torch.from_numpy(labels))

    def _check_ddp(self) -> None:
        # DDP must skip frozen parameters: they get no gradient while they are frozen.
        strategy = self.trainer.strategy
        freezes = any(start > 0 for start in self.policy.starts)
        find_unused = getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False)
        if freezes and type(strategy).__name__ in ("DDPStrategy",) and not find_unused:
            raise VisionTransferError(
                f"mode={self.hparams['mode']!r} freezes stage groups, which DDP must be told about: "
                "use --trainer.strategy ddp_find_unused_parameters_true."
            )

    # -- forward -----------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW batch (as the datamodules yield it) -> normalised float batch."""
        return self.normalize(images)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, *rest = batch
        return (self.preprocess(images), *rest)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features; frozen stage groups run without autograd."""
        return self.policy.forward(images, self.training)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim == 2:  # cached features (cache_features=True): the backbone already ran
            return self.head(images)
        return self.head(self.forward_features(images))

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

    def on_train_epoch_start(self) -> None:
        self._sync_policy()
        self.log("train/frozen_groups", float(self.policy.num_frozen))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.policy.milestone_unit == "step":
            self._sync_policy()

    def on_after_backward(self) -> None:
        self.policy.drop_frozen_grads()

    # -- steps -------------------------------------------------------------------------------
    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        images, labels = batch
        if len(labels) < 2 and self.training and self.policy.num_frozen < len(self.policy.groups):
            return None  # one image left after on_bad_image=skip: BatchNorm cannot train on it
        logits = self(images)
        loss = self._loss(logits, labels)
        if self.hparams.get("stop_on_nan", True) and not torch.isfinite(loss):
            self._stop_on_nan(loss)
        acc = (logits.argmax(1) == labels).float().mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", acc, prog_bar=True)
        return loss

    def _stop_on_nan(self, loss: torch.Tensor) -> None:
        checkpoint = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or ""
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        raise VisionTransferError(
            f"training loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}); stopped, and "
            f"{kept}. Try a lower lr/head_lr, a longer warmup, or precision 32-true / bf16-mixed instead of 16-mixed."
        )

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("val/loss", self._loss(logits, labels), prog_bar=True, sync_dist=True)
        self.val_metrics.update(logits, labels)
        self.log_dict(self.val_metrics, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Returns the logits, so callbacks (RunReport's worst images) can use them."""
        images, labels = batch
        logits = self(images)
        self.log("test/loss", self._loss(logits, labels), sync_dist=True)
        self.test_metrics.update(logits, labels)
        self.test_confusion.update(logits, labels)
        self.log_dict(self.test_metrics)
        return logits

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Class probabilities of each image."""
        return self(batch[0]).softmax(dim=1)

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        hp: Any = self.hparams
        groups = build_param_groups(
            self.policy.groups,
            self.backbone,
            self.head,
            lr=hp.lr,
            head_lr=hp.head_lr if hp.head_lr is not None else hp.lr,
            layer_decay=hp.layer_decay,
            weight_decay=hp.weight_decay,
        )
        if hp.optimizer == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.lr)
        if hp.scheduler == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=hp.plateau_factor, patience=hp.plateau_patience
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": "val/acc"}}
        if hp.scheduler == "constant":
            return optimizer
        estimated = self.trainer.estimated_stepping_batches  # inf with max_epochs=-1
        if not math.isfinite(estimated):
            if self.trainer.max_steps <= 0:
                raise VisionTransferError(
                    "scheduler='cosine' needs a known length: set --trainer.max_epochs or --trainer.max_steps "
                    "(or use --model.scheduler constant / plateau)."
                )
            estimated = self.trainer.max_steps
        total = max(1, int(estimated))
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else None
        batches = self.trainer.num_training_batches  # inf until the fit loop has its data
        per_epoch = total / epochs if epochs else (batches if math.isfinite(batches) and batches > 0 else total)
        starts = self.policy.start_steps(per_epoch)
        lambdas = group_lr_lambdas(
            [g["stage"] for g in groups],
            starts,
            total_steps=total,
            warmup_steps=int(hp.warmup_epochs * per_epoch),
            min_ratio=hp.min_lr_ratio,
            rewarm=hp.rewarm,
            phase_start=starts[0] if hp.mode == "lp_ft" else None,
            head_scale_after_phase=hp.lr / (hp.head_lr if hp.head_lr is not None else hp.lr),
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The state dict holds the trained weights: rebuilding needs no weights file or network.
        checkpoint["hyper_parameters"] = {**checkpoint.get("hyper_parameters", {}), "weights": "none"}
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        checkpoint["vision_transfer"] = self._checkpoint_meta(datamodule)

    def _checkpoint_meta(self, datamodule: Any = None) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "class_names": self.class_names,
            "data_config": self.data_config.to_dict(),
            "initial_weights": self.weights_source,
            "backbone": self.hparams["backbone"],
        }
        if datamodule is not None and datamodule.hparams:
            cls = type(datamodule)
            meta["datamodule"] = {
                "class_path": f"{cls.__module__}.{cls.__qualname__}",
                "init_args": {k: v for k, v in datamodule.hparams.items() if not k.startswith("_")},
            }
        return meta

    def save_standalone_checkpoint(self, path: str | Path, datamodule: Any = None) -> Path:
        """Write a checkpoint without a Trainer (e.g. after a probe on cached features) that
        ``validate``/``test``/``predict`` and :func:`~vision_transfer.export.load_classifier` read."""
        checkpoint: dict[str, Any] = {
            "state_dict": self.state_dict(),
            "hyper_parameters": {**dict(self.hparams), "weights": "none"},
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
                f"checkpoint has {len(names)} classes ({', '.join(names[:5])}...), this model has "
                f"{len(self.class_names)} ({', '.join(self.class_names[:5])}...)."
            )
        if "initial_weights" in meta:
            self.weights_source = meta["initial_weights"]
        if "data_config" in meta:
            self.data_config = DataConfig.from_dict(meta["data_config"])
