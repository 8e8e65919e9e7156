"""Every option acts on every path that accepts it, or that path refuses it by name.

One table, ``TABLE``, has a row per option of ``fit`` (the model's and the datamodule's) and of
``probe``; each row says, per path, what the option must do there:

- ``ACTS``: run the path with the option and with its default, and the outputs differ (the batch
  composition, the training loss, the final probabilities, the saved prediction settings);
- ``REFUSED``: the path refuses the option with one line naming it;
- ``Elsewhere(test, why)``: a named test in another file checks it (checked to exist here);
- ``Inert(why)``: the option changes no number by design (where files go, speed, memory).

The cases are generated from the table, and ``test_every_option_has_a_row`` fails when a new option
appears in a signature or a parser without one, so no option can be added without saying what it
does on each path. An accepted option that leaves every output bit-identical fails here.

The options of ``probe`` and ``benchmark`` have their table beside the grid's tests
(``tests/test_grid_trust.py``: ``PROBE_OPTIONS`` over the paths sgd, lbfgs, knn and fewshot, and the
benchmark's protocols), generated and checked against their ``--help`` the same way.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import TINY_BACKBONE, TINY_SIZE, write_folder
from vision_transfer.datamodules import ImageDataModule, ImageFolderDataModule
from vision_transfer.errors import VisionTransferError
from vision_transfer.tasks import ImageClassifier


@dataclass(frozen=True)
class Elsewhere:
    test: str  # "tests/file.py::test_name"
    why: str


@dataclass(frozen=True)
class Inert:
    why: str


ACTS, REFUSED = "acts", "refused"
Cell = str | Elsewhere | Inert

# the paths an option of fit can reach
FIT, CACHED, TEST, PREDICT, LOADED = "fit", "fit_cached", "test", "predict", "load_classifier"
FIT_PATHS = (FIT, CACHED)
PREDICTION_PATHS = (TEST, PREDICT, LOADED)
EXPORT = Elsewhere(
    "tests/test_multilabel.py::test_multilabel_fit_predict_load_and_export_agree",
    "TorchScript, ONNX and config.json carry the same prediction settings",
)

PLATEAU = Elsewhere(
    "tests/test_resume_ddp.py::test_plateau_scheduler_runs_through_unfreeze_milestones",
    "reductions need epochs without improvement",
)

# option -> (a value other than the default, {path: cell}); extra options the case needs go in SETUP
TABLE: dict[str, tuple[Any, dict[str, Cell]]] = {
    # -- what trains, and on what -----------------------------------------------------------------
    "balanced_sampling": (True, {FIT: ACTS, CACHED: ACTS}),
    "class_weighting": ("balanced", {FIT: ACTS, CACHED: ACTS, "multilabel": REFUSED}),
    "logit_adjustment": ("loss", {FIT: ACTS, CACHED: ACTS, "multilabel": REFUSED}),
    "logit_adjustment_tau": (2.0, {FIT: ACTS, CACHED: ACTS, "alone": REFUSED}),
    "focal_gamma": (2.0, {FIT: ACTS, CACHED: ACTS, "multilabel": REFUSED}),
    "label_smoothing": (0.3, {FIT: ACTS, CACHED: ACTS, "multilabel": ACTS}),
    "asymmetric_loss": (True, {"multilabel": ACTS, FIT: REFUSED}),
    "mixup_alpha": (0.4, {FIT: ACTS, CACHED: REFUSED}),
    "cutmix_alpha": (1.0, {FIT: ACTS, CACHED: REFUSED}),
    "mix_prob": (0.5, {FIT: ACTS, "alone": REFUSED}),
    "drop_rate": (0.5, {FIT: ACTS, CACHED: ACTS}),
    "drop_path_rate": (0.5, {FIT: ACTS, CACHED: REFUSED, "no_residual_blocks": REFUSED}),
    "augment": ("strong", {FIT: ACTS, CACHED: REFUSED}),
    "scale_min": (0.9, {FIT: ACTS, CACHED: REFUSED, "augment_none": REFUSED}),
    "hflip": (1.0, {FIT: ACTS, CACHED: REFUSED, "augment_none": REFUSED}),
    "color_jitter": (0.4, {FIT: ACTS, CACHED: REFUSED, "augment_none": REFUSED}),
    "ema_decay": (
        0.9,
        {
            FIT: ACTS,
            CACHED: ACTS,
            "resume": Elsewhere(
                "tests/test_training_options.py::test_accumulation_and_ema_work_from_the_cli",
                "EMA weights are what is validated, saved and resumed",
            ),
        },
    ),
    # -- how predictions are made ----------------------------------------------------------------
    "tta": ("flip", {TEST: ACTS, PREDICT: ACTS, LOADED: ACTS, "export": EXPORT}),
    "logit_adjustment=posthoc": ("posthoc", {TEST: ACTS, PREDICT: ACTS, LOADED: ACTS, "export": EXPORT}),
    "calibrate": (
        False,
        {
            "fit": Elsewhere(
                "tests/test_predictions.py::test_fit_calibrates_on_val_and_the_checkpoint_export_and_predict_use_the_temperature",
                "fit fits the temperature on val; the checkpoint, the export and predict use it",
            ),
            "calibrate": Elsewhere(
                "tests/test_predictions.py::test_calibrate_command_on_a_checkpoint", "the command fits it afterwards"
            ),
            TEST: ACTS,
            PREDICT: ACTS,
            LOADED: ACTS,
        },
    ),
    # -- the tuning policy (tests/test_tuning.py, tests/test_schedules.py sweep modes and schedulers) ----
    "mode": ("lp_ft", {FIT: ACTS, CACHED: REFUSED}),
    "trainable_groups": (2, {"mode=partial": ACTS, "alone": REFUSED}),
    "unfreeze_every": (2, {"mode=gradual": ACTS, "alone": REFUSED}),
    "unfreeze_milestones": ([0, 5], {"mode=gradual": ACTS, "alone": REFUSED}),
    "milestone_unit": ("step", {"mode=gradual": ACTS, "alone": REFUSED}),
    "lp_epochs": (2, {"mode=lp_ft": ACTS, "alone": REFUSED}),
    "rewarm": (True, {"mode=gradual": ACTS, "alone": REFUSED}),
    "bn": ("train", {"mode=linear_probe": ACTS, "peft=lora": ACTS, "alone": REFUSED}),
    # parameter-efficient fine-tuning (tests/test_adapters.py sweeps every timm family)
    "peft": ("lora", {FIT: ACTS, "mode=lp_ft": ACTS, CACHED: REFUSED, "mode=linear_probe": REFUSED}),
    "peft=bitfit": ("bitfit", {FIT: ACTS, "mode=lp_ft": ACTS, "mode=linear_probe": REFUSED}),
    "lora_r": (4, {"peft=lora": ACTS, "alone": REFUSED}),
    "lora_alpha": (4.0, {"peft=lora": ACTS, "alone": REFUSED}),
    "lora_dropout": (0.5, {"peft=lora": ACTS, "alone": REFUSED}),
    "lora_dora": (True, {"peft=lora": ACTS, "alone": REFUSED}),
    "lora_targets": ([r"blocks\.\d+\.\d+\.conv_pwl"], {"peft=lora": ACTS, "alone": REFUSED}),
    # knowledge distillation (tests/test_distillation.py: the loss, the teacher's view and preprocessing)
    "teacher": (
        "teacher.ckpt",
        {
            FIT: Elsewhere(
                "tests/test_distillation.py::test_a_student_distils_from_its_teacher_which_sees_the_mixed_view_and_stays_out_of_the_checkpoint",
                "a teacher of another family and preprocessing changes the training loss; only its path is saved",
            ),
            CACHED: REFUSED,
        },
    ),
    "kd_alpha": (
        0.9,
        {
            "teacher": Elsewhere(
                "tests/test_distillation.py::test_kd_loss_is_hintons_term_scaled_by_t_squared",
                "loss = (1 - kd_alpha) * task loss + kd_alpha * the hand-checked term",
            ),
            "alone": REFUSED,
        },
    ),
    "kd_temperature": (
        4.0,
        {
            "teacher": Elsewhere(
                "tests/test_distillation.py::test_kd_loss_is_hintons_term_scaled_by_t_squared",
                "the softening temperature of the hand-checked term",
            ),
            "alone": REFUSED,
        },
    ),
    "kd_feature_weight": (
        1.0,
        {
            "teacher": Elsewhere(
                "tests/test_distillation.py::test_a_student_distils_from_its_teacher_which_sees_the_mixed_view_and_stays_out_of_the_checkpoint",
                "the feature term is logged and changes the training loss; the hand-checked term in "
                "test_feature_kd_is_the_similarity_preserving_term_for_any_feature_sizes",
            ),
            "alone": REFUSED,
        },
    ),
    "kd_cache": (
        True,
        {
            "teacher": Elsewhere(
                "tests/test_distillation.py::test_kd_cache_runs_the_teacher_once_per_image_and_trains_as_without_it",
                "the teacher runs once per image and the student ends as without it (speed, by design)",
            ),
            "alone": REFUSED,
            "mixup_alpha=0.2": Elsewhere(
                "tests/test_distillation.py::test_kd_cache_refuses_views_that_change",
                "refused with mixing, with an augmenting datamodule and with views new every epoch",
            ),
        },
    ),
    "layer_decay": (0.5, {FIT: ACTS, "mode=linear_probe": REFUSED}),
    "momentum": (0.5, {"optimizer=sgd": ACTS, "alone": REFUSED}),
    "adam_betas": ((0.5, 0.9), {FIT: ACTS, CACHED: ACTS, "optimizer=sgd": REFUSED}),
    "optimizer": ("sgd", {FIT: ACTS, CACHED: ACTS}),
    "lr": (1e-2, {FIT: ACTS, CACHED: ACTS}),
    "head_lr": (1e-2, {FIT: ACTS, CACHED: ACTS}),
    "weight_decay": (0.5, {FIT: ACTS, CACHED: ACTS}),
    "warmup_epochs": (0.0, {FIT: ACTS, "scheduler=constant": REFUSED}),
    "min_lr_ratio": (0.5, {FIT: ACTS, "scheduler=constant": REFUSED}),
    "scheduler": ("constant", {FIT: ACTS, CACHED: ACTS}),
    "plateau_factor": (0.5, {"scheduler=plateau": PLATEAU, "alone": REFUSED}),
    "plateau_patience": (1, {"scheduler=plateau": PLATEAU, "alone": REFUSED}),
    "grad_checkpointing": (
        True,
        {
            FIT: Elsewhere(
                "tests/test_training_options.py::test_grad_checkpointing_stores_less_and_gives_the_same_gradients",
                "less memory, the same gradients (by design no number changes)",
            ),
            "mode=linear_probe": REFUSED,
        },
    ),
    "cache_dir": (
        "somewhere",
        {
            CACHED: Inert("where features are stored"),
            "kd_cache": Elsewhere(
                "tests/test_distillation.py::test_kd_cache_runs_the_teacher_once_per_image_and_trains_as_without_it",
                "where the teacher's outputs are kept",
            ),
            "alone": REFUSED,
        },
    ),
    # -- what defines the model, the data and the run (each with its own tests) -------------------
    "backbone": (
        None,
        {
            FIT: Elsewhere(
                "tests/test_families.py::test_freezing_trains_exactly_the_trainable_groups", "every timm family"
            )
        },
    ),
    "weights": (None, {FIT: Elsewhere("tests/test_backbones.py", "packaged, timm, none, files")}),
    "class_names": (
        None,
        {
            FIT: Elsewhere(
                "tests/test_trust.py::test_a_model_for_data_with_given_classes_gets_the_training_class_counts",
                "counts still come from the data",
            )
        },
    ),
    "image_size": (None, {FIT: Elsewhere("tests/test_preprocessing.py", "the data config follows it")}),
    "task": (None, {FIT: Elsewhere("tests/test_multilabel.py", "multilabel heads, metrics and thresholds")}),
    "data_config": (None, {FIT: Elsewhere("tests/test_preprocessing.py", "checkpoints record it")}),
    "cache_features": (
        None,
        {
            CACHED: Elsewhere(
                "tests/test_features.py::test_linear_probe_classifier_trains_on_the_feature_cache",
                "the cached path itself",
            )
        },
    ),
    "stop_on_nan": (
        None,
        {
            FIT: Elsewhere(
                "tests/test_bad_input.py::test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint",
                "stops on a NaN loss",
            )
        },
    ),
    "channels_last": (
        None,
        {
            FIT: Elsewhere(
                "tests/test_training_options.py::test_channels_last_changes_the_layout_not_the_result",
                "layout, not result",
            )
        },
    ),
    "compile": (
        None,
        {
            FIT: Elsewhere(
                "tests/test_training_options.py::test_compiled_backbone_trains_through_the_unfreezing_hooks", "speed"
            )
        },
    ),
    "batch_size": (None, {FIT: Inert("images per step: every path uses it")}),
    "num_workers": (None, {FIT: Inert("speed only")}),
    "val_fraction": (None, {FIT: Elsewhere("tests/test_data.py", "seeded stratified splits")}),
    "test_fraction": (None, {FIT: Elsewhere("tests/test_data.py", "seeded stratified splits")}),
    "split_seed": (None, {FIT: Elsewhere("tests/test_data.py", "seeded stratified splits")}),
    "max_train_samples": (None, {FIT: Elsewhere("tests/test_data.py", "class-balanced subsets")}),
    "max_val_samples": (None, {FIT: Elsewhere("tests/test_data.py", "class-balanced subsets")}),
    "max_test_samples": (None, {FIT: Elsewhere("tests/test_data.py", "class-balanced subsets")}),
    "verify_images": (None, {FIT: Elsewhere("tests/test_bad_input.py", "bad files fail before training")}),
    "on_bad_image": (None, {FIT: Elsewhere("tests/test_bad_input.py", "skip lists the bad images")}),
    "decode": (
        "fast",
        {
            FIT: Elsewhere(
                "tests/test_decode.py::test_the_datamodule_decodes_as_told_on_every_split_and_predict",
                "JPEGs only (the table's data is PNG): every split and predict, within a tested tolerance of timm",
            ),
            CACHED: REFUSED,  # extraction decodes in full, what the feature cache records
        },
    ),
    "predict_paths": (None, {PREDICT: Elsewhere("tests/test_cli.py", "the predict command")}),
    # what a model and its data are built with (ImageClassifier.for_data, the command line's links)
    "class_counts": (
        None,
        {
            FIT: Elsewhere(
                "tests/test_classifier.py::test_for_data_builds_the_model_whole_and_nothing_is_handed_over_later",
                "the data's training counts, at construction",
            )
        },
    ),
    "classes": (
        None,
        {
            TEST: Elsewhere(
                "tests/test_cli.py::test_the_checkpoints_classes_win_for_test_and_predict",
                "a checkpoint's classes index the data's labels",
            )
        },
    ),
}
DATA_OPTIONS = set(inspect.signature(ImageDataModule.__init__).parameters) - {"self"}


def test_every_option_has_a_row() -> None:
    model = set(inspect.signature(ImageClassifier.__init__).parameters) - {"self"}
    rows = {name.split("=")[0] for name in TABLE}
    missing = sorted((model | DATA_OPTIONS) - rows)
    assert not missing, f"options without a row in TABLE: {missing}"
    stale = sorted(rows - model - DATA_OPTIONS)
    assert not stale, f"rows of options that no longer exist: {stale}"


def test_every_elsewhere_names_a_test_that_exists() -> None:
    root = Path(__file__).parent.parent
    for option, (_, cells) in TABLE.items():
        for cell in cells.values():
            if not isinstance(cell, Elsewhere):
                continue
            file, _, name = cell.test.partition("::")
            assert (root / file).is_file(), f"{option}: {file} does not exist"
            if name:
                module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
                assert callable(getattr(module, name, None)), f"{option}: {cell.test} does not exist"


# -- the cases ----------------------------------------------------------------------------------
MODEL_OPTIONS = set(inspect.signature(ImageClassifier.__init__).parameters)
CONTEXT = {  # what a path name means: the settings that path runs under
    FIT: {"mode": "full"},
    CACHED: {"mode": "linear_probe", "cache_features": True},
    "multilabel": {"mode": "full", "task": "multilabel"},
    "augment_none": {"mode": "full", "augment": "none"},
    "alone": {"mode": "full"},
    "no_residual_blocks": {"mode": "full", "backbone": "test_efficientnet"},
    "mode=partial": {"mode": "partial"},
    "mode=gradual": {"mode": "gradual"},
    "mode=lp_ft": {"mode": "lp_ft"},
    "mode=linear_probe": {"mode": "linear_probe"},
    "optimizer=sgd": {"mode": "full", "optimizer": "sgd"},
    "scheduler=constant": {"mode": "full", "scheduler": "constant"},
    "scheduler=plateau": {"mode": "full", "scheduler": "plateau"},
    "peft=lora": {"mode": "full", "peft": "lora"},
}
NEEDS = {  # options that act only together with another (their "alone" row says so)
    "logit_adjustment_tau": {"logit_adjustment": "loss"},
    "mix_prob": {"mixup_alpha": 1.0},
    "drop_path_rate": {"backbone": "test_resnet"},  # test_efficientnet has no residual block (refused)
}


def _cases(kind: str, paths: Any) -> list[Any]:
    return [
        pytest.param(option, path, id=f"{option}-{path}")
        for option, (_, cells) in TABLE.items()
        for path, cell in cells.items()
        if cell == kind and path in paths
    ]


def test_every_acts_and_refused_cell_is_a_case() -> None:
    """A cell on a path no case runs would be a claim nobody checks."""
    for kind in (ACTS, REFUSED):
        cells = [(o, p) for o, (_, cs) in TABLE.items() for p, c in cs.items() if c == kind]
        runnable = {tuple(c.values) for c in _cases(kind, (*CONTEXT, *PREDICTION_PATHS))}
        assert set(cells) == runnable, sorted(set(cells) - runnable)


@pytest.fixture(scope="module")
def long_tailed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("option_paths") / "images"
    for name, n, seed in (("circle", 16, 0), ("square", 6, 1), ("stripes", 4, 2)):
        write_folder(root, per_class=n, seed=seed, classes=(name,))
    return root


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One feature cache for every cached-fit case of the module."""
    return tmp_path_factory.mktemp("option_paths_cache")


@pytest.fixture(scope="module")
def multilabel_csv(tmp_path_factory: pytest.TempPathFactory, long_tailed: Path) -> Path:
    """The same images, each also labelled ``bright`` when its class is circle or stripes."""
    path = long_tailed / "multilabel.csv"
    lines = ["path,labels"]
    for i, image in enumerate(sorted(long_tailed.rglob("*.png"))):
        extra = ";odd" if i % 2 else ""
        lines.append(f"{image.relative_to(long_tailed).as_posix()},{image.parent.name}{extra}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _split(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    model = {k: v for k, v in settings.items() if k in MODEL_OPTIONS}
    data = {k: v for k, v in settings.items() if k not in MODEL_OPTIONS and k != "task"}
    return model, data


def _build(settings: dict[str, Any], root: Path, csv: Path, cache: Path) -> tuple[ImageClassifier, Any]:
    from vision_transfer.backbones import preprocessing
    from vision_transfer.datamodules import CachedFeatureDataModule, CsvDataModule

    model_options, data_options = _split(settings)
    model_options.pop("task", None)  # the data's (the CSV's labels): ImageClassifier.for_data takes it
    if model_options.get("cache_features"):
        model_options["cache_dir"] = str(cache)
    model_options.setdefault("backbone", TINY_BACKBONE)
    config = preprocessing(model_options["backbone"], "none", TINY_SIZE)
    common = {"batch_size": 4, "num_workers": 0, "val_fraction": 0.2, "test_fraction": 0.2, **data_options}
    if settings.get("task") == "multilabel":
        data: Any = CsvDataModule(str(csv), data_config=config, **common)
    else:
        data = ImageFolderDataModule(str(root), data_config=config, **common)
    model = ImageClassifier.for_data(data, weights="none", image_size=TINY_SIZE, **model_options)
    return model, CachedFeatureDataModule(data, model) if model.hparams.get("cache_features") else data


_RUNS: dict[str, dict[str, Any]] = {}


def _training_outputs(settings: dict[str, Any], root: Path, csv: Path, cache: Path) -> dict[str, Any]:
    """What the first steps of fit produce: the batches, the losses, the learning rates, the weights
    (each setting's run once per session: the defaults are shared by many cases)."""
    key = repr(sorted(settings.items()))
    if key not in _RUNS:
        _RUNS[key] = _train(settings, root, csv, cache)
    return _RUNS[key]


def _train(settings: dict[str, Any], root: Path, csv: Path, cache: Path) -> dict[str, Any]:
    import pytorch_lightning as pl

    pl.seed_everything(0, verbose=False)
    model, data = _build(settings, root, csv, cache)
    trainer = pl.Trainer(
        max_steps=6, max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu",
    )  # fmt: skip
    seen: dict[str, list[Any]] = {"labels": [], "loss": [], "lr": []}

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            seen["labels"].append(batch[1].tolist())
            seen["loss"].append(float(outputs["loss"]) if outputs is not None else None)
            seen["lr"].append([g["lr"] for g in trainer.optimizers[0].param_groups])

    trainer.callbacks.append(Record())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=data)
    seen["weights"] = [p.detach().clone() for p in model.parameters()]
    return seen


def _value(option: str) -> tuple[str, Any]:
    name = option.split("=")[0]
    return name, TABLE[option][0]


@pytest.mark.parametrize(("option", "path"), _cases(ACTS, CONTEXT))
def test_option_acts_on_the_training_path(
    option: str, path: str, long_tailed: Path, multilabel_csv: Path, feature_cache: Path
) -> None:
    cache = feature_cache
    name, value = _value(option)
    base = {**CONTEXT[path], **NEEDS.get(name, {})}
    if name == "mode":
        base.pop("mode")
    default = _training_outputs(base, long_tailed, multilabel_csv, cache)
    changed = _training_outputs({**base, name: value}, long_tailed, multilabel_csv, cache)
    differs = [
        key
        for key in default
        if (key != "weights" and default[key] != changed[key])
        or (key == "weights" and any(not torch.equal(a, b) for a, b in zip(default[key], changed[key], strict=False)))
    ]
    assert differs, f"{name}={value!r} on {path}: every output is bit-identical to the default's"


@pytest.mark.parametrize(("option", "path"), _cases(REFUSED, CONTEXT))
def test_option_is_refused_by_name_where_it_cannot_act(
    option: str, path: str, long_tailed: Path, multilabel_csv: Path, feature_cache: Path
) -> None:
    cache = feature_cache
    name, value = _value(option)
    settings = {**CONTEXT[path], name: value}
    with pytest.raises(VisionTransferError, match=name):
        _build(settings, long_tailed, multilabel_csv, cache)


# -- prediction options on the prediction paths ---------------------------------------------------
def _predictions(settings: dict[str, Any], path: str, tmp_path: Path) -> torch.Tensor:
    """Final probabilities (or, on TEST, the logged TTA/plain metrics) of one fixed batch."""
    from vision_transfer import load_classifier

    tta = settings.get("tta", "none")
    torch.manual_seed(0)
    model = ImageClassifier(
        TINY_BACKBONE, weights="none", image_size=TINY_SIZE, class_names=["a", "b", "c"], tta=tta,
        logit_adjustment=settings.get("logit_adjustment", "none"), class_counts=[30.0, 15.0, 5.0],
    )  # fmt: skip
    with torch.no_grad():
        model.head.weight.mul_(50)  # spread the logits so the settings move predictions
    if settings.get("calibrate", True):
        model.temperature.fill_(0.25)  # what a fitted temperature looks like in the checkpoint
    model.eval()
    images = torch.randn(24, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(24) % 3
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path == PREDICT:
            return model.predict_step((images, labels), 0)
        if path == TEST:
            model.test_step((images, labels), 0)
            scores = model.tta_scores if tta != "none" else model.test_scores
            return torch.stack([v.float() for v in scores.compute().values() if v.ndim == 0])
        checkpoint = model.save_standalone_checkpoint(tmp_path / f"{abs(hash(str(settings)))}.ckpt")
        return load_classifier(checkpoint).prediction_head().probabilities(images)


@pytest.mark.parametrize(("option", "path"), _cases(ACTS, PREDICTION_PATHS))
def test_prediction_option_acts_on_every_prediction_path(option: str, path: str, tmp_path: Path) -> None:
    name, value = _value(option)
    default = _predictions({}, path, tmp_path)
    changed = _predictions({name: value}, path, tmp_path)
    assert not torch.equal(default, changed), f"{name}={value!r} on {path}: the output did not change"


@pytest.mark.parametrize("settings", [{}, {"tta": "flip"}, {"logit_adjustment": "posthoc"}, {"calibrate": False},
                                      {"tta": "flip_zoom", "logit_adjustment": "posthoc"}])  # fmt: skip
def test_prediction_paths_agree(settings: dict[str, Any], tmp_path: Path) -> None:
    """predict and load_classifier give the same probabilities, and test's metrics count them (once)."""
    predicted = _predictions(settings, PREDICT, tmp_path)
    loaded = _predictions(settings, LOADED, tmp_path)
    assert torch.allclose(predicted, loaded, atol=1e-6)
    logged = _predictions(settings, TEST, tmp_path)
    labels = torch.arange(24) % 3
    assert float(logged[0]) == pytest.approx(float((predicted.argmax(1) == labels).float().mean()), abs=1e-6)
