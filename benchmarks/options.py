"""What each of timm train.py's speed/memory options costs or saves, measured in one run.

For every option the same ``vision-transfer`` training (``ImageClassifier`` + ``Trainer.fit``,
tf_efficientnet_lite0 with the packaged weights, AdamW) runs ``--steps`` timed steps after
warm-up, and the table prints images/s, the ratio to the plain fp32 run, and memory: the bytes
autograd saves for the backward pass of one batch (device-independent, what gradient
checkpointing reduces) and, on a GPU, the peak allocated memory.

    python benchmarks/options.py [--device cpu|gpu] [--image-size 64] [--batch-size 64] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import pytorch_lightning as pl
import torch
from speed import BACKBONE, loader, toolkit_fit, train_data  # type: ignore[import-not-found]

from vision_transfer.tasks import ImageClassifier

OPTIONS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (ImageClassifier options, Trainer options)
    "fp32": ({}, {}),
    "channels_last": ({"channels_last": True}, {}),
    "bf16-mixed": ({}, {"precision": "bf16-mixed"}),
    "bf16-mixed + channels_last": ({"channels_last": True}, {"precision": "bf16-mixed"}),
    "bf16-mixed + channels_last + compile": ({"channels_last": True, "compile": True}, {"precision": "bf16-mixed"}),
    "16-mixed": ({}, {"precision": "16-mixed"}),
    "grad_checkpointing": ({"grad_checkpointing": True}, {}),
    "accumulate_grad_batches=2": ({}, {"accumulate_grad_batches": 2}),
    "EMA (decay 0.999)": ({}, {"callbacks": "ema"}),
    "compile": ({"compile": True}, {}),
}
CPU_SKIP = {"16-mixed", "bf16-mixed + channels_last + compile"}  # no fp16 autocast speed-up on a CPU


def saved_activation_bytes(model: ImageClassifier, images: torch.Tensor, labels: torch.Tensor, precision: str) -> int:
    """Bytes autograd keeps for the backward pass of one batch."""
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None),
    ):
        loss = torch.nn.functional.cross_entropy(model(model.preprocess(images)), labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return saved


def measure(name: str, dataset: Any, args: argparse.Namespace) -> dict[str, float]:
    model_options, trainer_options = OPTIONS[name]
    trainer_options = {"precision": "32-true", **trainer_options}
    if trainer_options.get("callbacks") == "ema":
        trainer_options["callbacks"] = [pl.callbacks.EMAWeightAveraging(decay=0.999)]
    if args.device == "gpu":
        torch.cuda.reset_peak_memory_stats()
    (_, median), model = toolkit_fit(dataset, args, model_options, trainer_options)
    result = {"images_per_s": median}  # the median step: robust to a shared machine's bursts
    if args.device == "gpu":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    images, labels = next(iter(loader(dataset, args)))
    device = model.device
    model.train()
    result["saved_mib"] = (
        saved_activation_bytes(model, images.to(device), labels.to(device), trainer_options.get("precision", "32"))
        / 2**20
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (compile happens here)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--only", nargs="*", help="a subset of the options, by name")
    args = parser.parse_args()
    dataset = train_data(args)
    names = args.only or [n for n in OPTIONS if args.device == "gpu" or n not in CPU_SKIP]
    print(f"\n{BACKBONE}, {args.image_size} px, batch {args.batch_size}, {args.device}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs")  # fmt: skip
    gpu = args.device == "gpu"
    print(
        "| option | images/s | vs first row | saved activations (MiB/batch) | wall s |" + (" peak GiB |" if gpu else "")
    )
    print("| --- | --- | --- | --- | --- |" + (" --- |" if gpu else ""))
    base = None
    for name in names:
        start = time.perf_counter()
        result = measure(name, dataset, args)
        base = base or result["images_per_s"]
        peak = f" {result['peak_gib']:.2f} |" if gpu else ""
        print(
            f"| {name} | {result['images_per_s']:.1f} | {result['images_per_s'] / base:.2f} | "
            f"{result['saved_mib']:.1f} | {time.perf_counter() - start:.0f} |{peak}",
            flush=True,
        )


if __name__ == "__main__":
    main()
