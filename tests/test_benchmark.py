"""A tiny benchmark grid end to end: CSV, Markdown table, valid PNG plots, resume."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.conftest import TINY_BACKBONE, write_folder
from tests.test_cli import run_cli
from vision_transfer import create_model


def _config(tmp_path: Path, image_folder: Path, csv_dataset: Path) -> Path:
    # a "pretrained" stand-in: the tiny model's weights after a different random init, as a file
    torch.manual_seed(123)
    model, _ = create_model(TINY_BACKBONE, weights="none")
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    weights = tmp_path / "stand_in.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    other = write_folder(tmp_path / "other", per_class=6, seed=5, classes=("a", "b"))
    config = tmp_path / "grid.yaml"
    config.write_text(
        f"""
backbones:
  - {{name: {TINY_BACKBONE}, weights: {weights}, label: tiny-pretrained}}
  - {{name: {TINY_BACKBONE}, weights: none}}
datasets:
  - name: shapes
    data:
      class_path: vision_transfer.datamodules.CsvDataModule
      init_args: {{csv_path: {csv_dataset}, num_workers: 0}}
  - name: ab
    data:
      class_path: vision_transfer.datamodules.ImageFolderDataModule
      init_args: {{root: {other}, num_workers: 0}}
seeds: [0, 1]
protocols: [linear_probe, knn, fewshot]
fewshot_shots: 2
fewshot_episodes: 3
knn_ks: [2, 4]
image_size: 32
solver: sgd
probe_epochs: 3
output: {tmp_path / "bench"}
cache_dir: {tmp_path / "cache"}
"""
    )
    return config


def test_tiny_grid_writes_csv_table_and_plots_and_resumes(
    tmp_path: Path, image_folder: Path, csv_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, image_folder, csv_dataset)
    assert run_cli(["benchmark", f"--config={config}"]) == 0
    out = tmp_path / "bench"
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24  # 2 backbones x 2 datasets x 2 seeds x 3 protocols
    assert {r["backbone"] for r in rows} == {"tiny-pretrained", f"{TINY_BACKBONE} (random)"}
    assert all(0 <= float(r["top1"]) <= 1 and float(r["params_m"]) > 0 for r in rows)
    chosen = {r["protocol"]: r["chosen"].split("=")[0] for r in rows}
    assert chosen == {"linear_probe": "lr", "knn": "k", "fewshot": "shots"}
    fewshot = [r for r in rows if r["protocol"] == "fewshot"]
    assert all(len(r["episode_scores"].split(";")) == 3 and r["ci_low"] <= r["top1"] <= r["ci_high"] for r in fewshot)
    assert all(r["balanced_acc"] for r in rows if r["protocol"] != "fewshot")
    table = (out / "summary.md").read_text()
    body = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(body) == 12 and "± " in table and "gain over random init" in table  # 2 x 2 x 3 rows
    rankings = [line for line in table.splitlines() if line.startswith("- **")]
    assert len(rankings) == 6 and all("over 2 seeds" in r for r in rankings)  # few-shot too: per-seed means
    for name in ("accuracy.png", "cost.png", "transfer_gain.png"):
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(png).size[0] > 200, name

    # an interrupted benchmark resumes: drop the last two runs, rerun, only they are recomputed
    lines = (out / "results.csv").read_text().splitlines()
    (out / "results.csv").write_text("\n".join(lines[:-2]) + "\n")
    kept = {r["run"]: r["extract_s"] for r in rows[:-2]}
    assert run_cli(["benchmark", f"--config={config}"]) == 0
    with (out / "results.csv").open() as f:
        again = list(csv.DictReader(f))
    assert len(again) == 24 and {r["run"]: r["extract_s"] for r in again[:-2]} == kept

    # a grid split across machines (here: by dataset) merges back into the same table
    from vision_transfer.report.grid import merge_results, read_results

    parts = []
    for dataset in ("shapes", "ab"):
        part = tmp_path / f"part_{dataset}" / "results.csv"
        part.parent.mkdir()
        with part.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(again[0]))
            writer.writeheader()
            writer.writerows(r for r in again if r["dataset"] == dataset)
        parts.append(part)
    merged = merge_results(parts, tmp_path / "merged" / "results.csv")
    assert sorted(r["run"] for r in read_results(merged)) == sorted(r["run"] for r in again)
    assert run_cli(["benchmark", "--merge", str(parts[0]), str(parts[1]), f"--output={tmp_path / 'merged2'}"]) == 0
    assert (tmp_path / "merged2" / "summary.md").read_text() == table


def test_fine_tune_protocols_in_the_grid(tmp_path: Path, image_folder: Path) -> None:
    from vision_transfer.app.benchmark import BackboneEntry, DatasetEntry, run_grid
    from vision_transfer.datamodules import ImageFolderDataModule

    data = ImageFolderDataModule(str(image_folder), batch_size=8, num_workers=0)
    results = run_grid(
        [BackboneEntry(TINY_BACKBONE, "none")], [DatasetEntry("shapes", data)], [0], tmp_path / "ft",
        protocols=["full", "gradual"], image_size=32, finetune_epochs=1, progress=False,
    )  # fmt: skip
    with results.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["protocol"] for r in rows] == ["full", "gradual"]
    assert all(0 <= float(r["top1"]) <= 1 and float(r["train_s"]) > 0 for r in rows)


def test_transfer_gain_is_called_negative_only_when_its_interval_is_below_zero() -> None:
    from vision_transfer.report.grid import gain_verdict

    assert gain_verdict(0.13, 0.02) == "positive"
    assert gain_verdict(0.0044, 0.0191) == "not significant"  # the digits case: +0.44 ± 1.91 points
    assert gain_verdict(-0.05, 0.01) == "**negative transfer**"
    assert gain_verdict(0.05, 0.0, 1) == "not significant (one pair)"


def test_rankings_are_paired_and_say_when_a_difference_is_not_significant() -> None:
    from vision_transfer.report.grid import rankings

    def row(backbone: str, seed: int, top1: float) -> dict[str, str]:
        return {"dataset": "d", "backbone": backbone, "protocol": "linear_probe", "seed": str(seed), "top1": str(top1)}

    # B is behind A by exactly 1 point on every seed, though the seeds spread by 10 points: paired, a clear win
    rows = [row("A", s, 0.5 + 0.1 * s) for s in range(3)] + [row("B", s, 0.49 + 0.1 * s) for s in range(3)]
    rows += [row("C", s, v) for s, v in enumerate((0.30, 0.80, 0.35))]  # noisy: not significantly behind B
    (line,) = rankings(rows)
    assert line.startswith("- **d, linear_probe**: A (60.00) > B (59.00; A +1.00 ± 0.00, better over 3 seeds)")
    assert "~ C (48.33; B " in line and "not significant over 3 seeds" in line


def test_run_grid_refuses_a_misspelt_option(tmp_path: Path) -> None:
    from vision_transfer.app.benchmark import run_grid
    from vision_transfer.errors import VisionTransferError

    with pytest.raises(VisionTransferError, match="solvr"):
        run_grid([], [], [0], tmp_path, solvr="sgd")
