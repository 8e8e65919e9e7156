"""Ship it small: what each export of one fine-tuned model weighs, how fast it runs on this CPU and what it scores.

Packaged ImageNet EfficientNet-Lite0 fine-tuned on Fashion-MNIST (4,000 train / 1,000 val / 2,000 test at 64 px,
the README's main job's split and recipe; or ``--checkpoint``), exported by ``vision-transfer export --quantize
int8`` (fp32 ONNX and TorchScript; int8 ONNX and int8 TorchScript (torch.ao), calibrated on 256 training images
and gated on val), each int8 ONNX recipe also written for a row of its own, then every file side by side in this
one process: size, images per second at batch 1 and 64 (``--threads`` intra-op threads, ONNX Runtime for the ONNX
files, torch for TorchScript and the eager model), and val/test top-1 on the same preprocessed images. Prints the
gates' choices and their int8/fp32 ratios against the goals and writes ``<out>/results.json``.

    python benchmarks/deploy.py --out benchmarks/results/deploy
    python benchmarks/deploy.py --out /tmp/deploy --train 200 --val 100 --test 100 --epochs 1 --image-size 32
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "tf_efficientnet_lite0"
GOALS = {"speedup": 2.0, "shrink": 4.0, "drop_points": 1.0}  # int8 vs fp32 ONNX, from the issue


def fine_tune(args: argparse.Namespace) -> Path:
    """The quickstart recipe on the benchmark's Fashion-MNIST subset (``benchmarks/distil.py``'s), seed 0,
    saved as a standalone checkpoint."""
    from distil import fit  # type: ignore[import-not-found]  # beside this script

    return Path(fit(args, BACKBONE, 0)["checkpoint"])


def eval_arrays(data: Any, calibration_images: int = 256) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The checkpoint's val and test splits through its eval transform, normalised (what every export takes),
    and as "calibration" the training images the int8 gate calibrates on (``CheckpointData.calibration_samples``)."""
    out = {}
    for split, samples in (("val", data.splits["val"]), ("test", data.splits["test"]),
                           ("calibration", data.calibration_samples(calibration_images))):  # fmt: skip
        parts = list(data.batches(samples))
        out[split] = (np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]))
    return out


def throughput(run: Callable[[np.ndarray], Any], images: np.ndarray, batch: int, seconds: float) -> float:
    """Images per second of ``run`` on batches of ``batch`` images (after two warm-up calls), for at least
    ``seconds`` and at least three calls."""
    x = np.ascontiguousarray(images[:batch])
    for _ in range(2):
        run(x)
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        run(x)
        calls += 1
    return calls * batch / (time.perf_counter() - start)


def runners(
    folder: Path, checkpoint: Path, threads: int, torch_recipe: str
) -> dict[str, tuple[Path | None, Callable[[np.ndarray], Any]]]:
    """Each export's file (None: the eager model) and a function from a normalised batch to logits
    (``torch_recipe``: the recipe of the int8 TorchScript file)."""
    import torch

    from vision_transfer.export import load_classifier
    from vision_transfer.export.quantize import onnx_session
    from vision_transfer.export.quantize_torch import ENGINE, TORCH_INT8_FILE

    torch.set_num_threads(threads)
    out: dict[str, tuple[Path | None, Callable[[np.ndarray], Any]]] = {}
    from vision_transfer.export.quantize import RECIPES

    onnx_files = [("ONNX fp32", "classifier.onnx"), *((f"ONNX int8 ({r})", f"int8_{r}.onnx") for r in RECIPES)]
    for name, file in onnx_files:
        session = onnx_session(folder / file, threads)
        out[name] = (folder / file, lambda x, s=session: s.run(["logits"], {"images": x})[0])
    torch.backends.quantized.engine = ENGINE
    scripted, int8 = (folder / "classifier.torchscript.pt", folder / TORCH_INT8_FILE)
    for name, module, path in (("TorchScript fp32", torch.jit.load(str(scripted)).eval(), scripted),
                               (f"TorchScript int8 ({torch_recipe})", torch.jit.load(str(int8)).eval(), int8),
                               ("PyTorch eager fp32", load_classifier(checkpoint).eval(), None)):  # fmt: skip

        def call(x: np.ndarray, m: Any = module) -> Any:
            with torch.inference_mode():
                return m(torch.from_numpy(x)).numpy()

        out[name] = (path, call)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "deploy"))
    parser.add_argument("--checkpoint", default=None, help="a vision-transfer checkpoint (default: fine-tune one)")
    for name, default in (("train", 4000), ("val", 1000), ("test", 2000), ("epochs", 3), ("image-size", 64),
                          ("threads", 2), ("calibration-images", 256)):  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--seconds", type=float, default=5.0, help="timing per (export, batch size)")
    args = parser.parse_args(argv)
    import torch

    from vision_transfer.app.export import CheckpointData, quantize_checkpoint_export
    from vision_transfer.export import export_checkpoint, load_classifier

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    checkpoint = Path(args.checkpoint) if args.checkpoint else fine_tune(args)
    fit_s = None if args.checkpoint else time.perf_counter() - start
    folder = out / "export"
    export_checkpoint(checkpoint, folder, ["timm", "torchscript", "onnx"])
    recorded = CheckpointData.read(checkpoint)
    gates = quantize_checkpoint_export(recorded, folder, classifier=load_classifier(checkpoint),
                                       runtimes=("onnx", "torchscript"), calibration_images=args.calibration_images,
                                       allow_drop=True)  # fmt: skip
    int8, torch_int8 = gates["onnx"], gates["torchscript"]
    if "error" in torch_int8:
        raise SystemExit(torch_int8["error"])
    data = eval_arrays(recorded, args.calibration_images)
    from vision_transfer.export.quantize import RECIPES, prepare_onnx, quantize_onnx

    calibration = data.pop("calibration")[0]
    prepared = prepare_onnx(folder / "classifier.onnx", out / "prepared.onnx")
    for recipe in RECIPES:  # each recipe's file, for its own row (the gate wrote its choice as classifier.int8.onnx)
        batches = [calibration[i : i + 32] for i in range(0, len(calibration), 32)]
        quantize_onnx(folder / "classifier.onnx", folder / f"int8_{recipe}.onnx", batches, recipe, prepared)
    rows = []
    for name, (path, run) in runners(folder, checkpoint, args.threads, torch_int8["recipe"]).items():
        row: dict[str, Any] = {"export": name, "size_mb": path.stat().st_size / 2**20 if path else None}
        for split, (x, y) in data.items():
            logits = np.concatenate([run(np.ascontiguousarray(x[i : i + 64])) for i in range(0, len(x), 64)])
            row[f"{split}_top1"] = float((logits.argmax(1) == y).mean())
        for batch in (1, 64):
            row[f"img_s_batch{batch}"] = throughput(run, data["val"][0], batch, args.seconds)
        rows.append(row)
        print(json.dumps(row), flush=True)
    fp32 = rows[0]
    q = next(r for r in rows if r["export"] == f"ONNX int8 ({int8['recipe']})")  # the gate's choice
    ratios = {"speedup_batch1": q["img_s_batch1"] / fp32["img_s_batch1"],
              "speedup_batch64": q["img_s_batch64"] / fp32["img_s_batch64"],
              "shrink": fp32["size_mb"] / q["size_mb"], "val_drop_points": 100 * (fp32["val_top1"] - q["val_top1"]),
              "test_drop_points": 100 * (fp32["test_top1"] - q["test_top1"])}  # fmt: skip
    scripted = next(r for r in rows if r["export"] == "TorchScript fp32")
    tq = next(r for r in rows if r["export"] == f"TorchScript int8 ({torch_int8['recipe']})")
    ratios.update({"torch_speedup_batch1": tq["img_s_batch1"] / scripted["img_s_batch1"],
                   "torch_speedup_batch64": tq["img_s_batch64"] / scripted["img_s_batch64"],
                   "torch_shrink": scripted["size_mb"] / tq["size_mb"],
                   "torch_val_drop_points": 100 * (scripted["val_top1"] - tq["val_top1"]),
                   "torch_test_drop_points": 100 * (scripted["test_top1"] - tq["test_top1"])})  # fmt: skip
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, {args.threads} threads"
    results = {"machine": machine, "checkpoint": str(checkpoint), "fit_s": fit_s, "image_size": args.image_size,
               "int8_gate": int8, "torch_int8_gate": torch_int8, "rows": rows, "ratios": ratios}  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{machine}; lite0 fine-tuned at {args.image_size} px; int8 calibrated on {int8['calibration_images']} "
          f"training images\n")  # fmt: skip
    print("| export | size MB | img/s batch 1 | img/s batch 64 | val top-1 | test top-1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        size = "-" if r["size_mb"] is None else f"{r['size_mb']:.2f}"
        print(f"| {r['export']} | {size} | {r['img_s_batch1']:.0f} | {r['img_s_batch64']:.0f} | "
              f"{r['val_top1']:.4f} | {r['test_top1']:.4f} |")  # fmt: skip
    print(f"\nThe gate's choice: {int8['recipe']} (tried: " + ", ".join(
        f"{t['recipe']} {t['drop_points']:+.2f}" for t in int8["tried"]) + " points val top-1 lost)")  # fmt: skip
    print(f"int8 ({int8['recipe']}) vs fp32 ONNX: {ratios['speedup_batch1']:.2f}x (batch 1) and "
          f"{ratios['speedup_batch64']:.2f}x "
          f"(batch 64) the throughput (goal >= {GOALS['speedup']:g}x), {ratios['shrink']:.2f}x smaller (goal >= "
          f"{GOALS['shrink']:g}x), {ratios['val_drop_points']:+.2f} / {ratios['test_drop_points']:+.2f} points val / "
          f"test top-1 lost (goal <= {GOALS['drop_points']:g})")  # fmt: skip
    print(f"TorchScript int8 ({torch_int8['recipe']}) vs TorchScript fp32: {ratios['torch_speedup_batch1']:.2f}x "
          f"(batch 1) and {ratios['torch_speedup_batch64']:.2f}x (batch 64) the throughput, "
          f"{ratios['torch_shrink']:.2f}x smaller, {ratios['torch_val_drop_points']:+.2f} / "
          f"{ratios['torch_test_drop_points']:+.2f} points val / test top-1 lost")  # fmt: skip


if __name__ == "__main__":
    main()
