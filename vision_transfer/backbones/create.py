"""Build timm backbones from any weight source, with the preprocessing config they expect."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, replace
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config

from vision_transfer.backbones.weights import (
    PACKAGED_WEIGHTS,
    RANDOM_INIT_SEED,
    WeightsSource,
    load_file,
    packaged_weights_path,
    remap_packaged,
    resolve_weights,
)
from vision_transfer.errors import UnknownBackboneError, WeightsError


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing a backbone expects; taken from timm's ``pretrained_cfg``."""

    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"

    @classmethod
    def from_model(cls, model: torch.nn.Module, image_size: int | None = None) -> DataConfig:
        cfg = resolve_model_data_config(model)
        config = cls(
            input_size=tuple(cfg["input_size"]),  # type: ignore[arg-type]
            mean=tuple(cfg["mean"]),  # type: ignore[arg-type]
            std=tuple(cfg["std"]),  # type: ignore[arg-type]
            interpolation=cfg.get("interpolation", "bicubic"),
            crop_pct=float(cfg.get("crop_pct", 0.875)),
            crop_mode=cfg.get("crop_mode", "center"),
        )
        return config.with_image_size(image_size) if image_size else config

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        return cls(**{**d, **{k: tuple(d[k]) for k in ("input_size", "mean", "std")}})

    def with_image_size(self, size: int) -> DataConfig:
        return replace(self, input_size=(self.input_size[0], size, size))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class BackboneInfo:
    """A backbone with weights usable on this machine without the network."""

    name: str
    weights: str
    path: str


def _check_name(name: str) -> None:
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownBackboneError(f"backbone={name!r} is not a timm model.{hint}")


def _classifier_keys(model: torch.nn.Module) -> tuple[str, ...]:
    cfg: dict[str, Any] = getattr(model, "pretrained_cfg", {})
    names = cfg.get("classifier", "")
    return tuple(names) if isinstance(names, (list, tuple)) else (names,)


def _load_weights(model: torch.nn.Module, name: str, source: WeightsSource) -> None:
    """Load a packaged or file state dict into a freshly built model with its full head."""
    assert source.kind in ("packaged", "file")
    state_dict = load_file(source.uri)
    if source.kind == "packaged":
        state_dict = remap_packaged(state_dict, model)
    # Our own checkpoints and exports store the backbone under "backbone."; accept them here too.
    if any(k.startswith("backbone.") for k in state_dict):
        state_dict = {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}
    own = model.state_dict()
    head = _classifier_keys(model)
    is_head = lambda k: any(k == h or k.startswith(h + ".") for h in head if h)  # noqa: E731
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape and not is_head(k)
    ]
    missing = [k for k in own if k not in state_dict and not is_head(k)]
    if wrong or missing:
        detail = "; ".join(wrong[:3]) or f"missing {', '.join(missing[:5])}"
        raise WeightsError(f"{source.uri}: weights do not fit {name} ({detail}).")
    # A head of another size (fine-tuned on another task) is dropped; the caller sets the head.
    usable = {k: v for k, v in state_dict.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(usable, strict=False)


def create_model(
    name: str,
    weights: str | None = "auto",
    *,
    num_classes: int | None = None,
    image_size: int | None = None,
    **timm_kwargs: Any,
) -> tuple[torch.nn.Module, DataConfig]:
    """Build timm model ``name`` with ``weights`` (see :func:`resolve_weights`).

    Args:
        num_classes: None keeps the pretrained classifier; 0 removes it (pooled features out).
        image_size: square input size that replaces the pretrained one in the data config.
        timm_kwargs: passed to ``timm.create_model`` (``drop_rate``, ``drop_path_rate``...).

    Returns:
        The model, with ``pretrained_cfg["weights"]`` recording the weights' provenance, and
        the data config its inputs need.
    """
    _check_name(name)
    if timm_kwargs.get("features_only"):
        return _create_features(name, weights, image_size, timm_kwargs)
    source = resolve_weights(name, weights)
    if source.kind == "timm":
        try:
            model = timm.create_model(source.uri, pretrained=True, **timm_kwargs)
        except Exception as e:  # hub errors vary: offline, unknown tag, auth
            raise WeightsError(
                f"could not load timm's pretrained weights for {source.uri} ({type(e).__name__}: {e}). "
                f"Weights available offline: {_offline_summary()}. Use weights='none' for random init "
                "or weights='<path>.safetensors' for a local file."
            ) from e
    elif source.kind == "none":
        with torch.random.fork_rng(devices=[]):  # leaves the caller's random state untouched
            torch.manual_seed(RANDOM_INIT_SEED)
            model = timm.create_model(name, pretrained=False, **timm_kwargs)
    else:
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
        _load_weights(model, name, source)
    if num_classes is not None:
        model.reset_classifier(num_classes)  # type: ignore[operator]
    pretrained_cfg: dict[str, Any] = getattr(model, "pretrained_cfg", {})
    setattr(model, "pretrained_cfg", {**pretrained_cfg, "weights": source.to_dict()})  # noqa: B010 (typed as Module attr)
    return model, DataConfig.from_model(model, image_size)


def _create_features(
    name: str, weights: str | None, image_size: int | None, timm_kwargs: dict[str, Any]
) -> tuple[torch.nn.Module, DataConfig]:
    """timm's ``features_only`` model, its weights copied from the full model of the same source."""
    feature_kwargs = {
        k: timm_kwargs.pop(k) for k in ("features_only", "out_indices", "feature_cls") if k in timm_kwargs
    }
    full, data_config = create_model(name, weights, num_classes=0, image_size=image_size, **timm_kwargs)
    features = timm.create_model(name, pretrained=False, **feature_kwargs, **timm_kwargs)
    missing, _ = features.load_state_dict(full.state_dict(), strict=False)
    if missing:
        raise WeightsError(f"{name}: features_only model has weights the full model lacks: {missing[:3]}.")
    features.pretrained_cfg = dict(full.pretrained_cfg)  # type: ignore[arg-type,assignment]
    return features, data_config


def resolve_data_config(name: str, source: WeightsSource, image_size: int | None = None) -> DataConfig:
    """The data config ``create_model(name, weights)`` gives, without building weights: from timm's
    ``pretrained_cfg`` of the source's tag (``timm:<tag>`` weights bring their tag's preprocessing)."""
    _check_name(name)
    with torch.device("meta"):  # no memory, no weights: only the config is wanted
        model = timm.create_model(source.uri if source.kind == "timm" else name, pretrained=False, num_classes=0)
    return DataConfig.from_model(model, image_size)


def preprocessing(
    backbone: str,
    weights: str | None = "auto",
    image_size: int | None = None,
    data_config: DataConfig | dict[str, Any] | None = None,
) -> DataConfig:
    """The preprocessing an ``ImageClassifier`` of these arguments uses, without building it: ``data_config``
    when given (a checkpoint's, or one chosen by hand), else the one its weights imply (timm's
    ``pretrained_cfg``, as :func:`create_backbone` resolves it) at ``image_size``.

    Give it to a datamodule (``data_config=...``) that a model of these arguments will train or predict on.
    """
    if data_config:
        return data_config if isinstance(data_config, DataConfig) else DataConfig.from_dict(data_config)
    return resolve_data_config(backbone, resolve_weights(backbone, weights), image_size)


def create_backbone(
    name: str,
    weights: str | None = "auto",
    *,
    image_size: int | None = None,
    **timm_kwargs: Any,
) -> tuple[torch.nn.Module, DataConfig]:
    """Build a headless timm backbone: ``model(x)`` returns pooled features of ``model.num_features``.

    See :func:`create_model` for the arguments; the ImageNet classifier is removed. With
    ``features_only=True`` (and optionally ``out_indices``) it returns timm's multi-scale
    feature-map model instead, loaded from the same weight source, for detectors and segmenters.
    """
    return create_model(name, weights, num_classes=0, image_size=image_size, **timm_kwargs)


def list_backbones() -> list[BackboneInfo]:
    """Backbones whose pretrained weights are usable here without the network."""
    found = [
        BackboneInfo(name, "packaged", str(path))
        for name in PACKAGED_WEIGHTS
        if (path := packaged_weights_path(name)) is not None
    ]
    try:
        from huggingface_hub import scan_cache_dir

        for repo in scan_cache_dir().repos:
            if repo.repo_id.startswith("timm/"):
                arch, _, tag = repo.repo_id.removeprefix("timm/").partition(".")
                found.append(BackboneInfo(arch, f"timm:{tag}" if tag else "timm", str(repo.repo_path)))
    except Exception:  # no cache directory yet, or an unreadable one: nothing cached
        pass
    return found


def _offline_summary() -> str:
    items = [f"{b.name} (weights='{b.weights}')" for b in list_backbones()]
    return ", ".join(items) if items else "none (pip install vision-transfer[weights])"
