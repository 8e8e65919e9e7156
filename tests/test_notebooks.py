"""Every notebook in notebooks/ runs top to bottom in its small mode, as a user would run it."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# Small mode runs each notebook in well under 90 s on a 2-core CPU; a cell is given far more.
CELL_TIMEOUT_S = 600


def test_notebooks_are_found_and_were_executed() -> None:
    """The committed notebooks carry the outputs of a complete top-to-bottom run, without errors."""
    expected = {"01_quickstart", "02_linear_probe_benchmark", "03_backbone_in_your_project"}
    assert expected <= {p.stem for p in NOTEBOOKS}
    for path in NOTEBOOKS:
        cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        counts = [c.get("execution_count") for c in cells]
        assert counts == list(range(1, len(cells) + 1)), f"{path.name}: not run top to bottom ({counts})"
        errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{path.name}: saved with an error output: {errors[0].ename}: {errors[0].evalue}"


def test_python3_kernel_is_this_interpreter() -> None:
    """The notebooks run in the tests' environment: ipykernel's own "python3" kernelspec, which
    jupyter_client starts with sys.executable (a user-wide kernelspec could point elsewhere)."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")])
    NotebookClient(notebook, timeout=60, kernel_name="python3").execute()
    assert notebook.cells[0].outputs[0]["text"].strip() == sys.executable


# Notebooks whose small mode runs the same tiny benchmark commands as the session's fixtures: they
# reuse those finished runs (the scripts' --reuse, their full mode's path) instead of training again.
# Their remaining commands (check-data, predict) run in subprocesses, the scripts' default path (the
# fixtures run theirs --in-process).
REUSES_BENCHMARK_RUNS = {"04_imbalance_and_multilabel": 3}  # fits reused: 2 long-tail options, 1 multi-label


@pytest.mark.slow
@pytest.mark.parametrize(
    "path",
    [  # on the worker that made those runs (conftest's group for their fixtures), not a second worker making them again
        pytest.param(p, marks=pytest.mark.xdist_group("benchmark_runs")) if p.stem in REUSES_BENCHMARK_RUNS else p
        for p in NOTEBOOKS
    ],
    ids=lambda p: p.stem,
)
def test_notebook_runs_in_small_mode(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    monkeypatch.setenv("VT_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("VT_NOTEBOOK_OUT", str(tmp_path / "out"))  # the notebooks write here, not into runs/
    monkeypatch.setenv("VISION_TRANSFER_CACHE", str(tmp_path / "cache"))  # a cold feature cache every time
    if path.stem in REUSES_BENCHMARK_RUNS:
        request.getfixturevalue("longtail_run")
        request.getfixturevalue("multilabel_run")
        monkeypatch.setenv("VT_NOTEBOOK_REUSE", str(request.getfixturevalue("benchmark_runs")))
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    try:
        client.execute()
    except CellExecutionError as error:  # the message holds the cell source and the traceback
        pytest.fail(f"{path.name}: {error}", pytrace=False)
    if path.stem in REUSES_BENCHMARK_RUNS:  # a command that drifted from the fixture's would train again
        text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
        assert text.count("(made by the same command)") == REUSES_BENCHMARK_RUNS[path.stem], text[-3000:]
