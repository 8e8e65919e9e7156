"""Can a benchmark's numbers be trusted? Every option reaches what it configures (or is refused by
name), every row records the settings that made it, merge and resume never blend rows made with
different settings, few-shot intervals respect the nesting of episodes in seeds, and bad input
ends in one line.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats as scipy_stats

from tests.conftest import TINY_BACKBONE, TINY_SIZE, write_folder
from tests.test_cli import run_cli

REPO = Path(__file__).resolve().parents[1]
FEATURE_PROTOCOLS = ("linear_probe", "knn", "fewshot")
GRID_PROTOCOLS = (*FEATURE_PROTOCOLS, "full")  # gradual runs full's code with another mode


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes of eight images: 6 train, 1 val, 1 test per class."""
    return write_folder(tmp_path_factory.mktemp("shapes") / "images")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def options_of(command: str, capsys: pytest.CaptureFixture[str]) -> set[str]:
    """Every option ``vision-transfer <command> --help`` lists."""
    assert run_cli([command, "--help"]) == 0
    text = capsys.readouterr().out
    return set(re.findall(r"^\s+--(\w+)", text, re.MULTILINE)) - {"help", "print_config"}


def error_of(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a refused command printed on stderr."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vision-transfer: error: "), lines
    return lines[0]


def read_rows(path: Path) -> list[dict[str, str]]:
    with (path / "results.csv" if path.is_dir() else path).open(newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict[str, str]], columns: list[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or list(rows[0]), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


# -- benchmark -----------------------------------------------------------------------------------
# what each protocol needs on a 3 x 6-image training split, and nothing else
PROTOCOL_BASE = {
    "linear_probe": ["--solver=sgd"],
    "knn": ["--knn_ks=[2,4]"],
    "fewshot": ["--fewshot_shots=2", "--fewshot_episodes=2"],
    "full": ["--finetune_epochs=1"],
}


def benchmark_args(
    shapes: Path, cache: Path, output: Path, protocols: tuple[str, ...] | list[str], *extra: str, seeds: str = "[0]"
) -> list[str]:
    datasets = (
        f"[{{name: shapes, data: {{class_path: vision_transfer.datamodules.ImageFolderDataModule, "
        f"init_args: {{root: {shapes}, num_workers: 0, batch_size: 8}}}}}}]"
    )
    base = [arg for protocol in protocols for arg in PROTOCOL_BASE[protocol]]
    return [
        "benchmark", f"--backbones=[{{name: {TINY_BACKBONE}, weights: none}}]", f"--datasets={datasets}",
        f"--seeds={seeds}", f"--protocols=[{','.join(protocols)}]", f"--image_size={TINY_SIZE}",
        f"--cache_dir={cache}", f"--output={output}", *base, *extra,
    ]  # fmt: skip


def setting_values(row: dict[str, str]) -> dict[str, str]:
    from vision_transfer.report.grid import SETTINGS

    return {column: row[column] for column in SETTINGS}


# option -> (a value unlike the base's, the protocols that use it, what else it needs to apply)
BENCHMARK_OPTIONS: dict[str, tuple[str, tuple[str, ...], list[str]]] = {
    "image_size": ("40", GRID_PROTOCOLS, []),
    "solver": ("lbfgs", ("linear_probe",), []),
    "c_grid_size": ("3", ("linear_probe",), ["--solver=lbfgs", "--c_grid_size=4"]),  # the last one counts
    "probe_epochs": ("3", ("linear_probe",), []),
    "knn_ks": ("[3]", ("knn",), []),
    "fewshot_shots": ("3", ("fewshot",), []),
    "fewshot_episodes": ("3", ("fewshot",), []),
    "finetune_epochs": ("2", ("full",), []),
    "finetune_lr": ("0.01", ("full",), []),
    "class_weight": ("balanced", ("linear_probe", "full"), []),
}
# the grid itself: which runs there are, and where their files go
BENCHMARK_STRUCTURE = {"backbones", "datasets", "seeds", "protocols", "output", "cache_dir"}


def test_every_benchmark_option_reaches_the_protocols_that_use_it_and_is_refused_by_the_others(
    shapes: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each option, set on a grid of each protocol alone: it changes that grid's recorded settings
    where the protocol uses it, and it is refused, by name, where the protocol would ignore it."""
    assert options_of("benchmark", capsys) == {*BENCHMARK_OPTIONS, *BENCHMARK_STRUCTURE, "config"}
    baselines: dict[tuple[str, ...], dict[str, str]] = {}

    def run(protocol: str, *extra: str) -> dict[str, str]:
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        assert run_cli(benchmark_args(shapes, cache, out, [protocol], *extra)) == 0, capsys.readouterr().err
        capsys.readouterr()  # progress bars: not the next refusal's line
        (row,) = read_rows(out)
        return row

    for option, (value, protocols, needs) in BENCHMARK_OPTIONS.items():
        for protocol in GRID_PROTOCOLS:
            if protocol in protocols:
                key = (protocol, *needs)
                if key not in baselines:
                    baselines[key] = run(protocol, *needs)
                row = run(protocol, *needs, f"--{option}={value}")
                changed = setting_values(row) != setting_values(baselines[key])
                assert changed, f"--{option}={value} left the {protocol} row's settings as they were"
            else:
                args = benchmark_args(shapes, cache, tmp_path / "refused", [protocol], f"--{option}={value}")
                assert run_cli(args) == 2, f"--{option} was accepted by a {protocol} grid, which ignores it"
                assert option in error_of(capsys) and not (tmp_path / "refused" / "results.csv").exists()
    # and the linear probe's solver-specific options are refused for the other solver
    for option, solver in (("c_grid_size=3", "sgd"), ("probe_epochs=3", "lbfgs")):
        args = benchmark_args(
            shapes, cache, tmp_path / "refused", ["linear_probe"], f"--solver={solver}", f"--{option}"
        )
        assert run_cli(args) == 2
        line = error_of(capsys)
        assert option.split("=")[0] in line and solver in line


def test_class_weight_reaches_the_grids_linear_probes_and_fine_tunes(
    shapes: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vision_transfer.evaluation.linear as probe_module
    import vision_transfer.tasks.classifier as classifier_module

    probed: list[Any] = []
    run_probe = probe_module.run_probe
    monkeypatch.setattr(
        probe_module, "run_probe", lambda *a, **k: probed.append(k.get("class_weight")) or run_probe(*a, **k)
    )
    weighed: list[Any] = []  # the fine-tune's loss asks for balanced class weights
    balanced = classifier_module.balanced_class_weights
    monkeypatch.setattr(
        classifier_module, "balanced_class_weights", lambda counts: weighed.append(counts) or balanced(counts)
    )
    config = tmp_path / "grid.yaml"
    config.write_text("class_weight: balanced\n")  # in a config file, as the README has it
    args = benchmark_args(shapes, cache, tmp_path / "bench", ["linear_probe", "full"], f"--config={config}")
    assert run_cli(args) == 0
    assert probed == ["balanced"] and weighed
    assert {r["protocol"]: r["class_weight"] for r in read_rows(tmp_path / "bench")} == {
        "linear_probe": "balanced",
        "full": "balanced",
    }


@pytest.mark.parametrize("solver", ["sgd", "lbfgs"])
def test_the_grid_and_probe_run_the_same_linear_probe(
    shapes: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, solver: str
) -> None:
    """Same data, seed and solver: the grid's linear probe and `vision-transfer probe` call the same
    evaluation function with the same options and report the same scores."""
    import vision_transfer.evaluation.linear as linear
    import vision_transfer.evaluation.stream as stream

    calls: list[tuple[str, dict[str, Any]]] = []
    for module, name in ((linear, "run_probe"), (stream, "stream_sgd_probe")):
        original = getattr(module, name)

        def spy(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            calls.append((_name, {k: v for k, v in kwargs.items() if v is not None}))
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    solver_args = [f"--solver={solver}", *(["--c_grid_size=4"] if solver == "lbfgs" else [])]
    grid = benchmark_args(shapes, cache, tmp_path / "bench", ["linear_probe"], *solver_args)
    assert run_cli(grid) == 0
    probe = [
        "probe", f"--backbone={TINY_BACKBONE}", "--weights=none", f"--image_size={TINY_SIZE}",
        "--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.root={shapes}", "--data.num_workers=0",
        "--protocol=linear", *solver_args, f"--cache_dir={cache}", f"--output={tmp_path / 'probe'}",
    ]  # fmt: skip
    assert run_cli(probe) == 0
    assert len(calls) == 2 and calls[0][0] == calls[1][0]  # one function for both
    assert calls[0][1] == calls[1][1]  # with the same options
    (row,) = read_rows(tmp_path / "bench")
    report = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert float(row["top1"]) == pytest.approx(report["test_acc"], abs=1e-12)
    assert float(row["top5"]) == pytest.approx(report["test_acc_top5"], abs=1e-12)


@pytest.mark.parametrize("protocol", ["knn", "fewshot"])
def test_class_weight_is_refused_by_name_in_a_grid_with_a_protocol_that_ignores_it(
    shapes: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], protocol: str
) -> None:
    args = benchmark_args(shapes, cache, tmp_path / "bench", ["linear_probe", protocol], "--class_weight=balanced")
    assert run_cli(args) == 2
    line = error_of(capsys)
    assert "class_weight" in line and protocol in line
    assert not (tmp_path / "bench" / "results.csv").exists()  # refused before any run


# -- probe -----------------------------------------------------------------------------------------
PROBE_MODES = {
    "sgd": ["--protocol=linear", "--solver=sgd"],
    "lbfgs": ["--protocol=linear", "--solver=lbfgs", "--c_grid_size=4"],  # 45 C take seconds
    "knn": ["--protocol=knn", "--ks=[2,4]"],
    "fewshot": ["--protocol=fewshot", "--shots=2", "--episodes=2"],
}
EVERY_MODE = ("sgd", "lbfgs", "knn", "fewshot")
# option -> {mode that uses it: a value unlike the mode's base (None: used, varied in another mode)};
# every other mode must refuse it
EXTRACTION_OPTIONS = {
    "image_size": "40", "dtype": "float32", "precision": "bf16", "batch_size": "4", "num_workers": "1",
    "compile": "true",
}  # fmt: skip
PROBE_OPTIONS: dict[str, dict[str, str | None]] = {
    **{option: dict.fromkeys(EVERY_MODE, value) for option, value in EXTRACTION_OPTIONS.items()},
    "solver": {"sgd": "lbfgs", "lbfgs": None},  # --solver sgd would refuse the lbfgs base's --c_grid_size
    "epochs": {"sgd": "3"},
    "lrs": {"sgd": "[0.5]"},
    "wds": {"sgd": "[0.01]"},
    "seed": {"sgd": "1", "fewshot": "1"},
    "c_grid_size": {"lbfgs": "3"},
    "class_weight": {"sgd": "balanced", "lbfgs": "balanced"},
    "ks": {"knn": "[3]"},
    "shots": {"fewshot": "3"},
    "episodes": {"fewshot": "3"},
}
# what to probe, where to write, and where to cache (checked below)
PROBE_STRUCTURE = {"backbone", "weights", "data", "protocol", "output", "cache_dir"}
VOLATILE = {"seconds", "extraction_seconds", "forward_passes", "checkpoint", "caches"}


def _stable(report: Any) -> Any:
    """probe.json without timings and paths."""
    if isinstance(report, dict):
        return {k: _stable(v) for k, v in report.items() if k not in VOLATILE}
    if isinstance(report, list):
        return [_stable(v) for v in report]
    return report


def test_every_probe_option_reaches_the_protocols_that_use_it_and_is_refused_by_the_others(
    shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each option with each protocol (and solver): it changes probe.json or what the extractor is
    asked for where it is used, and is refused, by name, where it would be ignored."""
    import vision_transfer.app.protocols as features

    assert options_of("probe", capsys) == {*PROBE_OPTIONS, *PROBE_STRUCTURE, "config"}
    asked: list[dict[str, Any]] = []
    extract = features.extract

    def spy(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs)
        return extract(*args, **{**kwargs, "compile": False})  # asked for is enough: compiling takes minutes

    monkeypatch.setattr(features, "extract", spy)
    common = [
        "probe", f"--backbone={TINY_BACKBONE}", "--weights=none", f"--image_size={TINY_SIZE}",
        "--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.root={shapes}", "--data.num_workers=0",
    ]  # fmt: skip

    def run(mode: str, *extra: str) -> tuple[Any, dict[str, Any]]:
        out = tmp_path / f"run{len(asked)}"
        asked.clear()
        args = [*common, *PROBE_MODES[mode], f"--cache_dir={tmp_path / 'cache'}", f"--output={out}", *extra]
        assert run_cli(args) == 0, capsys.readouterr().err
        capsys.readouterr()  # progress bars: not the next refusal's line
        return _stable(json.loads((out / "probe.json").read_text())), asked[-1]

    baselines = {mode: run(mode) for mode in PROBE_MODES}
    for option, uses in PROBE_OPTIONS.items():
        for mode in PROBE_MODES:
            if mode in uses:
                if uses[mode] is None:
                    continue
                report, extractor = run(mode, f"--{option}={uses[mode]}")
                assert (report, extractor) != baselines[mode], f"--{option}={uses[mode]} changed nothing ({mode})"
            else:
                args = [
                    *common,
                    *PROBE_MODES[mode],
                    f"--output={tmp_path / 'refused'}",
                    f"--{option}={value_of(option)}",
                ]
                assert run_cli(args) == 2, f"--{option} was accepted by {mode}, which ignores it"
                assert f"--{option}" in error_of(capsys) and not (tmp_path / "refused").exists()
    # the cache goes where --cache_dir says
    run("knn", f"--cache_dir={tmp_path / 'elsewhere'}")
    assert any((tmp_path / "elsewhere").rglob("manifest.json"))


def value_of(option: str) -> str:
    return next(v for v in PROBE_OPTIONS[option].values() if v is not None)


# -- settings in every row; merge and resume ---------------------------------------------------------
# every setting that defines a row (the test below checks that the module records exactly these)
SETTING_COLUMNS = [
    "image_size", "input_size", "weights_id", "data_hash", "split_hash", "precision", "solver", "c_grid",
    "probe_epochs", "knn_ks", "shots", "episodes", "finetune_epochs", "finetune_lr", "class_weight",
]  # fmt: skip
VERSION_COLUMNS = ["torch_version", "timm_version", "vision_transfer_version"]


def grid_args(shapes: Path, cache: Path, output: Path, solver: str, *extra: str) -> list[str]:
    args = benchmark_args(shapes, cache, output, GRID_PROTOCOLS, seeds="[0,1]")
    return [*args, f"--solver={solver}", *(["--c_grid_size=4"] if solver == "lbfgs" else []), *extra]


@pytest.fixture(scope="module")
def grids(shapes: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two finished 2-seed grids of every protocol: the linear probe by SGD in one, L-BFGS in the other."""
    root = tmp_path_factory.mktemp("grids")
    for solver in ("sgd", "lbfgs"):
        assert run_cli(grid_args(shapes, cache, root / solver, solver)) == 0
    return {solver: root / solver for solver in ("sgd", "lbfgs")}


def test_every_grid_row_records_the_settings_that_define_it(grids: dict[str, Path]) -> None:
    import timm
    import torch

    import vision_transfer
    from vision_transfer.report.grid import SETTINGS, VERSIONS

    for solver, folder in grids.items():
        for row in read_rows(folder):
            protocol = row["protocol"]
            assert row["image_size"] == str(TINY_SIZE) and row["input_size"] == str(TINY_SIZE)
            assert row["weights_id"].startswith("none:") and row["precision"]
            assert len(row["data_hash"]) >= 12 and len(row["split_hash"]) >= 12
            expected = {
                "linear_probe": {"solver": solver, "class_weight": "none"}
                | ({"probe_epochs": "10"} if solver == "sgd" else {"c_grid": "logspace(-6,5,4)"}),
                "knn": {"knn_ks": "2;4"},
                "fewshot": {"shots": "2", "episodes": "2"},
                "full": {"finetune_epochs": "1", "finetune_lr": "0.002", "class_weight": "none"},
            }[protocol]
            for column in ("solver", "c_grid", "probe_epochs", "knn_ks", "shots", "episodes"):
                assert row[column] == expected.get(column, ""), (protocol, column)  # empty: not used
            assert {k: row[k] for k in expected} == expected
            assert list(SETTINGS) == SETTING_COLUMNS and list(VERSIONS) == VERSION_COLUMNS
            assert set(SETTINGS) <= set(row) and set(VERSIONS) <= set(row)
            assert (row["torch_version"], row["timm_version"], row["vision_transfer_version"]) == (
                torch.__version__,
                timm.__version__,
                vision_transfer.__version__,
            )
    # the seeds draw different splits of the same data
    rows = read_rows(grids["sgd"])
    assert len({r["data_hash"] for r in rows}) == 1 and len({r["split_hash"] for r in rows}) == 2


def _where(column: str) -> str:
    """The grid whose rows use ``column``."""
    return "lbfgs" if column == "c_grid" else "sgd"


@pytest.mark.parametrize("column", SETTING_COLUMNS)
def test_resume_recomputes_and_replaces_a_row_made_with_another_setting_and_says_so(
    grids: dict[str, Path],
    shapes: Path,
    cache: Path,
    tmp_path: Path,
    column: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    solver = _where(column)
    folder = tmp_path / "grid"
    shutil.copytree(grids[solver], folder)
    rows = read_rows(folder)
    index = next(i for i, r in enumerate(rows) if r[column])
    stale = dict(rows[index])
    rows[index] |= {column: "tampered", "top1": "-1"}  # made with another setting: its number is another's
    write_rows(folder / "results.csv", rows)
    with caplog.at_level(logging.INFO, logger="vision_transfer"):
        assert run_cli(grid_args(shapes, cache, folder, solver)) == 0
    again = {r["run"]: r for r in read_rows(folder)}
    assert len(again) == len(rows)
    redone = again[stale["run"]]
    assert redone[column] == stale[column] and redone["top1"] != "-1"
    assert setting_values(redone) == setting_values(stale)
    for row in rows:  # every other row was kept as it was
        if row["run"] != stale["run"]:
            assert again[row["run"]] == row
    said = caplog.text
    assert stale["run"] in said and column in said and "tampered" in said


@pytest.mark.parametrize("column", VERSION_COLUMNS)
def test_resume_keeps_a_row_made_with_other_package_versions_and_warns(
    grids: dict[str, Path], shapes: Path, cache: Path, tmp_path: Path, column: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "grid"
    shutil.copytree(grids["sgd"], folder)
    rows = read_rows(folder)
    rows[0] |= {column: "0.0.1", "top1": "-1"}
    write_rows(folder / "results.csv", rows)
    with caplog.at_level(logging.INFO, logger="vision_transfer"):
        assert run_cli(grid_args(shapes, cache, folder, "sgd")) == 0
    assert read_rows(folder) == rows  # nothing recomputed
    assert column in caplog.text and "0.0.1" in caplog.text


def test_resume_recomputes_rows_without_recorded_settings(
    grids: dict[str, Path], shapes: Path, cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A results.csv from before rows recorded their settings: nothing in it can be checked, so each
    of this grid's runs is recomputed (and said to be), and the file gains the settings columns."""
    from vision_transfer.report.grid import SETTINGS, VERSIONS

    folder = tmp_path / "grid"
    rows = read_rows(grids["sgd"])
    old_columns = [c for c in rows[0] if c not in (*SETTINGS, *VERSIONS)]
    write_rows(folder / "results.csv", [r | {"top1": "-1"} for r in rows], old_columns)
    with caplog.at_level(logging.INFO, logger="vision_transfer"):
        assert run_cli(grid_args(shapes, cache, folder, "sgd")) == 0
    again = read_rows(folder)
    assert sorted(r["run"] for r in again) == sorted(r["run"] for r in rows)
    assert all(r["top1"] != "-1" and setting_values(r) for r in again)
    assert "no recorded settings" in caplog.text


def test_resume_refuses_a_folder_holding_other_runs_made_with_other_settings(
    grids: dict[str, Path], shapes: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rows this grid does not recompute (another seed) would be averaged with its own: refused."""
    folder = tmp_path / "grid"
    shutil.copytree(grids["sgd"], folder)
    before = (folder / "results.csv").read_text()
    args = benchmark_args(shapes, cache, folder, ["knn"], "--image_size=40", seeds="[2]")
    assert run_cli(args) == 2
    line = error_of(capsys)
    assert "image_size" in line and "32" in line and "40" in line
    assert (folder / "results.csv").read_text() == before


def _merge_parts(rows: list[dict[str, str]], column: str, value: str, tmp_path: Path) -> tuple[Path, Path]:
    """Two parts of one grid, the second's rows made (as its file says) with ``column`` = ``value``.
    Split by seed, so rows of the same protocol, backbone and dataset meet; a split's content is
    per seed, so for it the grid is split by protocol (the same split in both parts)."""
    if column == "split_hash":
        second = [r["protocol"] in ("fewshot", "full") for r in rows]
    else:
        second = [r["seed"] == "1" for r in rows]
    a = [r for r, s in zip(rows, second, strict=True) if not s]
    b = [r | ({column: value} if r[column] else {}) for r, s in zip(rows, second, strict=True) if s]
    return write_rows(tmp_path / "a" / "results.csv", a), write_rows(tmp_path / "b" / "results.csv", b)


@pytest.mark.parametrize("column", SETTING_COLUMNS)
def test_merge_refuses_rows_made_with_another_setting_naming_it_and_both_values(
    grids: dict[str, Path], tmp_path: Path, column: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = read_rows(grids[_where(column)])
    original = next(r[column] for r in rows if r[column])
    a, b = _merge_parts(rows, column, "other", tmp_path)
    assert run_cli(["benchmark", "--merge", str(a), str(b), f"--output={tmp_path / 'merged'}"]) == 2
    line = error_of(capsys)
    assert column in line and original in line and "other" in line
    assert not (tmp_path / "merged" / "results.csv").exists()


@pytest.mark.parametrize("column", VERSION_COLUMNS)
def test_merge_keeps_rows_made_with_other_package_versions_and_warns(
    grids: dict[str, Path], tmp_path: Path, column: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = read_rows(grids["sgd"])
    a, b = _merge_parts(rows, column, "0.0.1", tmp_path)
    assert run_cli(["benchmark", "--merge", str(a), str(b), f"--output={tmp_path / 'merged'}"]) == 0
    out = capsys.readouterr().out
    assert column in out and "0.0.1" in out
    assert len(read_rows(tmp_path / "merged")) == len(rows)


def test_merge_refuses_a_results_file_without_recorded_settings(
    grids: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vision_transfer.report.grid import SETTINGS, VERSIONS

    rows = read_rows(grids["sgd"])
    a, b = _merge_parts(rows, "image_size", "32", tmp_path)
    old = [c for c in rows[0] if c not in (*SETTINGS, *VERSIONS)]
    write_rows(b, read_rows(b), old)
    assert run_cli(["benchmark", "--merge", str(a), str(b), f"--output={tmp_path / 'merged'}"]) == 2
    line = error_of(capsys)
    assert str(b) in line and "no recorded settings" in line


def test_a_64px_sgd_grid_and_a_larger_lbfgs_grid_neither_merge_nor_resume_into_one_mean(
    shapes: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The audit's case, for real: the same backbone and data, other seeds, other image size and solver."""
    small = benchmark_args(shapes, cache, tmp_path / "small", ["linear_probe"], seeds="[0]")
    lbfgs = ["--image_size=40", "--solver=lbfgs", "--c_grid_size=4"]
    large = benchmark_args(shapes, cache, tmp_path / "large", ["linear_probe"], *lbfgs)
    large[large.index("--seeds=[0]")] = "--seeds=[1]"
    assert run_cli(small) == 0 and run_cli(large) == 0
    capsys.readouterr()
    merged = tmp_path / "merged"
    assert (
        run_cli(["benchmark", "--merge", str(tmp_path / "small"), str(tmp_path / "large"), f"--output={merged}"]) == 2
    )
    line = error_of(capsys)
    assert "image_size" in line and "solver" in line and "sgd" in line and "lbfgs" in line
    # resuming the small grid's folder with the large grid's settings redoes its run, not reuses it
    again = [*large]
    again[again.index(f"--output={tmp_path / 'large'}")] = f"--output={tmp_path / 'small'}"
    again[again.index("--seeds=[1]")] = "--seeds=[0]"
    with caplog.at_level(logging.INFO, logger="vision_transfer"):
        assert run_cli(again) == 0
    (row,) = read_rows(tmp_path / "small")
    assert (row["image_size"], row["solver"]) == ("40", "lbfgs") and "recomput" in caplog.text


def test_the_committed_benchmark_lite_results_still_render(tmp_path: Path) -> None:
    """Written before rows recorded their settings: its summary and plots are still drawn from it."""
    from vision_transfer.report.grid import write_grid_summary

    folder = tmp_path / "lite"
    folder.mkdir()
    shutil.copy(REPO / "benchmarks" / "results" / "benchmark_lite" / "results.csv", folder)
    written = write_grid_summary(folder)
    assert {p.name for p in written} == {"summary.md", "accuracy.png", "cost.png", "transfer_gain.png"}
    assert (folder / "summary.md").read_text() == (REPO / "benchmarks/results/benchmark_lite/summary.md").read_text()


# -- few-shot intervals ---------------------------------------------------------------------------
def _fewshot_rows(backbone: str, seed_means: list[float], spread: float, shift: float = 0.0) -> list[dict[str, str]]:
    """One few-shot row per seed: 20 episodes close to the seed's mean (episodes share its split)."""
    rows = []
    for seed, mean in enumerate(seed_means):
        episodes = mean + shift + spread * np.linspace(-1, 1, 20)
        rows.append({
            "dataset": "d", "backbone": backbone, "architecture": "a", "weights": "packaged", "protocol": "fewshot",
            "seed": str(seed), "top1": str(float(episodes.mean())), "episode_scores": ";".join(map(str, episodes)),
            "params_m": "1", "gmacs": "1",
        })  # fmt: skip
    return rows


def test_fewshot_interval_is_the_t_interval_of_the_per_seed_means_not_of_pooled_episodes() -> None:
    from vision_transfer.report.grid import aggregate, markdown_table

    means = [0.60, 0.70, 0.65]
    rows = _fewshot_rows("b", means, spread=0.01)
    mean, half, n = aggregate(rows)[("d", "b", "fewshot")]
    expected = scipy_stats.t.ppf(0.975, 2) * np.std(means, ddof=1) / math.sqrt(3)
    assert n == 3 and mean == pytest.approx(0.65) and half == pytest.approx(expected)
    pooled = (
        scipy_stats.t.ppf(0.975, 59)
        * np.std([float(v) for r in rows for v in r["episode_scores"].split(";")], ddof=1)
        / math.sqrt(60)
    )
    assert half > 3 * pooled  # what pooling the 60 episodes as independent claimed
    table = markdown_table(rows)
    assert "mean of each seed's episodes" in table and "over all episodes" not in table


def test_fewshot_gains_and_rankings_pair_the_per_seed_means() -> None:
    from vision_transfer.report.grid import rankings, transfer_gains

    means = [0.60, 0.70, 0.65]
    rows = _fewshot_rows("pretrained", means, 0.05, shift=0.02) + [
        r | {"weights": "none"} for r in _fewshot_rows("random", means, 0.05)
    ]
    for r in rows:
        r["architecture"] = "a"
    gain, half, n = transfer_gains(rows)[("d", "pretrained", "fewshot")]
    assert n == 3 and gain == pytest.approx(0.02) and half == pytest.approx(0.0, abs=1e-9)
    (line,) = rankings(rows)
    assert "over 3 seeds" in line and "episodes" not in line


def test_one_mean_ci_serves_the_protocols_and_the_tables() -> None:
    import vision_transfer.report.grid as table
    from vision_transfer.evaluation import fewshot
    from vision_transfer.evaluation.stats import mean_ci

    assert not hasattr(table, "mean_ci") or table.mean_ci is mean_ci
    assert fewshot.mean_ci is mean_ci
    mean, low, high = mean_ci([0.8, 0.9])
    assert mean == pytest.approx(0.85) and (high - low) / 2 == pytest.approx(12.706 * 0.05, rel=1e-3)
    assert math.isnan(mean_ci([0.5])[1])  # one value: no interval, not a zero-width one


# -- one-line refusals ------------------------------------------------------------------------------
@pytest.fixture
def multilabel_csv(tmp_path: Path) -> Path:
    """24 generated images, each with one or two of three shapes' names in a ``labels`` column."""
    root = write_folder(tmp_path / "ml", per_class=8)
    path = root / "labels.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels"])
        for i, image in enumerate(sorted(root.rglob("*.png"))):
            writer.writerow([image.relative_to(root).as_posix(), image.parent.name + (";stripes" if i % 3 else "")])
    return path


@pytest.mark.parametrize("protocol", ["knn", "fewshot"])
def test_knn_and_fewshot_probes_refuse_multilabel_data_in_one_line_as_the_grid_does(
    multilabel_csv: Path, tmp_path: Path, protocol: str
) -> None:
    from vision_transfer.app.benchmark import BackboneEntry, DatasetEntry, run_grid
    from vision_transfer.datamodules import CsvDataModule
    from vision_transfer.errors import ConfigError

    command = [
        sys.executable, "-m", "vision_transfer.cli", "probe", f"--backbone={TINY_BACKBONE}", "--weights=none",
        f"--image_size={TINY_SIZE}", "--data=vision_transfer.datamodules.CsvDataModule",
        f"--data.csv_path={multilabel_csv}", "--data.num_workers=0", f"--protocol={protocol}",
        f"--cache_dir={tmp_path / 'cache'}", f"--output={tmp_path / 'probe'}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert lines[-1] == (
        f"vision-transfer: error: {multilabel_csv} is multi-label: the {protocol} protocol is single-label only."
    )
    data = CsvDataModule(str(multilabel_csv), num_workers=0)
    with pytest.raises(ConfigError) as caught:
        run_grid([BackboneEntry(TINY_BACKBONE, "none")], [DatasetEntry(str(multilabel_csv), data)], [0],
                 tmp_path / "grid", [protocol], TINY_SIZE, progress=False)  # fmt: skip
    assert lines[-1] == f"vision-transfer: error: {caught.value}"


@pytest.mark.parametrize("tta", ["flp", "FLIP", ""])
def test_export_refuses_an_unknown_tta_mode_in_one_line_naming_the_allowed_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tta: str
) -> None:
    args = ["export", f"--backbone={TINY_BACKBONE}", "--weights=none", f"--to={tmp_path / 'out'}", f"--tta={tta}"]
    assert run_cli(args) == 2
    line = error_of(capsys)
    assert "--tta" in line and repr(tta) in line and "none, flip, flip_zoom" in line
    assert not (tmp_path / "out").exists()


def test_every_tta_entry_point_refuses_an_unknown_mode_as_a_config_error() -> None:
    import torch

    from vision_transfer.errors import ConfigError
    from vision_transfer.evaluation.kinds import SINGLE, task_kind
    from vision_transfer.inference.outputs import PredictionHead, tta_views

    with pytest.raises(ConfigError, match="flp"):
        tta_views(torch.zeros(1, 3, 4, 4), "flp")
    with pytest.raises(ConfigError, match="flp"):
        PredictionHead(torch.nn.Identity(), task_kind(SINGLE), tta="flp")
