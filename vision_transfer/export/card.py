"""The model card: ``README.md`` in every export folder, what a person reads first and the metadata block the
Hugging Face Hub reads (``hf upload`` publishes the folder as it is).

It says what the model is (architecture, initial weights and their checksum, classes, preprocessing), how it
was trained (the recorded data, split sizes and class balance, the recipe), what it scores (val/test through
the exported prediction graph, the weakest classes, calibration), what it is not for, and how to load it (this
toolkit, plain timm, ONNX Runtime) with code a test runs. Sections without a source (an export of pretrained
ImageNet weights has no training data) say so instead of guessing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

CARD = "README.md"
INT8_METHODS = {"onnx": "ONNX Runtime static quantization", "torchscript": "torch.ao quantization (TorchScript)"}
IMAGE_PLACEHOLDER = 'IMAGE = "path/to/image.jpg"'  # the one line a reader (and the test) replaces
RECIPE_KEYS = (
    "mode", "peft", "lora_r", "optimizer", "lr", "head_lr", "weight_decay", "scheduler", "warmup_epochs",
    "layer_decay", "label_smoothing", "mixup_alpha", "cutmix_alpha", "drop_path_rate", "ema_decay",
    "class_weighting", "logit_adjustment", "asymmetric_loss", "tta",
)  # fmt: skip


def _timm_cfg(architecture: str) -> Any:
    """timm's pretrained config of ``architecture`` (None for a name timm does not know)."""
    import timm

    try:
        return timm.models.get_pretrained_cfg(architecture)
    except (RuntimeError, ValueError):
        return None


def _front_matter(architecture: str, kind: Any, metrics: Sequence[str], base_model: str | None) -> list[str]:
    license_ = getattr(_timm_cfg(architecture), "license", None) or "other"  # the base weights', as timm records it
    lines = ["---", f"license: {license_}", "library_name: timm", "pipeline_tag: image-classification",
             "tags:", "- image-classification", "- timm", "- vision-transfer"]  # fmt: skip
    if kind.card["title"]:
        lines.append(f"- {kind.card['title'].strip()}")
    if base_model:
        lines.append(f"base_model: {base_model}")
    if metrics:
        lines += ["metrics:", *(f"- {m}" for m in metrics)]
    return [*lines, "---", ""]


def _base_model(architecture: str, weights: Mapping[str, Any]) -> str | None:
    """The Hub id of the initial weights, when timm's hub gave them."""
    return getattr(_timm_cfg(architecture), "hf_hub_id", None) if weights.get("kind") == "timm" else None


def _class_table(names: Sequence[str], counts: Mapping[str, np.ndarray] | None) -> list[str]:
    if not counts:
        shown = ", ".join(names[:50]) + (f", ... ({len(names)} in all)" if len(names) > 50 else "")
        return [f"{len(names)} classes: {shown}.", ""]
    splits = list(counts)
    lines = ["| class | " + " | ".join(splits) + " |", "| --- |" + " --- |" * len(splits)]
    for i, name in enumerate(names[:50]):
        lines.append(f"| {name} | " + " | ".join(str(int(counts[s][i])) for s in splits) + " |")
    if len(names) > 50:
        lines.append(f"| ... ({len(names) - 50} more) |" + " |" * len(splits))
    return [*lines, ""]


def _scores_section(scores: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> list[str]:
    lines = ["## Evaluation", "",
             "Scored when this folder was written, through the exported prediction graph (temperature, logit "
             "adjustment and test-time augmentation included), on the recorded splits:", "",
             "| split | images | " + " | ".join(next(iter(scores.values()))["headline"]) + " |",
             "| --- | --- |" + " --- |" * len(next(iter(scores.values()))["headline"])]  # fmt: skip
    for split, s in scores.items():
        lines.append(f"| {split} | {s['images']} | " + " | ".join(f"{v:.4f}" for v in s["headline"].values()) + " |")
    lines.append("")
    for split, s in scores.items():
        weakest = ", ".join(f"{names[c]} ({v:.3f})" for c, v in s["weakest"])
        lines.append(f"Weakest classes on {split} ({s['per_class']}): {weakest}.")
    return [*lines, ""]


def class_scores(
    logits: np.ndarray, labels: np.ndarray, kind: Any, thresholds: Sequence[float] | None = None
) -> dict[str, Any]:
    """The card's numbers for one split (final logits): the kind's headline scores and the three weakest
    classes (recall, or average precision); multi-label decisions at ``thresholds`` (default 0.5)."""
    import torch

    x, y = torch.from_numpy(logits).float(), torch.from_numpy(labels)
    cut = torch.tensor(thresholds if thresholds is not None else [0.5] * logits.shape[1])
    headline, per_class, kind_of_score = kind.card_scores(x, y, cut)
    order = [int(c) for c in np.argsort(np.nan_to_num(per_class, nan=np.inf))[:3]]
    weakest = [(c, float(per_class[c])) for c in order if not np.isnan(per_class[c])]
    return {"images": len(labels), "headline": headline, "weakest": weakest, "per_class": kind_of_score}


def model_card(
    classifier: Any,
    files: Mapping[str, Any],
    *,
    settings: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    scores: Mapping[str, Mapping[str, Any]] | None = None,
    calibration: Mapping[str, Any] | None = None,
    int8: Mapping[str, Mapping[str, Any]] | None = None,
    epoch: int | None = None,
) -> str:
    """The card's text. ``settings``: the checkpoint's recipe; ``data``: ``{"source", "counts"}`` (the recorded
    datamodule and per-split class counts); ``scores``: :func:`class_scores` per split; ``int8``: the int8
    gates' reports by runtime (``onnx``, ``torchscript``); ``epoch``: the (0-based) epoch of the weights."""
    arch = classifier.architecture
    kind = classifier.kind
    weights = classifier.provenance.get("initial_weights", {})
    names = list(classifier.class_names)
    metrics = kind.card["metrics"] if scores else []
    _, height, width = classifier.data_config.input_size
    lines = _front_matter(arch, kind, metrics, _base_model(arch, weights))
    lines += [f"# {arch} {kind.card['title']}image classifier ({len(names)} classes)",
              "", "Written by [vision-transfer](https://pypi.org/project/vision-transfer/) `export`.", "",
              "## Model", "",
              f"- Architecture: timm `{arch}`, {sum(p.numel() for p in classifier.parameters()):,} parameters.",
              f"- Initial weights: {weights.get('kind', 'unknown')}"
              + (f" (`{Path(str(weights['uri'])).name}`)" if weights.get("uri") else "")
              + (f", sha256 `{weights['sha256']}`" if weights.get("sha256") else "") + ".",
              f"- Input: RGB {height}x{width}, resized with `{classifier.data_config.interpolation}` interpolation "
              f"(crop_pct {classifier.data_config.crop_pct}), normalised with mean "
              f"{tuple(round(v, 4) for v in classifier.data_config.mean)} and std "
              f"{tuple(round(v, 4) for v in classifier.data_config.std)} (recorded in `config.json`).",
              f"- Output: one logit per class; {kind.card['output']} for probabilities"
              + (f" (temperature {classifier.prediction['temperature']:.4f} inside the ONNX/TorchScript graph)"
                 if classifier.prediction.get("temperature") not in (None, 1.0) else "") + ".", ""]  # fmt: skip
    lines += ["## Classes and training data", ""]
    if data:
        lines += [f"Trained on `{data['source']}`; images per class and split:", ""]
        lines += _class_table(names, data["counts"])
        train = data["counts"].get("train")
        if train is not None and len(train) and train.min() > 0:
            lines += [f"Class balance (train): largest / smallest class = {train.max() / train.min():.1f}.", ""]
    else:
        lines += ["No training data is recorded for this export (e.g. pretrained ImageNet weights exported as they "
                  "are).", "", *_class_table(names, None)]  # fmt: skip
    if settings:
        recipe = {k: settings[k] for k in RECIPE_KEYS if k in settings and settings[k] not in (None, "none", False)
                  and (not k.startswith("lora_") or settings.get("peft") == "lora")}  # fmt: skip
        trained = f"; the weights of epoch {epoch}" if epoch is not None else ""
        lines += ["## Recipe", "", f"Image size {height} px; " + ", ".join(f"`{k}={v}`" for k, v in recipe.items())
                  + f" (the checkpoint's settings; the rest at vision-transfer's defaults){trained}.", ""]  # fmt: skip
    if scores:
        lines += _scores_section(scores, names)
    if calibration and "ece_before" in calibration:
        lines += [f"Calibration (val): temperature {calibration['temperature']:.3f}, ECE "
                  f"{calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f}, NLL "
                  f"{calibration['nll_before']:.4f} -> {calibration['nll_after']:.4f}.", ""]  # fmt: skip
    lines += ["## Files", ""]
    for fmt, file in files.items():
        if fmt == "card":
            continue
        lines.append(f"- {fmt}: {', '.join(f'`{f}`' for f in file) if isinstance(file, list) else f'`{file}`'}")
    for runtime, gate in (int8 or {}).items():
        lines.append(f"- int8 (`{gate['file']}`): {INT8_METHODS[runtime]} (recipe `{gate['recipe']}`), calibrated on "
                     f"{gate.get('calibration_images', '?')} training images; val {gate['metric']} "
                     f"{gate['val_int8']:.2f} vs fp32 {gate['val_fp32']:.2f}; {gate['size_mb']:.1f} MB vs "
                     f"{gate['fp32_size_mb']:.1f} MB.")  # fmt: skip
    lines += ["", "## Intended use and limitations", "",
              f"Classifies images into the {len(names)} classes above{kind.card['scope']}; "
              "every image gets one of them, including images of none (no reject option). Scores hold for data like "
              "the recorded splits: other cameras, lighting, resolutions or corruptions lower them (measure with "
              "`benchmarks/shift.py`), and classes with few training images are the least reliable. The initial "
              "weights carry the biases of their pre-training data.", ""]  # fmt: skip
    lines += _loading(kind, files, classifier.data_config, int8)
    return "\n".join(lines)


def _loading(
    kind: Any, files: Mapping[str, Any], data_config: Any, int8: Mapping[str, Mapping[str, Any]] | None = None
) -> list[str]:
    probabilities = kind.card["probabilities"]
    blocks = ["## How to load it", "", "Set `IMAGE` to an image file; run from this folder.", ""]
    if "timm" in files:
        blocks += ["With vision-transfer (preprocessing, temperature, thresholds and TTA as recorded):", "",
                   "```python", IMAGE_PLACEHOLDER, "from vision_transfer import load_classifier", "",
                   'classifier = load_classifier(".")', "print(classifier.predict([IMAGE], top_k=3)[0])",
                   "```", ""]  # fmt: skip
        blocks += ["With timm alone (`pip install timm`):", "", "```python", IMAGE_PLACEHOLDER, "import json",
                   "", "import timm", "import torch", "from PIL import Image", "",
                   'model = timm.create_model("local-dir:.", pretrained=True).eval()',
                   "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))",
                   'names = json.load(open("config.json"))["label_names"]', "with torch.no_grad():",
                   '    logits = model(transform(Image.open(IMAGE).convert("RGB")).unsqueeze(0))[0]',
                   f"print(sorted(zip({probabilities}.tolist(), names), reverse=True)[:3])", "```", ""]  # fmt: skip
        blocks += ["With Hugging Face transformers (`pip install transformers timm`; its timm wrapper reads this "
                   "folder; the plain model, without the temperature, TTA or thresholds):", "",
                   "```python", IMAGE_PLACEHOLDER, "from transformers import pipeline", "",
                   f'pipe = pipeline("image-classification", model=".", function_to_apply="{kind.card["pipeline"]}")',
                   "print(pipe(IMAGE, top_k=3))", "```", ""]  # fmt: skip
    if "torchscript" in files:
        scripted = files.get("int8_torchscript", files["torchscript"])
        label = 'json.load(open("config.json"))["label_names"][int(probabilities.argmax())]' if "timm" in files else (
            "int(probabilities.argmax())")  # fmt: skip
        engine = (int8 or {}).get("torchscript", {}).get("engine") if "int8_torchscript" in files else None
        in_int8 = " in int8" if engine else ""
        blocks += [f"With PyTorch alone (TorchScript, the whole prediction graph{in_int8}; `pip install torch timm`, "
                   "timm only for the preprocessing):", "",
                   "```python", IMAGE_PLACEHOLDER, "import json", "", "import timm", "import torch",
                   "from PIL import Image", "",
                   f"transform = timm.data.create_transform({_preprocessing(data_config)})",
                   *([f'torch.backends.quantized.engine = "{engine}"  # the int8 kernels it was checked with']
                     if engine else []),
                   f'model = torch.jit.load("{scripted}").eval()', "with torch.no_grad():",
                   '    logits = model(transform(Image.open(IMAGE).convert("RGB")).unsqueeze(0))[0]',
                   f"probabilities = {probabilities}", f"print({label})", "```", ""]  # fmt: skip
    if "onnx" in files:
        onnx_file = files["onnx"]
        label = 'config["label_names"][int(np.argmax(logits))]' if "timm" in files else "int(np.argmax(logits))"
        blocks += ["With ONNX Runtime (`pip install onnxruntime timm`; timm only for the preprocessing):", "",
                   "```python", IMAGE_PLACEHOLDER, "import json", "", "import numpy as np", "import onnxruntime",
                   "import timm", "from PIL import Image", "",
                   *(['config = json.load(open("config.json"))'] if "timm" in files else []),
                   f"transform = timm.data.create_transform({_preprocessing(data_config)})",
                   'images = transform(Image.open(IMAGE).convert("RGB")).unsqueeze(0).numpy()',
                   f'session = onnxruntime.InferenceSession("{onnx_file}", providers=["CPUExecutionProvider"])',
                   'logits = session.run(["logits"], {"images": images})[0][0]',
                   f"print({label})", "```", ""]  # fmt: skip
    return blocks


def _preprocessing(c: Any) -> str:
    """``timm.data.create_transform``'s arguments for the data config ``c``, as code."""
    return (f"input_size={tuple(c.input_size)}, interpolation={c.interpolation!r}, mean={tuple(c.mean)}, "
            f"std={tuple(c.std)}, crop_pct={c.crop_pct}, crop_mode={c.crop_mode!r}")  # fmt: skip


def write_model_card(folder: str | Path, classifier: Any, files: Mapping[str, Any], **sections: Any) -> Path:
    """Write :func:`model_card` as ``README.md`` into ``folder``."""
    path = Path(folder) / CARD
    path.write_text(model_card(classifier, files, **sections))
    return path
