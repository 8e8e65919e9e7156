"""The ``vision-transfer`` entry point: one dispatcher, one parser library (jsonargparse), lazy imports.

``vision-transfer --help`` imports nothing heavy. Each command imports what it needs when it
runs; the help of commands whose options come from class signatures (``fit`` needs Lightning,
timm and torch: about 6 s to import here) is cached per installed version and source files,
so it is that slow only the first time.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vision_transfer.errors import VisionTransferError

COMMANDS: dict[str, str] = {
    "fit": "Train a classifier (full, gradual, LP-FT, partial or linear probe), then test its best checkpoint",
    "validate": "Score a model or checkpoint on the validation split",
    "test": "Score a model or checkpoint on the test split (confusion matrix, per-class accuracy, worst images)",
    "predict": "Write the top classes of images (folders, files, .txt lists) to a CSV",
    "extract": "Run a frozen backbone once over each split and cache the features",
    "probe": "Linear probe, k-NN or few-shot evaluation on cached features (extracting first if missing)",
    "benchmark": "Backbones x datasets x seeds x protocols: results table, transfer gain and plots",
    "inspect": "Find likely label errors, duplicates across splits (leaks) and outliers from cached features",
    "calibrate": "Fit a checkpoint's temperature (or multi-label thresholds) on its validation split",
    "wise-ft": "WiSE-FT: interpolate a fine-tune towards its pre-trained weights, alpha chosen on val",
    "soup": "Model soups: average fine-tunes of one pre-trained model (uniform and greedy)",
    "export": "Export a checkpoint or a pretrained backbone for timm, TorchScript and ONNX",
    "prepare": "Write a dataset's splits as litdata chunks (pre-resized) to stream from disk or object storage",
    "check-data": "Scan a dataset: class counts, image sizes and modes, unreadable files, duplicates",
    "report": "Print a run folder's summary and redraw its plots",
    "lr-find": "LR range test: plot the loss against the learning rate and suggest one",
    "backbones": "List the backbones whose pretrained weights are usable offline",
}
LIGHTNING = ("fit", "validate", "test", "predict")
# commands whose --help needs the heavy imports (options read from class signatures)
HEAVY_HELP = {*LIGHTNING, "extract", "probe", "inspect", "benchmark", "prepare"}
HELP_DISTRIBUTIONS = ("torch", "pytorch-lightning", "timm", "jsonargparse", "albumentations", "torchmetrics")


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: vision-transfer <command> [options]",
        "",
        "Transfer learning for computer vision: timm backbones, Lightning training, linear probes and export.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()),
        "",
        "`vision-transfer <command> --help` lists a command's options.",
    ]
    return "\n".join(lines)


def _runner(command: str) -> Callable[[list[str]], None]:
    if command in LIGHTNING:
        from vision_transfer.app.lightning_cli import run

        return lambda args: run([command, *args])
    from vision_transfer.app import commands

    return getattr(commands, command.replace("-", "_"))  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> None:
    """Console entry point; user errors end with one clear line and exit status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return
    if args[0] == "--version":
        from vision_transfer import __version__

        print(f"vision-transfer {__version__}")
        return
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"vision-transfer: error: unknown command {command!r}.\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    _show_progress_messages()
    try:
        if command in HEAVY_HELP and any(a in ("-h", "--help") for a in rest):
            _cached_help(command, rest)
        else:
            _runner(command)(rest)
    except VisionTransferError as e:
        print(f"vision-transfer: error: {error_message(e)}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # CUDA out of memory: a torch error type, checked without importing torch here
        advice = getattr(e, "vision_transfer_advice", None)
        if advice is None and type(e).__name__ == "OutOfMemoryError":
            advice = "out of GPU memory; lower the batch size or use bf16-mixed precision."
        if advice is None:
            raise
        print(f"vision-transfer: error: {advice}", file=sys.stderr)
        sys.exit(2)


def error_message(error: BaseException) -> str:
    """The user-facing line of an error, also when it was re-raised from a DataLoader worker."""
    text = str(error)
    if "Original Traceback" in text:  # torch re-raises worker errors with the worker's traceback
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


class _CurrentStdout(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stdout`` is at the time (a test's captured stream too)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _show_progress_messages() -> None:
    """The library logs what a user should see (skipped images, resumed runs) at INFO; show it."""
    logger = logging.getLogger("vision_transfer")
    if not any(isinstance(h, _CurrentStdout) for h in logger.handlers):
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


# -- help cache ------------------------------------------------------------------------------
def _help_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vision_transfer" / "help"


def _help_key(command: str, args: list[str]) -> str:
    """Changes with the command, its other arguments, the terminal width, the installed versions
    and any source file of the package."""
    from importlib import metadata

    parts = [command, *args, str(shutil.get_terminal_size().columns)]
    root = Path(__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
        stat = path.stat()
        parts.append(f"{path.relative_to(root)}:{stat.st_mtime_ns}:{stat.st_size}")
    for name in HELP_DISTRIBUTIONS:
        try:
            parts.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name}=none")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def _cached_help(command: str, args: list[str]) -> None:
    path = _help_cache_dir() / f"{command}-{_help_key(command, args)}.txt"
    if path.is_file():
        sys.stdout.write(path.read_text())
        return
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        try:
            _runner(command)(args)
        except SystemExit as e:
            if e.code not in (0, None):
                raise
    text = buffer.getvalue()
    sys.stdout.write(text)
    with contextlib.suppress(OSError):  # a read-only home: no cache, the help still printed
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
