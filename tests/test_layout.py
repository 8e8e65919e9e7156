"""The package layout: which package loads which, Lightning only where needed, a CLI that answers at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vision_transfer.app.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
# no Lightning
LIBRARY = (
    "backbones", "data", "tuning", "losses", "evaluation", "inference", "features", "export", "report", "checkpoint"
)  # fmt: skip
PACKAGES = (*LIBRARY, "datamodules", "tasks", "callbacks", "app")
# what each package may load of ours; `app` (the command line and runners) sits on top of everything
MAY_LOAD = {
    "backbones": set(),
    "data": {"backbones"},
    "tuning": set(),
    "losses": set(),
    "evaluation": {"inference", "losses"},  # metrics, task kinds, statistics and the protocols
    "inference": set(),
    "features": {"backbones", "data"},  # extraction and the cache only: nothing that evaluates
    "checkpoint": {"backbones"},  # the checkpoint format: one reader and writer (a module)
    "export": {"backbones", "checkpoint", "data", "evaluation", "inference", "losses", "tuning"},  # tuning: merging
    "report": {"evaluation"},  # the metrics only (numpy): the task kinds load on first use
    "datamodules": {"backbones", "data", "evaluation", "features", "inference", "losses"},
    "callbacks": {"evaluation", "report"},
    "tasks": {"backbones", "checkpoint", "data", "tuning", "losses", "evaluation", "inference", "callbacks", "report"},
    "app": set(PACKAGES),
}


def _python(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env={**os.environ, **env}, check=True
    )
    return result.stdout


# One interpreter loads the heavy third-party libraries once (none of them loads ours or Lightning),
# then forks a child per package, which imports it and reports what of ours and whether Lightning
# came with it: the same answer as one fresh interpreter per package, without 14 torch imports.
_LOADS = """
import json, os, sys
import numpy, PIL.Image, scipy.stats, timm, torch, torchvision
assert not [m for m in sys.modules if m.startswith(("vision_transfer", "pytorch_lightning"))]
for package in sys.argv[1:]:
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        __import__(f"vision_transfer.{package}")
        ours = {m.split(".")[1] for m in sys.modules if m.startswith("vision_transfer.")} - {"errors", "files"}
        os.write(write, json.dumps([sorted(ours), "pytorch_lightning" in sys.modules]).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        print(package, pipe.read())
    assert os.wait()[1] == 0, package
"""


def _loads(packages: tuple[str, ...]) -> dict[str, tuple[set[str], bool]]:
    """For each package: the packages of ours that importing it loads (the leaf modules ``errors`` and
    ``files``, which every package may use, left out) and whether Lightning came with them."""
    out = subprocess.run(
        [sys.executable, "-c", _LOADS, *packages], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    loads = {}
    for line in out.splitlines():
        package, answer = line.split(" ", 1)
        ours, lightning = json.loads(answer)
        loads[package] = (set(ours) - {package}, lightning)
    return loads


def test_each_package_loads_only_what_it_may_and_the_graph_has_no_cycle() -> None:
    loads = _loads(PACKAGES)
    assert set(loads) == set(PACKAGES)
    for package, (ours, lightning) in loads.items():
        assert ours <= MAY_LOAD[package], f"{package} loads {sorted(ours - MAY_LOAD[package])}"
        if package in LIBRARY:
            assert not lightning, f"{package} imports Lightning"
    for a in PACKAGES:  # no two packages load each other (directly or not)
        for b in loads[a][0]:
            assert a not in loads[b][0], f"cycle: {a} <-> {b}"


def test_top_level_help_lists_every_command_without_importing_torch() -> None:
    out = _python(
        "import sys; from vision_transfer.app.cli import main; main(['--help']); print('torch' in sys.modules)"
    )
    lines = out.strip().splitlines()
    assert lines[-1] == "False"
    listed = [line.split()[0] for line in lines if line.startswith("  ")]
    assert listed == list(COMMANDS) and len(listed) == 17


def test_command_help_is_cached_after_the_first_time(tmp_path: Path) -> None:
    code = (
        "import sys; from vision_transfer.app.cli import main; main(['fit', '--help']); print('torch' in sys.modules)"
    )
    first = _python(code, XDG_CACHE_HOME=str(tmp_path), COLUMNS="100")
    second = _python(code, XDG_CACHE_HOME=str(tmp_path), COLUMNS="100")
    assert first.endswith("True\n") and second.endswith("False\n")  # the second answers from the cache
    assert first.removesuffix("True\n") == second.removesuffix("False\n")
    assert "--model.lr" in second and "--trainer.max_epochs" in second and "--ckpt_path" in second


@pytest.mark.parametrize("command", ["export", "check-data", "report", "backbones", "lr-find"])
def test_light_command_help_imports_no_torch(command: str) -> None:
    code = f"import sys\nfrom vision_transfer.app.cli import main\ntry:\n    main([{command!r}, '--help'])\n"
    code += "except SystemExit:\n    pass\nprint('torch' in sys.modules)"
    out = _python(code)
    assert out.strip().splitlines()[-1] == "False" and "usage:" in out


def test_unknown_command_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    from vision_transfer.app.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fti"])
    assert exit_info.value.code == 2
    assert "unknown command 'fti'" in capsys.readouterr().err


def _imports() -> dict[str, set[tuple[str, str]]]:
    """module -> {(imported module, name)} of every ``vision_transfer`` import in it, at any depth."""
    import ast

    out: dict[str, set[tuple[str, str]]] = {}
    for path in (REPO / "vision_transfer").rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        found: set[tuple[str, str]] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vision_transfer"):
                found |= {(node.module or "", alias.name) for alias in node.names}
            elif isinstance(node, ast.Import):
                found |= {(alias.name, "") for alias in node.names if alias.name.startswith("vision_transfer")}
        out[module] = found
    return out


def test_no_module_imports_a_private_name_of_another() -> None:
    private = sorted(
        f"{module} imports {source}.{name}"
        for module, names in _imports().items()
        for source, name in names
        if name.startswith("_") and not name.startswith("__") and source != module
    )
    assert not private, private


def test_no_two_modules_import_each_other() -> None:
    imports = _imports()
    edges = {(module, source) for module, names in imports.items() for source, _ in names if source in imports}
    cycles = sorted(f"{a} <-> {b}" for a, b in edges if (b, a) in edges and a < b)
    assert not cycles, cycles


def test_the_metrics_and_the_report_load_no_torch() -> None:
    """The report redraws a run folder without torch; it shares the metrics, so they are numpy only."""
    code = "import sys, vision_transfer.evaluation, vision_transfer.report\n"
    code += "print('torch' in sys.modules, 'torchmetrics' in sys.modules)"
    assert _python(code).split() == ["False", "False"]


def test_features_holds_extraction_and_the_cache_and_evaluation_the_protocols() -> None:
    """One home per concept: ``features/`` makes and caches features, ``evaluation/`` scores them."""
    package = REPO / "vision_transfer"
    assert {p.stem for p in (package / "features").glob("*.py")} == {"__init__", "cache", "extract"}
    protocols = {"linear", "stream", "knn", "fewshot", "stats", "metrics"}
    assert protocols <= {p.stem for p in (package / "evaluation").glob("*.py")}
    assert not (package / "stats.py").exists()
    exported = _python("import vision_transfer.features as f; print(' '.join(f.__all__))").split()
    assert exported and all(name.startswith(("Feature", "extract", "feature", "content")) for name in exported)


def _calls_and_keys(path: Path) -> tuple[set[str], set[str]]:
    """Names called (``torch.load``, ``safe_torch_load``...) and string constants used as keys (subscripts,
    ``get``/``setdefault``/``pop`` arguments, dict literal keys) in one file."""
    import ast

    calls: set[str] = set()
    keys: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            calls.add(ast.unparse(node.func))
            if isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "setdefault", "pop") and node.args:
                keys |= {node.args[0].value} if isinstance(node.args[0], ast.Constant) else set()
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            keys.add(node.slice.value)
        elif isinstance(node, ast.Dict):
            keys |= {k.value for k in node.keys if isinstance(k, ast.Constant)}
    return calls, keys


def test_one_checkpoint_reader_and_writer() -> None:
    """Only ``vision_transfer/checkpoint.py`` loads, validates and writes the checkpoint's sections of ours.

    ``torch.load`` runs in one place, ``safe_torch_load`` (weights only), which the checkpoint module
    and the weights-file loader (``load_file``: ``.pth``/``.bin``/state dicts, ``weights=<file>``) call;
    Lightning's ``load_from_checkpoint`` is not called (it would read the file a second time); the
    keys ``vision_transfer`` and ``hyper_parameters`` are used only there, except the export's own
    ``config.json`` section, which ``export/timm_format.py`` writes and reads.
    """
    found: dict[str, list[str]] = {"torch.load": [], "safe_torch_load": [], "load_from_checkpoint": []}
    keys: dict[str, list[str]] = {"vision_transfer": [], "hyper_parameters": []}
    for path in sorted((REPO / "vision_transfer").rglob("*.py")):
        name = path.relative_to(REPO / "vision_transfer").as_posix()
        calls, used = _calls_and_keys(path)
        for call, where in found.items():
            where += [name] if any(c == call or c.endswith("." + call) for c in calls) else []
        for key, where in keys.items():
            where += [name] if key in used else []
    assert found == {
        "torch.load": ["backbones/weights.py"],
        "safe_torch_load": ["backbones/weights.py", "checkpoint.py"],
        "load_from_checkpoint": [],
    }
    assert keys == {"vision_transfer": ["export/timm_format.py"], "hyper_parameters": []}
    source = (REPO / "vision_transfer" / "checkpoint.py").read_text()
    assert 'ENTRY = "vision_transfer"' in source and 'SETTINGS = "hyper_parameters"' in source


# the data readers decide the kind (from the labels' shape and the user's CSV options); everything else asks it
KIND_DECIDED = {"vision_transfer/evaluation/kinds.py", "vision_transfer/data/sources.py", "vision_transfer/data/hf.py"}
KIND_FLAG_READERS = {  # a multilabel flag read from files or given as an option (the CSV datamodule)
    "vision_transfer/data/sources.py",
    "vision_transfer/data/mixing.py",
    "vision_transfer/data/check.py",
    "vision_transfer/datamodules/image.py",
}


def _kind_branches(path: Path) -> list[str]:
    """Kind names as string constants (not docstrings), and conditions that test a ``multilabel`` flag."""
    import ast

    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in ("multiclass", "multilabel") and id(node) not in docstrings:
            found.append(f"{path.name}:{node.lineno} the literal {node.value!r}")
        if isinstance(node, (ast.If, ast.IfExp, ast.While, ast.BoolOp)):
            tests = [node.test] if not isinstance(node, ast.BoolOp) else node.values
            for test in tests:
                for sub in ast.walk(test):
                    name = sub.attr if isinstance(sub, ast.Attribute) else sub.id if isinstance(sub, ast.Name) else ""
                    if name == "multilabel":
                        found.append(f"{path.name}:{sub.lineno} a condition on `multilabel`")
    return found


def test_no_branch_on_the_task_kind_outside_the_kind_module() -> None:
    """Single- vs multi-label is decided in ``evaluation/kinds.py`` (and read from the data in ``data/``):
    no other module names a kind or tests a ``multilabel`` flag."""
    branches = []
    for path in sorted((REPO / "vision_transfer").rglob("*.py")):
        relative = str(path.relative_to(REPO))
        found = _kind_branches(path)
        if relative in KIND_DECIDED:
            continue
        if relative in KIND_FLAG_READERS:
            found = [f for f in found if "literal" in f]
        branches += found
    assert not branches, branches


def test_the_kind_branch_check_finds_what_it_looks_for(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""A docstring naming "multilabel" is prose."""\n'
        "def f(model, task):\n"
        "    if model.multilabel:\n"
        "        return 1\n"
        "    x = 2 if task == 'multiclass' else 3\n"
        "    return x and multilabel\n"
    )
    found = _kind_branches(sample)
    assert len(found) == 3 and any("'multiclass'" in f for f in found), found


# what a model and its datamodule are built with (LightningCLI links, ImageClassifier.for_data): never patched later
BUILT_WITH = {"data_config", "class_names", "class_counts", "task", "kind", "classes", "fixed_classes", "fixed_task"}


def _assignments_to_others(path: Path) -> list[str]:
    """Assignments (``x.attr = ...``, ``setattr(x, "attr", ...)``) from outside an object: to one of the
    ``BUILT_WITH`` attributes or a private one of any object but ``self``."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[tuple[ast.expr, str]] = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for sub in ast.walk(target):  # tuple targets too
                    if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store):
                        targets.append((sub.value, sub.attr))
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "setattr" and len(node.args) == 3:
            name = node.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                targets.append((node.args[0], name.value))
        for owner, attr in targets:
            if isinstance(owner, ast.Name) and owner.id == "self":
                continue
            if attr in BUILT_WITH or (attr.startswith("_") and not attr.startswith("__")):
                found.append(f"{path.name}:{node.lineno} {ast.unparse(owner)}.{attr}")
    return found


def test_no_module_patches_what_an_object_was_built_with() -> None:
    """Built whole: the preprocessing, classes, task and class counts are constructor arguments; no module
    assigns them (or a private attribute) to another object afterwards."""
    found = [f for path in sorted((REPO / "vision_transfer").rglob("*.py")) for f in _assignments_to_others(path)]
    assert not found, found


def test_the_patch_check_finds_what_it_looks_for(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def link(model, data):\n"
        "    self = model\n"
        "    self.data_config = 1\n"  # a name called self: the check reads names, as a reviewer would
        "    data.data_config = model.data_config\n"
        "    model._handed_out = True\n"
        "    setattr(data, 'class_names', [])\n"
        "    data.batch_size = 8\n"
    )
    found = _assignments_to_others(sample)
    assert [f.split()[1] for f in found] == ["data.data_config", "model._handed_out", "data.class_names"], found


def _batch_kind_tests(path: Path) -> list[str]:
    """Names of the batch types in ``path`` (a module that names them can ask which it has)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name) and node.id in ("FeatureBatch", "ImageBatch"):
            found.append(f"{path.name}:{node.lineno} names {node.id}")
    return found


def test_the_classifier_never_asks_which_batch_it_has() -> None:
    """Images or cached features: the batch answers (``data/dataset.py``); the model never branches on it."""
    found = [f for path in sorted((REPO / "vision_transfer" / "tasks").rglob("*.py")) for f in _batch_kind_tests(path)]
    assert not found, found
    sample = REPO / "vision_transfer" / "app" / "calibrate.py"
    assert not _batch_kind_tests(sample), "calibration collects logits through the batch too"
    # the check sees what it looks for
    assert _batch_kind_tests(REPO / "vision_transfer" / "datamodules" / "features.py")
