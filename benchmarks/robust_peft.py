"""Cheap and robust fine-tuning side by side: linear probe, full, LP-FT, WiSE-FT, LoRA, DoRA, BitFit, soups.

Packaged ImageNet EfficientNet-Lite0 on Fashion-MNIST (4,000 train / 1,000 val / 2,000 test at 64 px, the
README's main job's split and recipe), three training seeds on one split (soups and WiSE-FT need fine-tunes of
one pre-trained model on one split). Each (method, seed) trains in a fresh process (its peak RSS is its own)
and is scored on val (where every choice is made), on the clean test split and on its corrupted copy
(``vision_transfer.data.shift``: five corruptions x three severities). WiSE-FT interpolates each full and
LP-FT fine-tune towards the pre-trained weights (alpha 0, 0.1, ..., 1 chosen on val); the soups average
the three full fine-tunes. Rows append to ``<out>/results.jsonl`` as they finish; a rerun skips the rows
already there, so an interrupted run resumes.

    python benchmarks/robust_peft.py --out benchmarks/results/robust_peft
    python benchmarks/robust_peft.py --out /tmp/rp --train 200 --val 100 --test 100 --epochs 1 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "tf_efficientnet_lite0"
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
# The PEFT methods' learning rate is chosen on val (seed 0) among these, for LoRA r=8, and used by every
# PEFT row: adapters usually want a larger rate than a full fine-tune (whose 4e-3 came from the peers sweep).
PEFT_LRS = (4e-3, 1.6e-2)
TRAINED = {  # method -> ImageClassifier options on top of the quickstart recipe ("lr": PEFT: the chosen one)
    "linear_probe": {"mode": "linear_probe"},
    "full": {},
    "lp_ft": {"mode": "lp_ft", "lp_epochs": 1},
    "lora_r8": {"peft": "lora", "lora_r": 8, "lora_alpha": 16.0},
    "lora_r32": {"peft": "lora", "lora_r": 32, "lora_alpha": 64.0},
    "dora_r8": {"peft": "lora", "lora_r": 8, "lora_alpha": 16.0, "lora_dora": True},
    "bitfit": {"peft": "bitfit"},
}
DERIVED = ("full+wise_ft", "lp_ft+wise_ft", "soup_uniform", "soup_greedy")
ALPHAS = [round(0.1 * i, 1) for i in range(11)]


@dataclass(frozen=True)
class Setup:
    out: str
    train: int = 4000
    val: int = 1000
    test: int = 2000
    epochs: int = 3
    image_size: int = 64
    threads: int = 2
    workers: int = 1
    bn_batches: int = 20


def recipe() -> dict[str, Any]:
    import yaml

    model = yaml.safe_load(QUICKSTART.read_text())["model"]
    return {k: v for k, v in model.items() if k not in ("backbone", "weights", "image_size")}


def datamodule(setup: Setup) -> Any:
    from vision_transfer.backbones import preprocessing
    from vision_transfer.datamodules import FashionMNISTDataModule

    return FashionMNISTDataModule(
        batch_size=64, num_workers=setup.workers, val_fraction=0.1, augment="none",
        max_train_samples=setup.train, max_val_samples=setup.val, max_test_samples=setup.test,
        data_config=preprocessing(BACKBONE, "packaged", setup.image_size),
    )  # fmt: skip


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def scores(model: Any, data: Any) -> dict[str, Any]:
    """Val top-1, clean test top-1 and the corrupted copy's, of a model on the benchmark's data."""
    import torch

    from vision_transfer.app.calibrate import collect_logits
    from vision_transfer.data.shift import shift_scores

    data.setup("validate")
    data.setup("test")
    logits, labels = collect_logits(model, data.val_dataloader(), torch.device("cpu"))
    val = float((model.prediction_logits(logits).argmax(1) == labels).float().mean())
    shift = shift_scores(model, data.test_dataloader())
    return {"val_acc": val, "id_top1": shift.id_top1, "corrupted_top1": shift.corrupted_top1,
            "per_corruption": shift.per_corruption, "per_severity": shift.per_severity,
            "test_images": shift.n_images}  # fmt: skip


def train(setup: Setup, method: str, seed: int, lr: float | None) -> dict[str, Any]:
    """Fit one method at one seed, save its checkpoint, score it."""
    import pytorch_lightning as pl

    from vision_transfer.tasks import ImageClassifier

    options = {**recipe(), **TRAINED[method]}
    if lr is not None:
        options.update(lr=lr, head_lr=2 * lr)  # the recipe's head:backbone ratio
    pl.seed_everything(seed, verbose=False)
    data = datamodule(setup)
    model = ImageClassifier.for_data(
        data, backbone=BACKBONE, weights="packaged", image_size=setup.image_size, **options
    )
    probe = options.get("mode") == "linear_probe"
    trainable = sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and (not probe or n.startswith("head."))
    )
    total = sum(p.numel() for p in model.parameters())
    trainer = pl.Trainer(
        max_epochs=setup.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_s = time.perf_counter() - start
    checkpoint = Path(setup.out) / "checkpoints" / f"{method}_lr{lr or options['lr']:g}_seed{seed}.ckpt"
    model.save_standalone_checkpoint(checkpoint, datamodule=data)
    return {"fit_s": fit_s, "trainable": trainable, "total": total, "lr": options.get("lr"),
            "checkpoint": str(checkpoint), **scores(model, data)}  # fmt: skip


def derive(setup: Setup, method: str, seed: int, sources: list[dict[str, Any]]) -> dict[str, Any]:
    """WiSE-FT of one fine-tune, or the soups of several; scored like the trained rows."""
    from vision_transfer.app.averaging import soup, wise_ft
    from vision_transfer.app.checkpoints import model_from_checkpoint, recorded_datamodule
    from vision_transfer.checkpoint import read_checkpoint

    folder = Path(setup.out) / "checkpoints" / f"{method}_seed{seed}"
    start = time.perf_counter()
    if method.endswith("+wise_ft"):
        report = wise_ft(sources[0]["checkpoint"], ALPHAS, bn_batches=setup.bn_batches, out=folder)
        chosen, extra = report["chosen_checkpoint"], {"alpha": report["chosen_alpha"], "alphas": report["alphas"]}
    else:
        recipe_name = method.removeprefix("soup_")
        report = soup([s["checkpoint"] for s in sources], recipe=recipe_name, bn_batches=setup.bn_batches, out=folder)  # type: ignore[arg-type]
        chosen = str(folder / f"soup_{recipe_name}.ckpt")
        extra = {"ingredients": report["ingredients"], "kept": report[recipe_name].get("kept")}
    search_s = time.perf_counter() - start
    entry, content = read_checkpoint(chosen)
    model = model_from_checkpoint(entry, content)
    data = recorded_datamodule(entry)
    return {"fit_s": sum(s["fit_s"] for s in sources), "search_s": search_s, "trainable": sources[0]["trainable"],
            "total": sources[0]["total"], "checkpoint": chosen, **extra, **scores(model, data)}  # fmt: skip


def worker(payload: dict[str, Any]) -> dict[str, Any]:
    import torch

    setup = Setup(**payload["setup"])
    torch.set_num_threads(setup.threads)
    method, seed = payload["method"], payload["seed"]
    if method in TRAINED:
        row = train(setup, method, seed, payload.get("lr"))
    else:
        row = derive(setup, method, seed, payload["sources"])
    return {"method": method, "seed": seed, **row, "peak_rss_mb": peak_rss_mb(), "threads": setup.threads}


class Runner:
    """Runs each job in a fresh interpreter and appends its row to results.jsonl (skips rows already there)."""

    def __init__(self, setup: Setup, in_process: bool = False) -> None:
        self.setup = setup
        self.in_process = in_process  # tests: one interpreter (peak RSS is then the whole run's)
        self.out = Path(setup.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = self.out / "results.jsonl"
        self.rows = (
            [json.loads(line) for line in self.results.read_text().splitlines()] if self.results.exists() else []
        )
        self.peft_lr: float | None = None  # chosen on val before the PEFT rows run

    def find(self, method: str, seed: int, lr: float | None = None) -> dict[str, Any] | None:
        return next(
            (r for r in self.rows if r["method"] == method and r["seed"] == seed and (lr is None or r["lr"] == lr)),
            None,
        )

    def run(
        self, method: str, seed: int, lr: float | None = None, sources: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        found = self.find(method, seed, lr)
        if found is not None:
            return found
        payload = {"setup": asdict(self.setup), "method": method, "seed": seed, "lr": lr, "sources": sources or []}
        result = self.out / "worker_result.json"
        result.unlink(missing_ok=True)
        print(f"-- {method} seed {seed}" + (f" lr {lr:g}" if lr else ""), flush=True)
        if self.in_process:
            result.write_text(json.dumps(worker(payload)))
        else:
            self._subprocess(method, seed, lr, payload, result)
        row = {**json.loads(result.read_text()), "load_after": os.getloadavg()[0]}
        with self.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)
        print(f"   val {row['val_acc']:.4f}  id {row['id_top1']:.4f}  corrupted {row['corrupted_top1']:.4f}  "
              f"fit {row['fit_s']:.0f} s", flush=True)  # fmt: skip
        return row

    def _subprocess(self, method: str, seed: int, lr: float | None, payload: dict[str, Any], result: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        with (self.out / "log.txt").open("a") as log:
            log.write(f"\n=== {method} seed {seed} lr {lr} ===\n")
            log.flush()
            done = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(payload), "--result", str(result)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        if done.returncode != 0 or not result.exists():
            raise SystemExit(f"{method} seed {seed} failed (exit {done.returncode}); see {self.out / 'log.txt'}")


def summarize(rows: list[dict[str, Any]], key: str) -> str:
    from vision_transfer.evaluation.stats import mean_ci

    values = [r[key] for r in rows]
    mean, low, high = mean_ci(values)
    if len(values) < 2:
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {(high - low) / 2:.4f}"


def table(runner: Runner, methods: list[str]) -> str:
    lines = [
        "| method | trainable params | fit s | peak RSS MB | val top-1 | ID top-1 | corrupted top-1 | seeds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method in methods:
        rows = chosen_rows(runner, method)
        if not rows:
            continue
        share = rows[0]["trainable"] / rows[0]["total"]
        fit = statistics.fmean(r["fit_s"] + r.get("search_s", 0.0) for r in rows)
        lines.append(
            f"| {method} | {rows[0]['trainable']:,} ({100 * share:.2f}%) | {fit:.0f} | "
            f"{max(r['peak_rss_mb'] for r in rows):.0f} | {summarize(rows, 'val_acc')} | "
            f"{summarize(rows, 'id_top1')} | {summarize(rows, 'corrupted_top1')} | {len(rows)} |"
        )
    return "\n".join(lines)


def per_corruption(runner: Runner, methods: list[str]) -> str:
    """Each method's corrupted top-1 per corruption (mean over seeds and severities)."""
    from vision_transfer.data.shift import CORRUPTIONS

    lines = ["| method | " + " | ".join(CORRUPTIONS) + " |", "| --- |" + " --- |" * len(CORRUPTIONS)]
    for method in methods:
        rows = chosen_rows(runner, method)
        if rows:
            cells = [statistics.fmean(r["per_corruption"][c] for r in rows) for c in CORRUPTIONS]
            lines.append(f"| {method} | " + " | ".join(f"{v:.4f}" for v in cells) + " |")
    return "\n".join(lines)


def chosen_rows(runner: Runner, method: str) -> list[dict[str, Any]]:
    """A method's rows (a PEFT method's at the chosen rate only: the other rate's rows are the selection's)."""
    rows = [r for r in runner.rows if r["method"] == method]
    if TRAINED.get(method, {}).get("peft"):
        rows = [r for r in rows if r.get("lr") == runner.peft_lr]
    return rows


def goals(runner: Runner) -> list[str]:
    """The issue's three goals, each with the numbers it is judged on (means over seeds)."""

    def mean(method: str, key: str) -> float | None:
        rows = chosen_rows(runner, method)
        return statistics.fmean(r[key] for r in rows) if rows else None

    out = []
    full_id, full_c = mean("full", "id_top1"), mean("full", "corrupted_top1")
    lora_id, lora = mean("lora_r8", "id_top1"), chosen_rows(runner, "lora_r8")
    if full_id is not None and lora_id is not None and lora:
        share = lora[0]["trainable"] / lora[0]["total"]
        met = full_id - lora_id <= 0.01 and share <= 0.05
        out.append(f"LoRA r=8 within 1 point of full ID with <= 5% trainable: ID {lora_id:.4f} vs {full_id:.4f} "
                   f"({100 * (lora_id - full_id):+.2f} points), {100 * share:.2f}% trainable: "
                   f"{'met' if met else 'NOT met'}")  # fmt: skip
    robust = [(m, mean(m, "id_top1"), mean(m, "corrupted_top1")) for m in ("full+wise_ft", "lp_ft+wise_ft", "lp_ft")]
    robust = [r for r in robust if r[1] is not None]
    if full_id is not None and full_c is not None and robust:
        name, r_id, r_c = max(robust, key=lambda r: r[2])  # type: ignore[arg-type,return-value]
        met = r_c - full_c >= 0.03 and full_id - r_id <= 0.005  # type: ignore[operator]
        gain, cost = 100 * (r_c - full_c), 100 * (r_id - full_id)  # type: ignore[operator]
        out.append(f"best robust method ({name}) >= 3 points above full on corrupted at <= 0.5 point ID cost: "
                   f"corrupted {r_c:.4f} vs {full_c:.4f} ({gain:+.2f}), ID {cost:+.2f}: "
                   f"{'met' if met else 'NOT met'}")  # fmt: skip
    greedy = chosen_rows(runner, "soup_greedy")
    fulls = chosen_rows(runner, "full")
    if greedy and fulls:
        best = max(fulls, key=lambda r: r["val_acc"])
        met = greedy[0]["id_top1"] >= best["id_top1"]
        out.append(f"greedy soup >= best single fine-tune (by val) on ID: {greedy[0]['id_top1']:.4f} vs "
                   f"{best['id_top1']:.4f} (seed {best['seed']}): {'met' if met else 'NOT met'}")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "robust_peft"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=[*TRAINED, *DERIVED], choices=[*TRAINED, *DERIVED])
    for name, default in (("train", 4000), ("val", 1000), ("test", 2000), ("epochs", 3), ("image-size", 64),
                          ("threads", 2), ("workers", 1), ("bn-batches", 20)):  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--in-process", action="store_true", help="run every job in this interpreter (tests)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(json.loads(args.worker))))
        return
    setup = Setup(args.out, args.train, args.val, args.test, args.epochs, args.image_size, args.threads,
                  args.workers, args.bn_batches)  # fmt: skip
    runner = Runner(setup, args.in_process)
    peft = [m for m in args.methods if TRAINED.get(m, {}).get("peft")]
    lr = None
    if peft:  # the PEFT learning rate, chosen on val at the first seed
        trials = {value: runner.run("lora_r8", args.seeds[0], value) for value in PEFT_LRS}
        lr = max(trials, key=lambda value: trials[value]["val_acc"])
        print(f"PEFT lr chosen on val (lora_r8, seed {args.seeds[0]}): {lr:g} "
              + ", ".join(f"{v:g}: {r['val_acc']:.4f}" for v, r in trials.items()), flush=True)  # fmt: skip
    runner.peft_lr = lr
    for seed in args.seeds:
        for method in [m for m in args.methods if m in TRAINED]:
            runner.run(method, seed, lr if method in peft else None)
    for method in [m for m in args.methods if m.endswith("+wise_ft")]:
        base = method.removesuffix("+wise_ft")
        for seed in args.seeds:
            runner.run(method, seed, sources=[runner.find(base, seed)])  # type: ignore[list-item]
    soups = [m for m in args.methods if m.startswith("soup_")]
    if soups and len(args.seeds) > 1:
        ingredients = [runner.find("full", seed) for seed in args.seeds]
        for method in soups:
            runner.run(method, -1, sources=ingredients)  # type: ignore[arg-type]
    text = "\n\n".join([table(runner, args.methods), per_corruption(runner, args.methods), "\n".join(goals(runner))])
    (Path(args.out) / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
