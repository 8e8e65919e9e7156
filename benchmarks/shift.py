"""Robustness to a shifted test set: a checkpoint's top-1 on its clean test split and on corrupted copies.

The checkpoint's recorded datamodule (its data, with its preprocessing) gives the test split; each
image is corrupted after the eval transform, at the model's input resolution, by
:mod:`vision_transfer.data.shift` (Gaussian noise, Gaussian blur, lower contrast, rotation, JPEG; three
severities each, seeded per image). Prints the in-distribution top-1, the mean corrupted top-1 and
each corruption's, and writes them (with every severity's) as JSON. ``--examples`` draws one test
image under every corruption and severity, to see that the levels are sensible.

    python benchmarks/shift.py CHECKPOINT.ckpt [--corruptions gaussian_noise jpeg ...] [--severities 1 2 3]
        [--out shift.json] [--max-test N] [--examples shift_examples.png] [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from vision_transfer.app.checkpoints import model_from_checkpoint, recorded_datamodule
from vision_transfer.checkpoint import read_checkpoint
from vision_transfer.data.shift import CORRUPTIONS, SEVERITIES, SEVERITY_PARAMETERS, corrupt, shift_scores


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS), choices=CORRUPTIONS)
    parser.add_argument("--severities", nargs="+", type=int, default=list(SEVERITIES), choices=SEVERITIES)
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: shift.json beside the run)")
    parser.add_argument("--max-test", type=int, default=None, help="class-balanced subset of the test split")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recorded datamodule's")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--examples", type=Path, default=None, help="PNG grid: clean + each severity, per corruption")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser.parse_args(argv)


def save_examples(
    path: Path,
    image: torch.Tensor,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    index: int = 0,
) -> Path:
    """One row per corruption: the clean uint8 CHW ``image``, then each severity (seeded as test image ``index``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 1 + len(severities)
    fig, axes = plt.subplots(len(corruptions), columns, figsize=(1.6 * columns, 1.6 * len(corruptions)), squeeze=False)
    for row, corruption in zip(axes, corruptions, strict=True):
        views = [image] + [corrupt(image[None], corruption, s, first_index=index)[0] for s in severities]
        for ax, view, title in zip(row, views, ["clean", *(f"severity {s}" for s in severities)], strict=True):
            ax.imshow(view.permute(1, 2, 0).numpy(), vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if corruption == corruptions[0]:
                ax.set_title(title, fontsize=8)
        row[0].set_ylabel(corruption, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> dict:  # type: ignore[type-arg]
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    entry, content = read_checkpoint(args.checkpoint)
    model = model_from_checkpoint(entry, content)
    changes = {"num_workers": args.num_workers}
    if args.max_test is not None:
        changes["max_test_samples"] = args.max_test
    if args.batch_size is not None:
        changes["batch_size"] = args.batch_size
    data = recorded_datamodule(entry).with_options(**changes)
    data.setup("test")
    loader = data.test_dataloader()
    start = time.perf_counter()
    scores = shift_scores(model, loader, args.device, args.corruptions, args.severities)
    seconds = time.perf_counter() - start

    size = model.data_config.input_size[1]
    print(f"{args.checkpoint}: {data.describe()}, {scores.n_images} test images at {size} px")
    levels, empty = "".join(f" severity {s} |" for s in args.severities), " |" * len(args.severities)
    print(f"| test set | top-1 |{levels}\n|{' --- |' * (2 + len(args.severities))}")
    print(f"| clean (ID) | {scores.id_top1:.4f} |{empty}")
    print(f"| corrupted, mean of {len(scores.per_severity)} | {scores.corrupted_top1:.4f} |{empty}")
    for corruption, top1 in scores.per_corruption.items():
        levels = "".join(f" {scores.per_severity[f'{corruption}/{s}']:.4f} |" for s in args.severities)
        print(f"| {corruption} | {top1:.4f} |{levels}")
    print(f"{seconds:.1f} s for {1 + len(scores.per_severity)} passes on {args.device}")

    results = {
        "checkpoint": str(args.checkpoint),
        "backbone": model.backbone_name,
        "input_size": list(model.data_config.input_size),
        "data": data.describe(),
        "device": args.device,
        "seconds": round(seconds, 2),
        "severity_parameters": {c: SEVERITY_PARAMETERS[c] for c in args.corruptions},
        **scores.to_dict(),
    }
    run_dir = args.checkpoint.parent.parent if args.checkpoint.parent.name == "checkpoints" else args.checkpoint.parent
    out = args.out or run_dir / "shift.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results          {out}")
    if args.examples is not None:
        first = next(iter(loader))[0][0]  # the first test image (a test batch starts with its images)
        print(f"examples         {save_examples(args.examples, first, args.corruptions, args.severities)}")
    return results


if __name__ == "__main__":
    main()
