"""ImageClassifier: a timm backbone plus a linear head, fine-tuned or linearly probed."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import nn

from vision_transfer.backbones import DataConfig, create_backbone
from vision_transfer.callbacks.nan_guard import StopOnNonFiniteLoss
from vision_transfer.checkpoint import CheckpointEntry, parse_checkpoint, save_checkpoint, write_entry
from vision_transfer.data.dataset import ModelBatch, as_model_batch
from vision_transfer.data.mixing import BatchMixer
from vision_transfer.data.transforms import Normalize
from vision_transfer.errors import CheckpointError, ConfigError
from vision_transfer.evaluation import EpochScores
from vision_transfer.evaluation.kinds import SINGLE, TaskKind, TaskOption, task_kind
from vision_transfer.files import paths_as_text
from vision_transfer.inference.outputs import PredictionHead, TtaMode, tta_views
from vision_transfer.losses import balanced_class_weights, log_prior
from vision_transfer.losses.distillation import Teacher, TeacherMemo, similarity_distillation
from vision_transfer.tuning import TuningConfig, TuningPolicy
from vision_transfer.tuning.adapters import AdapterSummary, apply_peft
from vision_transfer.tuning.config import BnPolicy, Mode, Optimizer, Peft, Scheduler, Unit

_D = TuningConfig()  # the one source of the tuning options' defaults


class ImageClassifier(pl.LightningModule):
    """A timm backbone and a linear head, trained in one of the tuning modes.

    Built whole: the classes, task, training class counts and preprocessing are constructor
    arguments, fixed from then on. :meth:`for_data` takes them from a datamodule (the command line
    links them the same way); a trained model gets them from its checkpoint. Batches are
    ``(uint8 images, labels)`` from an image datamodule (:class:`~vision_transfer.data.ImageBatch`), or
    :class:`~vision_transfer.data.FeatureBatch` from a
    :class:`~vision_transfer.datamodules.CachedFeatureDataModule`, which only the head sees.

    Args:
        backbone: timm architecture name.
        weights: ``auto``, ``packaged``, ``timm``, ``timm:<tag>``, ``none`` or a file path.
        class_names: the classes, in head order (the head is built with them); None: no head yet (the
            model cannot train or predict), as :meth:`for_data` and the command line never leave it.
        image_size: square input size replacing the backbone's pretrained one.
        task: ``multiclass`` (softmax, one class per image), ``multilabel`` (a sigmoid per class,
            any number of classes per image) or ``auto`` (``multiclass``; :meth:`for_data` gives the data's).
        label_smoothing: smoothing of every training target, mixed or not, focal loss included: towards
            ``1/C`` (multiclass) or 0.5 (multilabel); None: 0.1 for multiclass, 0 for multilabel heads.
        class_weighting: ``balanced`` weights the loss of each class by n / (C * n_c) (multiclass).
        logit_adjustment: for long-tailed classes (Menon et al. 2021): ``loss`` adds ``tau * log
            prior`` to the logits inside the loss (raw logits then score classes as if balanced);
            ``posthoc`` trains plainly and subtracts it at prediction time; ``none``.
        logit_adjustment_tau: the ``tau`` of ``logit_adjustment``.
        focal_gamma: > 0: focal loss with this gamma instead of cross-entropy (multiclass).
        asymmetric_loss: multilabel: the asymmetric loss (Ridnik et al. 2021) instead of BCE.
        mixup_alpha: mixup's Beta(alpha, alpha) (0: off); training batches only, metrics on hard labels.
        cutmix_alpha: CutMix's Beta(alpha, alpha) (0: off); with mixup, each batch uses one of the two.
        mix_prob: probability that a training batch is mixed at all.
        ema_decay: keep an exponential moving average of the weights (e.g. 0.999) and validate,
            test and save it (Lightning's ``EMAWeightAveraging``); None: off.
        tta: test-time augmentation for ``test`` and ``predict``: ``flip`` averages the
            probabilities of the image and its mirror, ``flip_zoom`` adds both zoomed by 15%;
            ``test`` logs the plain and the TTA metrics (``test/tta/...``) side by side.
        calibrate: after ``fit`` (and with ``vision-transfer calibrate``), fit a temperature on the
            validation split (multiclass) or per-class thresholds maximising F1 (multilabel);
            they travel in the checkpoint and the export.
        drop_rate: dropout on the pooled features before the head (in every mode, cached features included).
        drop_path_rate: stochastic depth inside the backbone, where timm supports it.
        cache_features: ``linear_probe`` only: train and validate on cached features instead of
            running the frozen backbone every epoch: give the Trainer
            ``CachedFeatureDataModule(data, model)`` (the command line builds it), which extracts with
            this model's backbone; image batches are refused in training.
        cache_dir: feature cache folder; None uses ``$VISION_TRANSFER_CACHE``.
        stop_on_nan: stop with a message (step, last good checkpoint) when the loss is NaN or inf,
            before the optimizer step that would spread it into the weights.
        channels_last: keep weights and batches in NHWC memory format; None: on CUDA only (2.4x
            faster bf16 training on an H200: benchmarks/RESULTS.md).
        compile: ``torch.compile`` the backbone when training starts (the first steps are slow).
        grad_checkpointing: recompute activations in the backward pass instead of storing them
            (timm's ``set_grad_checkpointing``): less memory for about a third more compute.
        teacher: distil from this trained classifier (a checkpoint, probe.ckpt or export folder of this
            toolkit; any backbone, its own preprocessing; the same classes): it sees each training view
            (augmented, mixed) resized to its input, without gradients; only its path is saved.
        kd_alpha: with ``teacher``: loss = (1 - kd_alpha) * task loss + kd_alpha * distillation loss.
        kd_temperature: with ``teacher``: the softening temperature T (the term is scaled by T^2).
        kd_feature_weight: with ``teacher``: add this weight times the feature distillation term, the
            similarity-preserving loss between the two models' pooled features (any sizes; 0: off).
        kd_cache: with ``teacher`` and fixed training views (``augment: none``, no mixing): the teacher runs
            once per training image, in the first epoch, and its outputs are reused after it; they are kept
            in ``cache_dir`` (default ``$VISION_TRANSFER_CACHE``) under a key of the teacher's weights, the
            student's preprocessing and the training split's content, so later runs (other seeds, a resume)
            do not run the teacher at all. Views that change between epochs are refused.
        data_config: preprocessing that replaces the one the weights imply (checkpoints record it); the
            datamodule must use the same (:meth:`for_data` gives the data's; ``setup`` checks them).
        class_counts: training samples (multi-label: positives) per class, in head order: the prior
            that class weighting and logit adjustment use (:meth:`for_data` counts the data's; a
            checkpoint's weights hold the counts it was trained with).
        {tuning}
    """

    # prediction buffers, made with the head (_build_head)
    class_counts: torch.Tensor
    temperature: torch.Tensor
    thresholds: torch.Tensor

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
        adam_betas: tuple[float, float] = _D.adam_betas,
        warmup_epochs: float = _D.warmup_epochs,
        min_lr_ratio: float = _D.min_lr_ratio,
        task: TaskOption = "auto",
        label_smoothing: float | None = None,
        class_weighting: Literal["none", "balanced"] = "none",
        logit_adjustment: Literal["none", "loss", "posthoc"] = "none",
        logit_adjustment_tau: float = 1.0,
        focal_gamma: float = 0.0,
        asymmetric_loss: bool = False,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        ema_decay: float | None = None,
        tta: TtaMode = "none",
        calibrate: bool = True,
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
        peft: Peft = _D.peft,
        lora_r: int = _D.lora_r,
        lora_alpha: float = _D.lora_alpha,
        lora_dropout: float = _D.lora_dropout,
        lora_dora: bool = _D.lora_dora,
        lora_targets: list[str] | None = _D.lora_targets,
        cache_features: bool = False,
        cache_dir: str | None = None,
        stop_on_nan: bool = True,
        channels_last: bool | None = None,
        compile: bool = False,
        grad_checkpointing: bool = False,
        teacher: str | None = None,
        kd_alpha: float = 0.5,
        kd_temperature: float = 2.0,
        kd_feature_weight: float = 0.0,
        kd_cache: bool = False,
        data_config: dict[str, Any] | None = None,
        class_counts: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.tuning = TuningConfig.from_options(locals())
        inert = self.tuning.inert_options() + [
            f"{text} (acts only with {context})"
            for text, cannot_act, context in (
                (f"logit_adjustment_tau={logit_adjustment_tau}",
                 logit_adjustment == "none" and logit_adjustment_tau != 1, "logit_adjustment='loss' or 'posthoc'"),
                (f"mix_prob={mix_prob}", not (mixup_alpha or cutmix_alpha) and mix_prob != 1,
                 "mixup_alpha or cutmix_alpha > 0"),
                (f"cache_dir={cache_dir!r}", cache_dir is not None and not (cache_features or kd_cache),
                 "cache_features=True or kd_cache=True"),
                (f"drop_path_rate={drop_path_rate}", bool(drop_path_rate and cache_features),
                 "a backbone that runs in training (cached features are extracted in eval mode)"),
                (f"grad_checkpointing={grad_checkpointing}", bool(grad_checkpointing and mode == "linear_probe"),
                 "a mode that trains the backbone"),
                (f"kd_alpha={kd_alpha}", teacher is None and kd_alpha != 0.5, "teacher"),
                (f"kd_temperature={kd_temperature}", teacher is None and kd_temperature != 2.0, "teacher"),
                (f"kd_feature_weight={kd_feature_weight}", teacher is None and kd_feature_weight != 0, "teacher"),
                (f"kd_feature_weight={kd_feature_weight}", bool(kd_feature_weight and mode == "linear_probe"),
                 "a mode that trains the backbone"),
                (f"kd_cache={kd_cache}", teacher is None and kd_cache, "teacher"),
            )
            if cannot_act
        ]  # fmt: skip
        if inert:
            raise ConfigError(f"{'; '.join(inert)}: set where it would change nothing; drop it or set what it needs.")
        if cache_features and (mode != "linear_probe" or peft != "none"):
            raise ConfigError(
                f"cache_features=True needs mode='linear_probe' (got mode={mode!r}, peft={peft!r}): cached features "
                "come from a backbone that does not train."
            )
        if not 0 <= drop_rate < 1:
            raise ConfigError(f"drop_rate={drop_rate}: must be in [0, 1).")
        if cache_features and (mixup_alpha or cutmix_alpha):
            raise ConfigError("mixup_alpha/cutmix_alpha mix images: they cannot be used with cache_features=True.")
        if teacher is not None and cache_features:
            raise ConfigError("teacher: the teacher sees the training images, which cache_features=True never loads.")
        if kd_cache and (mixup_alpha or cutmix_alpha):
            raise ConfigError("kd_cache reuses the teacher's outputs of fixed views; mixup_alpha/cutmix_alpha make "
                              "new views every step: drop one of them.")  # fmt: skip
        if not 0 < kd_alpha <= 1:
            raise ConfigError(f"kd_alpha={kd_alpha}: the distillation term's weight, in (0, 1].")
        if kd_temperature <= 0:
            raise ConfigError(f"kd_temperature={kd_temperature}: must be > 0.")
        if kd_feature_weight < 0:
            raise ConfigError(f"kd_feature_weight={kd_feature_weight}: the feature term's weight, >= 0.")
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ConfigError(f"ema_decay={ema_decay}: must be in (0, 1).")
        tta_views(torch.zeros(1, 3, 2, 2), tta)  # an unknown mode is refused here
        self.save_hyperparameters()
        paths_as_text(self.hparams)
        kwargs: dict[str, Any] = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
        self.backbone, implied = create_backbone(backbone, weights, image_size=image_size, **kwargs)
        self.data_config = DataConfig.from_dict(data_config) if data_config else implied
        if drop_path_rate and not _stochastic_depth_acts(self.backbone):
            raise ConfigError(
                f"drop_path_rate={drop_path_rate}: {backbone} has no residual block where stochastic depth "
                "applies (it would change nothing); drop it, or use drop_rate."
            )
        self.weights_source: dict[str, Any] = dict(self.backbone.pretrained_cfg["weights"])  # type: ignore[index]
        if grad_checkpointing:
            try:
                self.backbone.set_grad_checkpointing(True)  # type: ignore[operator]
            except (AssertionError, NotImplementedError) as e:
                raise ConfigError(f"grad_checkpointing: {backbone} does not support it ({e}).") from e
        t = self.tuning
        self.adapters: AdapterSummary | None = apply_peft(
            self.backbone, t.peft, self.data_config.input_size, r=t.lora_r, alpha=t.lora_alpha,
            dropout=t.lora_dropout, dora=t.lora_dora, targets=t.lora_targets,
        )  # fmt: skip
        self.policy = TuningPolicy(self.backbone, self.tuning)
        self.normalize = Normalize(self.data_config)
        self.dropout = nn.Dropout(drop_rate)
        self._announced = False
        self._loss_fn: nn.Module | None = None
        self._mixer: BatchMixer | None = None
        self._teacher: Teacher | None = None  # a plain attribute: never in the state dict or the optimizer
        self._memo: TeacherMemo | None = None  # kd_cache: the teacher's outputs of the training views
        self._memo_path: Path | None = None
        self.kind: TaskKind | None = None if task == "auto" else task_kind(task)
        self.class_names: list[str] | None = None
        self.head: nn.Module = nn.Identity()
        if class_names is not None:
            self._build_head(list(class_names))
        if class_counts is not None:
            if self.class_names is None or len(class_counts) != len(self.class_names):
                raise ConfigError(
                    f"class_counts has {len(class_counts)} values for {len(self.class_names or [])} class_names: "
                    "give one count per class (ImageClassifier.for_data counts the data's)."
                )
            self.class_counts.copy_(torch.as_tensor(class_counts, dtype=torch.float32))

    @classmethod
    def for_data(cls, data: Any, **options: Any) -> ImageClassifier:
        """A new model built for ``data``: its classes, task, training class counts and preprocessing are the
        datamodule's (what the command line links), and nothing is handed over later.

        Build the datamodule with the preprocessing of the backbone first, then the model::

            data = ImageFolderDataModule(root, data_config=preprocessing("tf_efficientnet_lite0", image_size=64))
            model = ImageClassifier.for_data(data, backbone="tf_efficientnet_lite0", mode="full")
            trainer.fit(model, data)  # cache_features=True: CachedFeatureDataModule(data, model)

        Args:
            data: an image datamodule (or a ``CachedFeatureDataModule``), built with ``data_config``; its
                source is read here for the classes and counts.
            options: the other constructor arguments (``backbone``, ``weights``, ``mode``...).
        """
        taken = sorted({"class_names", "task", "class_counts", "data_config"} & set(options))
        if taken:
            raise ConfigError(f"{', '.join(taken)}: for_data takes them from the datamodule; drop them here.")
        config: DataConfig | None = data.data_config
        if config is None:
            raise ConfigError(
                f"{data.describe()} has no data_config: build it with data_config=preprocessing(backbone, weights, "
                "image_size) (vision_transfer.backbones) before building the model for it."
            )
        size = options.get("image_size")
        if size is not None and config.input_size[1:] != (size, size):
            raise ConfigError(
                f"image_size={size}, but the datamodule's preprocessing is {config.input_size[1]} px; "
                f"give preprocessing(..., image_size={size}) to the datamodule."
            )
        counts = [float(c) for c in data.class_counts()]
        return cls(
            class_names=data.class_names, task=data.task, class_counts=counts, data_config=config.to_dict(), **options
        )

    @property
    def backbone_name(self) -> str:
        return str(self.hparams["backbone"])

    # -- building ----------------------------------------------------------------------------
    @property
    def task(self) -> str:
        """The task kind's name, or ``auto`` for a model built without classes or task."""
        return self.kind.name if self.kind is not None else "auto"

    @property
    def task_kind(self) -> TaskKind:
        """The task kind (single- or multi-label), once the task or the classes are set."""
        if self.kind is None:
            raise ConfigError("this model has no task: pass class_names=[...] (for_data gives the data's).")
        return self.kind

    @property
    def label_smoothing(self) -> float:
        """The ``label_smoothing`` option, or its per-task default when unset."""
        value = self.hparams.get("label_smoothing")
        return float(value) if value is not None else self.task_kind.default_label_smoothing

    def _build_head(self, class_names: list[str]) -> None:
        """The head, metrics and prediction buffers for these classes (a construction step)."""
        if len(class_names) < 2:
            raise ConfigError(f"class_names={class_names}: a classifier needs at least 2 classes.")
        if self.kind is None:
            self.kind = task_kind(SINGLE)
            self.hparams["task"] = self.kind.name
        hp: Any = self.hparams
        self.task_kind.check_loss_options(**{name: hp.get(name) for name in LOSS_OPTIONS})
        n = len(class_names)
        self.class_names = list(class_names)
        self.hparams["class_names"] = self.class_names
        self.head = nn.Linear(self.backbone.num_features, n)  # type: ignore[arg-type]
        # prediction settings: saved with the weights, restored with them, exported with them
        self.register_buffer("class_counts", torch.zeros(n))
        self.register_buffer("temperature", torch.ones(()))
        self.register_buffer("thresholds", torch.full((n,), 0.5))
        # one definition per number (evaluation.metrics), the same the probes, the grid and report use;
        # the scores gather every batch's logits (across DDP ranks too) and are computed once per epoch
        self.val_scores = EpochScores(self.task_kind, n)
        self.test_scores = EpochScores(self.task_kind, n, per_class=True)
        self.tta_scores = EpochScores(self.task_kind, n)

    @property
    def needs_class_counts(self) -> bool:
        """Whether the loss or the predictions use the training class counts (the prior)."""
        hp: Any = self.hparams
        return hp.get("class_weighting", "none") != "none" or hp.get("logit_adjustment", "none") != "none"

    @property
    def has_class_counts(self) -> bool:
        return self.class_names is not None and bool(self.class_counts.sum() > 0)

    @property
    def monitor(self) -> str:
        """The validation metric that chooses the best checkpoint and drives the plateau scheduler."""
        return self.task_kind.monitor

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self._loss_fn is None:
            hp: Any = self.hparams
            counts: torch.Tensor = self.class_counts  # type: ignore[assignment]
            has_counts = bool(counts.sum() > 0)
            if (hp.class_weighting != "none" or hp.logit_adjustment == "loss") and not has_counts:
                raise ConfigError(
                    "class_weighting / logit_adjustment need the training class counts: pass class_counts=[...] "
                    "(ImageClassifier.for_data counts the data's)."
                )
            self._loss_fn = self.task_kind.loss(
                self.label_smoothing,
                class_weight=balanced_class_weights(counts) if hp.class_weighting == "balanced" else None,
                logit_prior=hp.logit_adjustment_tau * log_prior(counts) if hp.logit_adjustment == "loss" else None,
                focal_gamma=hp.focal_gamma,
                asymmetric=hp.asymmetric_loss,
            ).to(self.device)
        return self._loss_fn(logits, target)

    def _mix(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup/CutMix of a training batch: (images, soft targets); unchanged when both are off."""
        hp: Any = self.hparams
        if not (hp.mixup_alpha or hp.cutmix_alpha):
            return images, labels
        if self._mixer is None:
            self._mixer = BatchMixer(
                len(self.class_names or []), hp.mixup_alpha, hp.cutmix_alpha, hp.mix_prob,
                multilabel=self.task_kind.multilabel,  # unsmoothed: the loss smooths every target, mixed or not
            )  # fmt: skip
        return self._mixer(images, labels)

    def configure_callbacks(self) -> list[pl.Callback]:
        callbacks: list[pl.Callback] = [StopOnNonFiniteLoss()] if self.hparams.get("stop_on_nan", True) else []
        decay = self.hparams.get("ema_decay")
        if decay is not None:
            from pytorch_lightning.callbacks import EMAWeightAveraging

            callbacks.append(EMAWeightAveraging(decay=decay))
        return callbacks

    def configure_model(self) -> None:
        """Lightning calls this before callbacks copy the model (EMAWeightAveraging): the head must exist."""
        if self.class_names is None:
            raise ConfigError(
                "ImageClassifier has no classes: pass class_names=[...], or build it with "
                "ImageClassifier.for_data(datamodule, ...) (the command line does it)."
            )

    def setup(self, stage: str) -> None:
        self.configure_model()
        # the preprocessing the datamodule was built with (Lightning sets the Trainer's datamodule attribute)
        config = getattr(getattr(self._trainer, "datamodule", None), "data_config", None)
        if config is not None and config != self.data_config:
            raise ConfigError(
                f"the datamodule preprocesses with {config}, this model with {self.data_config}; build the "
                "datamodule with the model's (preprocessing(...), or ImageClassifier.for_data(datamodule))."
            )
        datamodule = getattr(self._trainer, "datamodule", None)
        if stage == "fit" and self.hparams.get("cache_features") and not getattr(datamodule, "yields_features", True):
            raise ConfigError(
                "cache_features=True trains on cached features: give the Trainer CachedFeatureDataModule(data, model) "
                "instead of the image datamodule (the command line does it)."
            )
        if stage == "fit":
            self._check_ddp()
            teacher = self.hparams.get("teacher")
            if teacher is not None and self._teacher is None:
                self._teacher = Teacher(teacher, list(self.class_names or []), self.task_kind)
                features = self.hparams.get("kd_feature_weight")
                cached = self._open_memo(datamodule) if self.hparams.get("kd_cache") else ""
                self.print(f"distilling from {self._teacher.describe()}: kd_alpha={self.hparams['kd_alpha']}, "
                           f"kd_temperature={self.hparams['kd_temperature']}"
                           + (f", kd_feature_weight={features}" if features else "") + cached)  # fmt: skip
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

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> ModelBatch:
        """Images normalised (features as they are); the steps then ask the batch, never its kind."""
        return as_model_batch(batch).prepared(self)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features; frozen stage groups run without autograd."""
        return self.policy.forward(images, self.training)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from pooled features (dropout first, in training)."""
        return self.head(self.dropout(features))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a normalised image batch."""
        return self.forward_head(self.forward_features(images))

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
            adapters = f"; {self.adapters.describe()}" if self.adapters is not None else ""
            self.print(
                f"epoch {self.current_epoch}, step {self.global_step}: training {self.policy.describe()}{adapters}"
            )
        if self._trainer is not None and self.trainer.optimizers:  # LP-FT's head rate under plateau
            self.policy.finish_probe_phase(self.trainer.optimizers[0], self.current_epoch)

    def on_train_epoch_start(self) -> None:
        self._sync_policy()
        self.log("train/frozen_groups", float(self.policy.num_frozen))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.policy.milestone_unit == "step":
            self._sync_policy()

    def on_after_backward(self) -> None:
        self.policy.after_backward()

    # -- steps -------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        batch = as_model_batch(batch)  # also a plain (images, labels) pair, called directly
        labels = batch.labels
        if len(labels) < 2 and self.policy.num_frozen < len(self.policy.groups):
            return None  # one image left after on_bad_image=skip: BatchNorm cannot train on it
        inputs, target = batch.mixed(self._mix)
        if self._teacher is not None:  # the teacher sees the same (augmented, mixed) view
            features = self.forward_features(inputs.images)  # type: ignore[union-attr]
            logits = self.forward_head(features)
            loss = self._distil(self._loss(logits, target), logits, features, inputs.images)  # type: ignore[union-attr]
        else:
            logits = inputs.logits(self)
            loss = self._loss(logits, target)
        self.log("train/loss", loss, prog_bar=True)
        # scores on the hard labels, also when the loss saw mixed targets
        self.log_dict({f"train/{k}": v for k, v in self.task_kind.train_scores(logits, labels).items()}, prog_bar=True)
        return loss

    def _distil(
        self, loss: torch.Tensor, logits: torch.Tensor, features: torch.Tensor, views: torch.Tensor
    ) -> torch.Tensor:
        """``(1 - kd_alpha) * loss + kd_alpha * kd_loss (+ kd_feature_weight * feature term)`` against the
        teacher's logits (and pooled features) of ``views``; ``features``: the student's pooled features."""
        assert self._teacher is not None
        hp: Any = self.hparams
        teacher = self._teacher if self._teacher.mean.device == self.device else self._teacher.to(self.device)
        mean, std = self.normalize.mean.flatten() / 255, self.normalize.std.flatten() / 255
        if self._memo is not None:
            taught, target = self._memo.outputs(teacher, views, mean, std)
        else:
            taught, target = teacher.outputs(views, mean, std)
        distil = self.task_kind.distillation_loss(logits, target, hp.kd_temperature)
        self.log("train/kd_loss", distil)
        total = (1 - hp.kd_alpha) * loss + hp.kd_alpha * distil
        if hp.get("kd_feature_weight"):  # absent from checkpoints written before it existed
            alike = similarity_distillation(features, taught)
            self.log("train/kd_feature_loss", alike)
            total = total + hp.kd_feature_weight * alike
        return total

    def _open_memo(self, datamodule: Any) -> str:
        """kd_cache: refuse views that change between epochs, start the memo and read the outputs an earlier
        run kept; what the announcement adds."""
        assert self._teacher is not None
        augment = getattr(datamodule, "hparams", {}).get("augment", "none")
        if augment not in (False, "none"):
            raise ConfigError(
                f"kd_cache: the datamodule augments (augment={augment!r}), so each epoch's views are new and no "
                "teacher output could be reused; set augment: none, or drop kd_cache (the teacher then runs on "
                "every view)."
            )
        splits = getattr(datamodule, "splits", None) or {}
        train = splits.get("train")
        self._memo = TeacherMemo(features=bool(self.hparams.get("kd_feature_weight")),
                                 limit=len(train) if train is not None else None)  # fmt: skip
        if train is None:
            return ", kd_cache (in memory: this data has no training split to key a file on)"
        from vision_transfer.backbones import state_fingerprint
        from vision_transfer.features.cache import FeatureSpec, default_root

        teacher = self._teacher
        spec = FeatureSpec(
            backbone=str(teacher.model.architecture),
            weights={"kind": "teacher", "sha256": state_fingerprint(teacher.model)},
            data_config=self.data_config.to_dict(),
            features="teacher_logits+pooled" if self._memo.features else "teacher_logits",
            dtype="float32",
            precision=str(self.trainer.precision),
        )
        root = Path(self.hparams.get("cache_dir") or default_root())
        self._memo_path = root / "teacher" / f"{spec.key(train.fingerprint())}.safetensors"
        read = self._memo.load(self._memo_path) if self._memo_path.is_file() else 0
        return (
            f", kd_cache ({read} teacher outputs read from {self._memo_path})"
            if read
            else (f", kd_cache (kept in {self._memo_path})")
        )

    def on_train_start(self) -> None:
        if self._memo is not None and self._memo.limit is None:  # data without a split to count: the loader's
            self._memo.limit = _length(getattr(self.trainer.train_dataloader, "dataset", None))

    def on_train_epoch_end(self) -> None:
        """kd_cache: share the outputs each rank computed this epoch and keep them on disk (rank 0)."""
        if self._memo is None:
            return
        added = self._memo.take_added()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, added)
            for entries in gathered:
                self._memo.merge(entries)
            added = {key: value for entries in gathered for key, value in entries.items()}
        if added and self._memo_path is not None and self.global_rank == 0:
            self._memo.save(self._memo_path)

    def _scores_input(self, logits: torch.Tensor, final: bool = False) -> torch.Tensor:
        """What the scores count: the logits predictions come from (post-hoc adjustment and temperature;
        ``final``: already applied, as :meth:`tta_logits` returns)."""
        return logits.float() if final else self.prediction_logits(logits)

    def _log_scores(self, scores: EpochScores, prefix: str, prog_bar: bool = False) -> dict[str, torch.Tensor]:
        scores.thresholds.copy_(self.thresholds)  # the thresholds the model holds now (after calibration)
        values = scores.compute()
        scores.reset()
        scalars = {f"{prefix}{k}": v.float() for k, v in values.items() if v.ndim == 0}
        self.log_dict(scalars, prog_bar=prog_bar)
        return values

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        batch = as_model_batch(batch)  # also a plain (images, labels) pair, called directly
        labels = batch.labels
        logits = batch.logits(self)
        self.log("val/loss", self._loss(logits, labels), prog_bar=True, sync_dist=True)
        self.val_scores.update(self._scores_input(logits), labels)

    def on_validation_epoch_end(self) -> None:
        self._log_scores(self.val_scores, "val/", prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Returns the logits, so callbacks (RunReport's worst images) can use them."""
        batch = as_model_batch(batch)  # also a plain (images, labels) pair, called directly
        labels = batch.labels
        logits = batch.logits(self)
        self.log("test/loss", self._loss(logits, labels), sync_dist=True)
        self.test_scores.update(self._scores_input(logits), labels)
        views = batch.tta_logits(self) if self.hparams.get("tta", "none") != "none" else None
        if views is not None:
            self.tta_scores.update(self._scores_input(views, final=True), labels)
        return logits

    def on_test_epoch_end(self) -> None:
        self.test_per_class = self._log_scores(self.test_scores, "test/")
        if self.tta_scores.update_count:
            self._log_scores(self.tta_scores, "test/tta/")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Final probabilities of each image: calibrated, logit-adjusted and averaged over TTA views
        as configured (multilabel: one sigmoid per class)."""
        batch = as_model_batch(batch)  # also a plain (images, labels) pair, called directly
        return self.task_kind.probabilities(batch.final_logits(self))

    # -- predictions -------------------------------------------------------------------------
    def logit_shift(self) -> torch.Tensor | None:
        """Post-hoc logit adjustment: ``-tau * log prior``, or None."""
        hp: Any = self.hparams
        if hp.get("logit_adjustment") != "posthoc":
            return None
        if not self.has_class_counts:  # a constant shift would adjust nothing, silently
            raise ConfigError(
                "logit_adjustment='posthoc' needs the training class counts: pass class_counts=[...] "
                "(ImageClassifier.for_data counts the data's)."
            )
        return -hp.logit_adjustment_tau * log_prior(self.class_counts)  # type: ignore[arg-type]

    def prediction_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Raw logits -> the logits predictions come from (post-hoc adjustment, then temperature)."""
        shift = self.logit_shift()
        logits = logits.float() if shift is None else logits.float() + shift
        return logits / self.temperature

    def tta_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Prediction logits of a normalised batch, averaged in probability over the TTA views
        (the same :class:`~vision_transfer.inference.PredictionHead` the exports bake in)."""
        head = PredictionHead(self, self.task_kind, 1.0, self.logit_shift(), self.hparams.get("tta", "none"))
        head.temperature = self.temperature
        return head(images)

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """The tuning policy's optimizer and schedule (:meth:`TuningPolicy.configure_optimizers`)."""
        return self.policy.configure_optimizers(
            self.head, self._schedule_length, self.monitor, fused=self.device.type == "cuda"
        )

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

    # -- checkpoints (the format: vision_transfer.checkpoint) ---------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        write_entry(checkpoint, **self._entry_fields())

    def _entry_fields(self, datamodule: Any = None) -> dict[str, Any]:
        """What :func:`~vision_transfer.checkpoint.write_entry` saves of this model; the datamodule (default:
        the Trainer's) is recorded so ``validate``/``test``/``predict --ckpt_path`` need no data options."""
        if self.class_names is None:
            raise ConfigError("cannot save a model without classes: pass class_names (or use for_data).")
        if datamodule is None and self._trainer is not None:
            datamodule = getattr(self._trainer, "datamodule", None)
        return {
            "settings": dict(self.hparams),
            "class_names": self.class_names,
            "task": self.task,
            "data_config": self.data_config,
            "initial_weights": self.weights_source,
            "prediction": self.prediction_settings(),
            "datamodule": _datamodule_record(datamodule),
        }

    def prediction_settings(self) -> dict[str, Any]:
        """What turns this model's logits into its predictions (checkpoint meta, export config.json)."""
        hp: Any = self.hparams
        settings: dict[str, Any] = {"task": self.task, "tta": hp.get("tta", "none")}
        if self.class_names is None:
            return settings
        settings |= self.task_kind.prediction_settings(self.temperature, self.thresholds)
        if hp.get("logit_adjustment") == "posthoc":
            shift = self.logit_shift()
            settings["logit_shift"] = [float(v) for v in shift] if shift is not None else None
        return settings

    def save_standalone_checkpoint(self, path: str | Path, datamodule: Any = None) -> Path:
        """Write a checkpoint without a Trainer (e.g. after a probe on cached features) that
        ``validate``/``test``/``predict`` and :func:`~vision_transfer.export.load_classifier` read."""
        content = {
            "state_dict": self.state_dict(),
            "pytorch-lightning_version": pl.__version__,
            "epoch": 0,
            "global_step": 0,
        }
        return save_checkpoint(write_entry(content, **self._entry_fields(datamodule)), path)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self._trainer  # None in load_from_checkpoint, which does not say which file it read
        source = str(trainer.ckpt_path) if trainer is not None and trainer.ckpt_path else "checkpoint"
        self.adopt_checkpoint(parse_checkpoint(checkpoint, source))

    def adopt_checkpoint(self, entry: CheckpointEntry) -> None:
        """Before a checkpoint's weights load: check that its classes, task and preprocessing are this model's
        (it was built with them: from the checkpoint's settings, or a datamodule built with them), and take
        its initial-weights record."""
        if self.class_names is not None and entry.class_names != self.class_names:
            raise CheckpointError(
                f"{entry.source}: has {len(entry.class_names)} classes ({_show(entry.class_names)}), this model has "
                f"{len(self.class_names)} ({_show(self.class_names)})."
            )
        if self.kind is not None and entry.task != self.task:
            raise CheckpointError(f"{entry.source}: is a {entry.task} model, this model is {self.task}.")
        if entry.data_config != self.data_config:
            raise CheckpointError(
                f"{entry.source}: its preprocessing {entry.data_config} differs from {self.data_config}, which this "
                "model and its datamodule were built with; build the datamodule with data_config=the checkpoint's "
                "(the command line does it with --ckpt_path)."
            )
        self.weights_source = dict(entry.initial_weights)


LOSS_OPTIONS = ("class_weighting", "focal_gamma", "logit_adjustment", "asymmetric_loss")


def _datamodule_record(datamodule: Any) -> dict[str, Any] | None:
    """The image datamodule's class and arguments (a ``CachedFeatureDataModule`` records its images); its
    preprocessing, classes and task are not among them: the model's settings hold them."""
    images = getattr(datamodule, "images", datamodule)
    if images is None or not getattr(images, "hparams", None):
        return None
    cls = type(images)
    return {
        "class_path": f"{cls.__module__}.{cls.__qualname__}",
        "init_args": {k: v for k, v in images.hparams.items() if not k.startswith("_")},
    }


def _stochastic_depth_acts(backbone: nn.Module) -> bool:
    """Whether a timm ``DropPath`` with a rate sits where it runs: timm builds one in every block, but a
    block without a skip connection (``has_skip`` False, e.g. EfficientNet's stride/width changes) skips it.
    A backbone with no ``DropPath`` module (stochastic depth written as a function) is given the benefit."""
    from timm.layers import DropPath

    modules = dict(backbone.named_modules())
    droppers = [name for name, m in modules.items() if isinstance(m, DropPath) and m.drop_prob > 0]
    return not droppers or any(
        getattr(modules.get(name.rpartition(".")[0]), "has_skip", True) is not False for name in droppers
    )


def _show(names: list[str]) -> str:
    return ", ".join(names[:5]) + ("..." if len(names) > 5 else "")


def _tuning_docs() -> str:
    """The Args lines of the tuning options, from TuningConfig's docstring (one source for both)."""
    doc = TuningConfig.__doc__ or ""
    block = doc.split("Attributes:", 1)[1] if "Attributes:" in doc else ""
    return re.sub(r"^ {8}", "        ", block.strip("\n"), flags=re.M).strip()


ImageClassifier.__doc__ = (ImageClassifier.__doc__ or "").replace("{tuning}", _tuning_docs())


def _length(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # an iterable dataset, or none
        return None
