"""int8 PyTorch: torch.ao quantization of a classifier (backbone + linear head), saved as TorchScript.

Two recipes, as fits the architecture (:func:`torch_recipes`):

- ``static``: FX graph-mode post-training quantization (oneDNN kernels; per-channel 7-bit weights, uint8
  activations, histogram-chosen ranges over the calibration images). Before tracing, timm's fused norm +
  activation layers become a plain ``BatchNorm2d`` and the activation (so each batch norm folds into the
  convolution before it), and TensorFlow-style dynamic "same" padding becomes the fixed padding of the export's
  input size; timm's other untraceable layers stay fp32 modules.
- ``dynamic``: int8 weights of the linear layers, activations quantized per batch as they come (no calibration):
  what fits transformers, whose weights are nearly all in linear layers and whose graphs FX often cannot trace.

Whatever follows the classifier (temperature, logit adjustment, test-time augmentation) stays fp32.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vision_transfer.errors import ConfigError, ExportError
from vision_transfer.export.quantize import MAX_DROP, Batches, check_int8_options, gate

FP32_FILE = "classifier.torchscript.pt"
TORCH_INT8_FILE = "classifier.int8.torchscript.pt"
TORCH_RECIPES = ("static", "dynamic")
# torch.ao's kernels. On an AMD EPYC without VNNI, lite0 at 64 px, batch 64: onednn 1,249-2,432 img/s, x86 and
# fbgemm 276-506, fp32 TorchScript 619-714. The engine is chosen when a file is loaded (it repacks the weights then), so
# the model card's code sets it too.
ENGINE = "onednn"
# 7-bit weights: no uint8 x int8 product saturates a 16-bit sum on CPUs without VNNI. With 8-bit weights the same
# lite0 lost 0.9 point (onednn) to 4.7 points (x86); with 7-bit it scored 0.917-0.919 val top-1 on every engine,
# fp32 0.916 (benchmarks/RESULTS.md).
WEIGHT_RANGE = (-64, 63)


def linear_share(model: nn.Module) -> float:
    """The share of ``model``'s convolution and linear weights held by linear layers."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    conv = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    return linear / (linear + conv) if linear + conv else 0.0


def torch_recipes(model: nn.Module) -> tuple[str, ...]:
    """The recipes to try for ``model``, in order: ``dynamic`` first when linear layers hold most of its
    weights (transformers, MLP-mixers), else ``static`` alone (``dynamic`` would quantize nothing but the
    classifier of a convolutional network)."""
    return ("dynamic", "static") if linear_share(model) > 0.5 else ("static",)


def quantize_torch(
    model: nn.Module, calibration: Iterable[torch.Tensor], input_size: tuple[int, int, int], recipe: str = "static"
) -> nn.Module:
    """An int8 copy of ``model`` (normalised float NCHW images of ``input_size`` -> logits) by ``recipe``;
    ``static`` records activation ranges over ``calibration`` (normalised float batches). ``model`` is left as
    it was. Raises ``ExportError`` naming the stage when the engine is missing, or when the model cannot be
    traced, calibrated, converted or run."""
    if recipe not in TORCH_RECIPES:
        raise ConfigError(f"int8 PyTorch recipe {recipe!r}: one of {', '.join(TORCH_RECIPES)}.")
    if ENGINE not in torch.backends.quantized.supported_engines:
        raise ExportError(
            f"int8 PyTorch: this PyTorch build lacks the {ENGINE} quantized engine (it has "
            f"{', '.join(torch.backends.quantized.supported_engines)}); --formats without torchscript writes the "
            "ONNX int8 model alone."
        )
    torch.backends.quantized.engine = ENGINE
    model = copy.deepcopy(model).cpu().eval()
    if recipe == "dynamic":
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                quantized = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
                with torch.inference_mode():
                    quantized(torch.zeros(1, *input_size))  # e.g. a layer that reads its Linear's .weight fails here
                return quantized
            except Exception as e:
                raise _refused("dynamic: torch.ao cannot quantize the model", e) from e
    from torch.ao.quantization import QConfig, get_default_qconfig_mapping
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.observer import HistogramObserver, PerChannelMinMaxObserver
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    _split_norm_act(model)
    example = torch.zeros(1, *input_size)
    _fix_same_padding(model, example)
    model.eval()  # the layers put in
    config = PrepareCustomConfig().set_non_traceable_module_classes(_untraceable())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices and observer notes
        try:
            qconfig = QConfig(
                activation=HistogramObserver.with_args(dtype=torch.quint8, reduce_range=False),
                weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                                          quant_min=WEIGHT_RANGE[0], quant_max=WEIGHT_RANGE[1]),
            )  # fmt: skip
            mapping = get_default_qconfig_mapping(ENGINE).set_global(qconfig)  # fixed ranges for sigmoid etc. kept
            prepared = prepare_fx(model, mapping, (example,), prepare_custom_config=config)
        except Exception as e:  # torch.fx's TraceError, or an error from a layer run on proxies
            raise _refused("static: torch.fx cannot trace the model", e) from e
        seen = 0
        try:
            with torch.inference_mode():
                for images in calibration:
                    prepared(images.float())
                    seen += len(images)
            if seen:
                quantized = convert_fx(prepared)
                with torch.inference_mode():
                    quantized(example)  # a layer it converts but cannot run fails here, not in the user's hands
        except Exception as e:  # a traced layer that does not run observed, converted or in int8
            raise _refused("static: torch.ao cannot quantize the model", e) from e
        if not seen:
            raise ExportError("int8 PyTorch static: no calibration images.")
        return quantized


def _refused(what: str, e: Exception) -> ExportError:
    """The refusal of a recipe that failed at ``what``, naming the error (its first line; torch.ao's bare
    ``assert`` has none)."""
    first = (str(e).splitlines() or [""])[0][:200]
    return ExportError(f"int8 PyTorch {what} ({type(e).__name__}{': ' + first if first else ''})")


def torch_int8_export(
    folder: str | Path,
    classifier: Any,
    calibration: Iterable[np.ndarray],
    validation: Batches,
    *,
    tta: str | None = None,
    max_drop: float = MAX_DROP,
    allow_drop: bool = False,
    recipes: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Quantize ``classifier`` (a :class:`~vision_transfer.export.loading.Classifier`) into ``folder``'s
    ``classifier.int8.torchscript.pt``: the same prediction graph as its fp32 ``classifier.torchscript.pt``
    (temperature, logit adjustment, ``tta``) around an int8 backbone and head, by each of ``recipes`` (default:
    :func:`torch_recipes`) until one keeps the validation score within ``max_drop`` points of the fp32 file's
    (:func:`~vision_transfer.export.quantize.gate`)."""
    from vision_transfer.export.exporter import prediction_graph
    from vision_transfer.export.loading import PlainClassifier

    check_int8_options(max_drop=max_drop)
    fp32 = Path(folder) / FP32_FILE
    if not fp32.is_file():
        raise ExportError(f"{fp32}: int8 PyTorch starts from the fp32 TorchScript export (add torchscript to formats).")
    plain = PlainClassifier(classifier.eval().cpu())
    size = tuple(classifier.data_config.input_size)
    images = [torch.from_numpy(np.asarray(batch, dtype=np.float32)) for batch in calibration]
    batches = list(validation)

    def write(recipe: str, path: Path) -> None:
        int8 = quantize_torch(plain, images, size, recipe)
        try:
            save_torchscript(prediction_graph(classifier, tta, int8), torch.zeros(2, *size), path)
        except Exception as e:  # a quantized layer TorchScript cannot trace: this recipe is refused, by name
            raise _refused(f"{recipe}: TorchScript cannot trace the int8 model", e) from e

    report = gate(fp32, Path(folder) / TORCH_INT8_FILE, recipes or torch_recipes(plain), write,
                  lambda path: torchscript_outputs(path, batches), batches, max_drop=max_drop,
                  allow_drop=allow_drop)  # fmt: skip
    return {**report, "engine": ENGINE}  # set it before torch.jit.load: the weights are packed for it then


def torchscript_outputs(path: str | Path, batches: Batches) -> tuple[np.ndarray, np.ndarray]:
    """The logits of every batch through the TorchScript file at ``path``, and the labels."""
    if ENGINE in torch.backends.quantized.supported_engines:  # an int8 file's weights are packed for it at load
        torch.backends.quantized.engine = ENGINE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 marks TorchScript deprecated, not gone
        model = torch.jit.load(str(path), map_location="cpu").eval()
    logits, labels = [], []
    with torch.inference_mode():
        for images, target in batches:
            logits.append(model(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))).float().numpy())
            labels.append(np.asarray(target))
    return np.concatenate(logits), np.concatenate(labels)


def save_torchscript(graph: nn.Module, example: torch.Tensor, path: Any) -> None:
    """Trace ``graph`` on ``example`` and save it as TorchScript (loads with ``torch.jit.load``, no toolkit)."""
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.jit.trace(graph, example, check_trace=False).save(str(path))


def _untraceable() -> list[type]:
    """timm's layers torch.fx cannot trace (they stay fp32 modules), but for its fused norm + activation
    layers, which :func:`_split_norm_act` has replaced."""
    from timm.layers import get_notrace_modules

    return [c for c in get_notrace_modules() if not issubclass(c, nn.modules.batchnorm._BatchNorm)]


def _split_norm_act(model: nn.Module) -> None:
    """Replace every timm ``BatchNormAct2d`` (a batch norm with its activation inside) by ``BatchNorm2d``
    then the activation: torch.ao folds a ``BatchNorm2d`` into the convolution before it, not timm's layer."""
    from timm.layers import BatchNormAct2d

    for name, module in list(model.named_modules()):
        if type(module) is not BatchNormAct2d:
            continue
        norm = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)  # fmt: skip
        norm.load_state_dict(module.state_dict(), strict=False)  # num_batches_tracked may be absent
        layers = [norm] + [m for m in (module.drop, module.act) if not isinstance(m, nn.Identity)]
        _replace(model, name, nn.Sequential(*layers).eval())


def _fix_same_padding(model: nn.Module, example: torch.Tensor) -> None:
    """Replace timm's TensorFlow-style ``Conv2dSame`` (padding computed from each input's size, which torch.fx
    cannot trace) by the fixed zero padding it computes at ``example``'s size, then a plain ``Conv2d``; and
    give every ``Conv2d(padding="same")`` (which torch.ao's int8 convolution does not take) its padding in
    numbers, the uneven kind as a ``ZeroPad2d`` before it."""
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import get_same_padding

    for name, module in list(model.named_modules()):
        if type(module) is nn.Conv2d and module.padding == "same" and module.padding_mode == "zeros":
            totals = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation, strict=True)]
            if all(t % 2 == 0 for t in totals):
                module.padding = (totals[0] // 2, totals[1] // 2)
            else:  # torch's "same" puts the odd pixel after, as ZeroPad2d's (left, right, top, bottom) below
                module.padding = (0, 0)
                pad = (totals[1] // 2, totals[1] - totals[1] // 2, totals[0] // 2, totals[0] - totals[0] // 2)
                _replace(model, name, nn.Sequential(nn.ZeroPad2d(pad), module))

    sizes: dict[str, tuple[int, int]] = {}
    hooks = [
        module.register_forward_pre_hook(lambda _, args, name=name: sizes.__setitem__(name, args[0].shape[-2:]))
        for name, module in model.named_modules()
        if isinstance(module, Conv2dSame)
    ]
    if not hooks:
        return
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    for name, (height, width) in sizes.items():
        same: Any = model.get_submodule(name)
        pads = [
            get_same_padding(size, k, s, d)
            for size, k, s, d in zip((height, width), same.kernel_size, same.stride, same.dilation, strict=True)
        ]
        conv = nn.Conv2d(same.in_channels, same.out_channels, same.kernel_size, same.stride, 0, same.dilation,
                         same.groups, same.bias is not None)  # fmt: skip
        conv.load_state_dict(same.state_dict())
        pad = (pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2)  # left right top bottom
        _replace(model, name, nn.Sequential(nn.ZeroPad2d(pad), conv) if any(pad) else conv)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
