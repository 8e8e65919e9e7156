"""Write a trained classifier (or a pretrained backbone) for other projects: timm, TorchScript, ONNX."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vision_transfer.backbones import create_model
from vision_transfer.errors import ExportError
from vision_transfer.export.card import write_model_card
from vision_transfer.export.loading import Classifier, load_classifier
from vision_transfer.export.timm_format import timm_state_dict, write_export

FORMATS = ("timm", "torchscript", "onnx")
# fp32 logits of the same graph through another runtime; measured differences are ~1e-6.
TOLERANCE = 1e-4


def classifier_from_pretrained(name: str, weights: str | None = "auto") -> Classifier:
    """A pretrained model with its own (ImageNet) classifier, as a :class:`Classifier`."""
    model, data_config = create_model(name, weights)
    head = model.get_classifier()  # type: ignore[operator]
    if not isinstance(head, nn.Linear):
        raise ExportError(f"{name}: its classifier is {type(head).__name__}, not a Linear layer.")
    head = nn.Linear(head.in_features, head.out_features).requires_grad_(False)
    head.load_state_dict(model.get_classifier().state_dict())  # type: ignore[operator]
    model.reset_classifier(0)  # type: ignore[operator]
    names = _imagenet_names() if head.out_features == 1000 else [str(i) for i in range(head.out_features)]
    classifier = Classifier(name, model, head, data_config, names)
    classifier.provenance = {"initial_weights": dict(model.pretrained_cfg["weights"])}  # type: ignore[index]
    return classifier


def _imagenet_names() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


def export_classifier(
    classifier: Classifier,
    to: str | Path,
    formats: Sequence[str] = FORMATS,
    tta: str | None = None,
) -> dict[str, Any]:
    """Write ``formats`` into ``to`` and check each against the PyTorch outputs.

    TorchScript and ONNX get the whole prediction graph (one input, one output): the classifier,
    then post-hoc logit adjustment, temperature and ``tta`` (``flip``/``flip_zoom``: averaged
    inside the graph), when any is set; the output are logits whose softmax (multi-label:
    sigmoid) are the final probabilities. The timm folder holds the plain weights (timm builds
    the plain model: raw logits); ``config.json`` records every setting to apply on top.

    Returns the report also saved as ``export_report.json``: files, max absolute logit
    differences and the tolerance they were checked against.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ExportError(f"formats: unknown {', '.join(unknown)}; choose from {', '.join(FORMATS)}.")
    folder = Path(to)
    folder.mkdir(parents=True, exist_ok=True)
    classifier = classifier.eval().cpu()
    graph = prediction_graph(classifier, tta)
    prediction = {**classifier.prediction, "tta": classifier.prediction_head(tta).tta}
    _, height, width = classifier.data_config.input_size
    example = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = graph(example)
    report: dict[str, Any] = {
        "architecture": classifier.architecture,
        "tolerance": TOLERANCE,
        "files": {},
        "max_abs_diff": {},
    }
    if "timm" in formats:
        state = timm_state_dict(classifier.backbone, classifier.head, classifier.architecture)
        write_export(
            folder,
            state,
            architecture=classifier.architecture,
            data_config=classifier.data_config,
            num_features=int(classifier.backbone.num_features),  # type: ignore[arg-type]
            class_names=classifier.class_names,
            provenance=classifier.provenance,
            prediction=prediction,
        )
        report["files"]["timm"] = ["config.json", "model.safetensors"]
    if "torchscript" in formats:
        path = folder / "classifier.torchscript.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 marks TorchScript deprecated, not gone
            torch.jit.trace(graph, example, check_trace=False).save(str(path))
            with torch.inference_mode():
                out = torch.jit.load(str(path))(example)
        report["files"]["torchscript"] = path.name
        report["max_abs_diff"]["torchscript"] = _check("TorchScript", out, reference)
    if "onnx" in formats:
        path = folder / "classifier.onnx"
        _export_onnx(graph, example, path)
        report["files"]["onnx"] = path.name
        report["max_abs_diff"]["onnx"] = _check("ONNX", torch.from_numpy(_run_onnx(path, example)), reference)
    report["files"]["card"] = write_model_card(folder, classifier, report["files"]).name  # from a checkpoint: more
    (folder / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def prediction_graph(classifier: Classifier, tta: str | None = None, model: nn.Module | None = None) -> nn.Module:
    """What TorchScript and ONNX exports hold: ``classifier``'s prediction head (:meth:`Classifier.prediction_head`)
    or, when it changes nothing (no temperature, logit adjustment or ``tta``), the plain backbone + head;
    ``model`` replaces the backbone + head (an int8 copy)."""
    head = classifier.prediction_head(tta)
    if model is not None:
        head.model = model
    trivial = head.tta == "none" and float(head.temperature) == 1.0 and not classifier.prediction.get("logit_shift")
    return head.model if trivial else head.eval()


def _export_onnx(graph: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        graph.eval(),
        (example,),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes={"images": {0: batch}},
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def _run_onnx(path: Path, images: torch.Tensor) -> Any:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": images.numpy()})[0]


def _check(runtime: str, output: torch.Tensor, reference: torch.Tensor) -> float:
    diff = float((output.float() - reference.float()).abs().max())
    if diff > TOLERANCE:
        raise ExportError(f"{runtime} export differs from PyTorch by {diff:.2e} (tolerance {TOLERANCE:.0e}).")
    return diff


def export_checkpoint(
    checkpoint: str | Path, to: str | Path, formats: Sequence[str] = FORMATS, tta: str | None = None
) -> dict[str, Any]:
    """Export a vision-transfer checkpoint; see :func:`export_classifier`."""
    return export_classifier(load_classifier(checkpoint), to, formats, tta)
