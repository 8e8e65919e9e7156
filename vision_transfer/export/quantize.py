"""int8 ONNX: ONNX Runtime's static quantization (QDQ format, per-channel int8 weights, uint8 activations)
calibrated on training images, and gated by the validation score: the fastest of :data:`RECIPES` that keeps
the score within a set tolerance of its own fp32 graph is written, and none if none does.

``onnxruntime`` is part of the ``export`` extra (it already checks every ONNX export against PyTorch).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vision_transfer.errors import ConfigError, ExportError

INT8_FILE = "classifier.int8.onnx"
CALIBRATION_IMAGES = 256  # training images (eval transform) whose activation ranges set the int8 scales
MAX_DROP = 1.0  # points of the validation score an int8 model may lose against fp32 before it is refused
# The recipes tried in turn until one keeps the validation score within the tolerance, fastest first:
# - "all": every operator ONNX Runtime quantizes (activations stay int8 from one to the next: the speed);
# - "all_7bit": the same with 7-bit weights (ONNX Runtime's reduce_range): uint8 x int8 products can saturate
#   on x86 CPUs without VNNI (AVX2, AVX-512 alone), where "all" lost 2.3 points on a lite0 and this keeps its speed;
# - "sensitive_fp32": the same with grouped (depthwise) convolutions, the first convolution and the classifier
#   left in fp32 (their few weights per channel, raw pixels and logits quantize worst);
# - "weighted_only": only convolutions and matrix products, the sensitive ones in fp32 (normalisation and
#   softmax too: what ONNX Runtime advises for transformers).
# Measured on a fine-tuned lite0 (Fashion-MNIST, 64 px; benchmarks/deploy.py): see the README.
RECIPES = ("all", "all_7bit", "sensitive_fp32", "weighted_only")
WEIGHTED_OPS = ("Conv", "MatMul", "Gemm")

NEEDS_ONNXRUNTIME = "int8 export needs onnxruntime: pip install 'vision-transfer[export]'."
METRIC_NAMES = {"acc": "top-1", "map": "mAP"}  # the task kinds' selection metrics, as reports name them

Batches = Iterable[tuple[np.ndarray, np.ndarray]]  # (normalised float32 NCHW images, labels)


def quantize_onnx(
    source: str | Path,
    target: str | Path,
    calibration: Iterable[np.ndarray],
    recipe: str = "all",
    prepared: str | Path | None = None,
) -> Path:
    """Quantize the fp32 ONNX model ``source`` into ``target`` by one of :data:`RECIPES`: shape inference and
    graph clean-up first (``quant_pre_process``; ``prepared``: a file it already wrote for ``source``, reused),
    then static QDQ quantization (per-channel int8 weights, 7-bit under ``all_7bit``; uint8 activations) with
    min-max activation ranges over ``calibration`` (normalised float32 batches)."""
    if recipe not in RECIPES:
        raise ConfigError(f"int8 recipe {recipe!r}: one of {', '.join(RECIPES)}.")
    try:
        import onnx
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    except ImportError as e:  # the export extra
        raise ConfigError(NEEDS_ONNXRUNTIME) from e

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches: Iterator[np.ndarray] = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": np.ascontiguousarray(batch, dtype=np.float32)}

    target = Path(target)
    with tempfile.TemporaryDirectory() as scratch:
        if prepared is None:
            prepared = prepare_onnx(source, Path(scratch) / "prepared.onnx")
        nodes = list(onnx.load(str(prepared), load_external_data=False).graph.node)  # in topological order
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # ONNX Runtime warns on the root logger for every 1-D weight (LayerNorm)
        try:
            quantize_static(
            str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, reduce_range=recipe == "all_7bit",
            op_types_to_quantize=list(WEIGHTED_OPS) if recipe == "weighted_only" else None,
            nodes_to_exclude=after_the_weights(nodes) + ([] if recipe.startswith("all") else kept_in_fp32(nodes)),
            )  # fmt: skip
        finally:
            root.setLevel(level)
    return target


def prepare_onnx(source: str | Path, target: str | Path) -> Path:
    """ONNX Runtime's ``quant_pre_process`` of ``source`` (shape inference, graph clean-up) into ``target``:
    what every recipe quantizes (:func:`quantize_onnx`)."""
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:  # the export extra
        raise ConfigError(NEEDS_ONNXRUNTIME) from e
    quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
    return Path(target)


def after_the_weights(nodes: list[Any]) -> list[str]:
    """Of a graph's ``nodes`` (in topological order), those no weighted operator follows: the prediction
    graph's tail after the classifier (temperature, softmax, the test-time-augmentation average, the log).
    They stay in fp32 under every recipe: a uint8 softmax rounds every probability under 1/510 to 0 (its log
    to the clamp), for no speed."""
    feeds_weights: set[str] = set()  # tensors from which a weighted operator is reached
    tail = []
    for node in reversed(nodes):
        if node.op_type in WEIGHTED_OPS or any(out in feeds_weights for out in node.output):
            feeds_weights.update(node.input)
        else:
            tail.append(node.name)
    return sorted(tail)


def kept_in_fp32(nodes: list[Any]) -> list[str]:
    """Of a graph's ``nodes``, those the cautious recipes leave in fp32: grouped (depthwise) convolutions, the
    first convolution (the stem or patch embedding, on raw pixels) and the last matrix product (the classifier)."""
    grouped = [n.name for n in nodes if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    convs = [n.name for n in nodes if n.op_type == "Conv"]
    products = [n.name for n in nodes if n.op_type in ("MatMul", "Gemm")]
    return sorted(set(grouped + convs[:1] + products[-1:]))


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """A CPU ONNX Runtime session (``threads``: intra-op threads; None: ONNX Runtime's default)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_outputs(path: str | Path, batches: Batches) -> tuple[np.ndarray, np.ndarray]:
    """The logits of every batch through the ONNX model at ``path``, and the labels."""
    session = onnx_session(path)
    logits, labels = [], []
    for images, target in batches:
        logits.append(session.run(["logits"], {"images": np.ascontiguousarray(images, dtype=np.float32)})[0])
        labels.append(np.asarray(target))
    return np.concatenate(logits), np.concatenate(labels)


def validation_score(logits: np.ndarray, labels: np.ndarray) -> tuple[str, float]:
    """The score the int8 gate compares, in points: the task kind's selection metric (top-1, or mAP for
    multi-hot labels)."""
    import torch

    from vision_transfer.evaluation.kinds import kind_of_labels

    kind = kind_of_labels(labels)
    score = kind.selection_scores(torch.from_numpy(logits).float(), torch.from_numpy(labels))[kind.metric]
    return METRIC_NAMES[kind.metric], 100 * float(score)


def check_int8_options(max_drop: float = MAX_DROP, calibration_images: int = CALIBRATION_IMAGES) -> None:
    """Refuse a bad int8 setting before anything is exported."""
    if max_drop < 0:
        raise ConfigError(f"--max_int8_drop {max_drop:g}: a tolerance in points, >= 0.")
    if calibration_images < 1:
        raise ConfigError(f"--calibration_images {calibration_images}: at least 1.")


def int8_export(
    folder: str | Path,
    calibration: Iterable[np.ndarray],
    validation: Batches,
    *,
    max_drop: float = MAX_DROP,
    allow_drop: bool = False,
    recipes: tuple[str, ...] = RECIPES,
) -> dict[str, Any]:
    """Quantize ``folder``'s ``classifier.onnx`` into ``classifier.int8.onnx`` by each of ``recipes`` in
    turn, scoring it and fp32 on ``validation``, until one loses at most ``max_drop`` points; returns the
    report (every recipe tried). When none does, nothing is written and an ``ExportError`` names every score
    (unless ``allow_drop``: the last one is written); the other exports stay."""
    check_int8_options(max_drop=max_drop)
    fp32 = Path(folder) / "classifier.onnx"
    if not fp32.is_file():
        raise ExportError(f"{fp32}: int8 quantization starts from the fp32 ONNX export (add onnx to --formats).")
    calibration = [np.asarray(batch, dtype=np.float32) for batch in calibration]  # read once, used per recipe
    batches = list(validation)
    with tempfile.TemporaryDirectory() as scratch:
        prepared = prepare_onnx(fp32, Path(scratch) / "prepared.onnx")  # once, for every recipe
        return gate(
            fp32, Path(folder) / INT8_FILE, recipes,
            lambda recipe, path: quantize_onnx(fp32, path, calibration, recipe, prepared),
            lambda path: onnx_outputs(path, batches), batches, max_drop=max_drop, allow_drop=allow_drop,
        )  # fmt: skip


def gate(
    fp32: Path,
    target: Path,
    recipes: Iterable[str],
    write: Callable[[str, Path], Any],
    outputs: Callable[[Path], tuple[np.ndarray, np.ndarray]],
    batches: list[tuple[np.ndarray, np.ndarray]],
    *,
    max_drop: float,
    allow_drop: bool,
) -> dict[str, Any]:
    """The int8 accuracy gate of every runtime: ``write(recipe, path)`` each recipe in turn and score the file
    (``outputs(path)``: its logits and labels over ``batches``) against the ``fp32`` file's, until one loses at
    most ``max_drop`` points; it becomes ``target``. A recipe ``write`` refuses with an ``ExportError`` (a model
    it cannot quantize) is recorded and skipped. When none passes, nothing is written and an ``ExportError``
    names every score (unless ``allow_drop``: the last one written is kept)."""
    if not batches:
        raise ExportError("int8: the validation split is empty; the int8 model cannot be checked.")
    partial = target.with_name(target.name + ".partial")
    metric, before = validation_score(*outputs(fp32))
    tried: list[dict[str, Any]] = []
    written: dict[str, Any] | None = None
    passed = False  # judged on the unrounded drop (the report rounds it)
    for recipe in recipes:
        try:
            write(recipe, partial)
        except ExportError as e:
            tried.append({"recipe": recipe, "refused": str(e)})
            continue
        _, after = validation_score(*outputs(partial))
        written = {"recipe": recipe, "val_int8": round(after, 4), "drop_points": round(before - after, 4)}
        tried.append(written)
        passed = before - after <= max_drop
        if passed:
            break
    each = "; ".join(f"{t['recipe']} {t['val_int8']:.2f}" if "val_int8" in t else f"{t['recipe']}: {t['refused']}"
                     for t in tried)  # fmt: skip
    if written is None:
        raise ExportError(f"int8 ({target.name}): no recipe could quantize the model: {each}; not written (the "
                          "fp32 exports are).")  # fmt: skip
    report = {
        "file": target.name, **written, "metric": metric, "val_fp32": round(before, 4), "max_drop": max_drop,
        "allowed_drop": allow_drop, "tried": tried, "size_mb": round(partial.stat().st_size / 2**20, 3),
        "fp32_size_mb": round(fp32.stat().st_size / 2**20, 3),
        "validation_images": int(sum(len(labels) for _, labels in batches)),
    }  # fmt: skip
    if not passed and not allow_drop:
        partial.unlink()
        raise ExportError(
            f"int8 ({target.name}): validation {metric} fp32 {before:.2f}, int8 {each}: every recipe drops more "
            f"than --max_int8_drop {max_drop:g} points; not written (the fp32 exports are). Raise "
            "--max_int8_drop, or --allow_int8_drop to write the last one anyway."
        )
    os.replace(partial, target)
    return report
