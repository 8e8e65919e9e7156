"""Hugging Face datasets as a source, offline: a ``save_to_disk`` folder, parquet files and an image
folder (the ``imagefolder`` builder), single- and multi-label, read the same images and labels as the
files they were made from, train and extract from the command line, and refuse what they cannot read."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CLASSES, TINY_BACKBONE, TINY_SIZE, make_image, make_multilabel_image, tiny_fit_args
from tests.test_cli import run_cli
from vision_transfer.backbones import preprocessing
from vision_transfer.data.hf import read_hf
from vision_transfer.datamodules import HFDataModule
from vision_transfer.errors import DataError

datasets = pytest.importorskip("datasets")


def _rows(split: str, n: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    rng = np.random.default_rng(seed)
    labels = [i % len(CLASSES) for i in range(n)]
    return [make_image(CLASSES[c], rng) for c in labels], labels


@pytest.fixture(scope="module")
def hf_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The same dataset (train 24, validation 6, test 6) in three forms, and its arrays."""
    from PIL import Image

    root = tmp_path_factory.mktemp("hf")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    arrays, parts = {}, {}
    for split, n, seed in (("train", 24, 0), ("validation", 6, 1), ("test", 6, 2)):
        images, labels = _rows(split, n, seed)
        arrays[split] = (images, labels)
        parts[split] = datasets.Dataset.from_dict(
            {"image": [Image.fromarray(a) for a in images], "label": labels}, features=features
        )
        folder = root / "imagefolder" / split
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            (folder / CLASSES[label]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / CLASSES[label] / f"{i:03d}.png")
    saved = root / "saved"
    datasets.DatasetDict(parts).save_to_disk(str(saved))
    (root / "parquet").mkdir()
    for split, part in parts.items():
        part.to_parquet(str(root / "parquet" / f"{split}-00000-of-00001.parquet"))
    return {"saved": saved, "parquet": root / "parquet", "imagefolder": root / "imagefolder", "arrays": arrays}


@pytest.mark.parametrize("form", ["saved", "parquet", "imagefolder"])
def test_every_local_form_reads_the_same_images_labels_and_splits(hf_sources: dict, form: str) -> None:
    source = read_hf(str(hf_sources[form]), cache_dir=str(Path(hf_sources["saved"]).parent / "cache"))
    assert source.class_names == list(CLASSES)
    assert set(source.splits) == {"train", "val", "test"}
    for ours, theirs in (("train", "train"), ("val", "validation"), ("test", "test")):
        samples, (images, labels) = source.splits[ours], hf_sources["arrays"][theirs]
        assert len(samples) == len(images)
        # the imagefolder builder lists files by class folder: compare as sets of (label, pixels)
        got = sorted((int(samples.labels[i]), samples.image(i).tobytes()) for i in range(len(samples)))
        want = sorted((label, image.tobytes()) for image, label in zip(images, labels, strict=True))
        assert got == want
        assert samples.ids[0].startswith(f"{theirs}:")


def test_multilabel_and_named_labels_and_explicit_splits(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    names = ["circle", "square", "stripes"]
    sets = [{"circle"}, {"square", "stripes"}, set(), {"circle", "stripes"}] * 3
    features = datasets.Features(
        {
            "picture": datasets.Image(),
            "tags": datasets.Sequence(datasets.ClassLabel(names=names)),
            "kind": datasets.Value("string"),
        }
    )
    rows = {
        "picture": [Image.fromarray(make_multilabel_image(s, rng)) for s in sets],
        "tags": [[names.index(n) for n in sorted(s)] for s in sets],
        "kind": [["b", "a", "c"][i % 3] for i in range(len(sets))],
    }
    datasets.DatasetDict({"fit": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(
        str(tmp_path / "ml")
    )
    multi = read_hf(str(tmp_path / "ml"), "picture", "tags", splits={"train": "fit"})
    assert multi.task == "multilabel" and multi.class_names == names
    expected = np.array([[n in s for n in names] for s in sets], dtype=np.uint8)
    assert np.array_equal(multi.splits["train"].labels, expected)
    named = read_hf(str(tmp_path / "ml"), "picture", "kind", splits={"train": "fit"})
    assert named.class_names == ["a", "b", "c"]  # strings: sorted
    assert named.splits["train"].labels.tolist() == [1, 0, 2] * 4


def test_what_cannot_be_read_is_refused_by_name(hf_sources: dict, tmp_path: Path) -> None:
    saved = str(hf_sources["saved"])
    with pytest.raises(DataError, match=r"no column 'img' \(image_column\); its columns are image, label"):
        read_hf(saved, image_column="img")
    with pytest.raises(DataError, match="no split val=dev; its splits are train, validation, test"):
        read_hf(saved, splits={"train": "train", "val": "dev"})
    with pytest.raises(DataError, match="holdout are not ours"):
        read_hf(saved, splits={"train": "train", "holdout": "test"})
    unlabelled = datasets.load_from_disk(saved)
    test = unlabelled["test"].cast_column("label", datasets.Value("int64")).map(lambda row: {"label": -1})
    train = unlabelled["train"].cast_column("label", datasets.Value("int64"))
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "unlabelled"))
    with pytest.raises(DataError, match=r"\[test\] column 'label': unlabelled rows"):
        read_hf(str(tmp_path / "unlabelled"))
    assert len(read_hf(str(tmp_path / "unlabelled"), splits={"train": "train"}).splits) == 1  # left out: fine
    with pytest.raises(DataError, match="not a saved dataset"):
        read_hf(str(tmp_path / "nothing-here"))


def test_data_files_take_their_split_from_their_path_below_the_dataset_only() -> None:
    from vision_transfer.data.hf import _by_split

    root = Path("/home/test/val/data")  # split names above the dataset's folder say nothing
    files = [root / name for name in (
        "train-00000-of-00002.parquet", "train-00001-of-00002.parquet", "validation-00000.parquet",
        "test/part-0.parquet", "valid/x.parquet", "dev_0.parquet", "data.parquet", "trainer.parquet",
    )]  # fmt: skip
    groups = _by_split(files, root)
    assert {split: [Path(f).relative_to(root).as_posix() for f in names] for split, names in groups.items()} == {
        "train": ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet", "data.parquet", "trainer.parquet"],
        "validation": ["validation-00000.parquet"],
        "test": ["test/part-0.parquet"],
        "valid": ["valid/x.parquet"],
        "dev": ["dev_0.parquet"],
    }


def test_records_feed_the_feature_cache_with_a_stable_fingerprint(hf_sources: dict) -> None:
    first = read_hf(str(hf_sources["saved"])).splits["train"]
    again = read_hf(str(hf_sources["saved"])).splits["train"]
    assert first.fingerprint() == again.fingerprint()
    assert first.take(np.arange(5)).fingerprint() != first.take(np.arange(1, 6)).fingerprint()


def test_fit_and_extract_from_the_command_line(hf_sources: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = ["--data=HFDataModule", f"--data.init_args.dataset={hf_sources['saved']}"]
    assert run_cli(tiny_fit_args(data, tmp_path)) == 0
    assert "test/acc" in capsys.readouterr().out
    splits = (tmp_path / "runs" / "lightning_logs" / "version_0" / "splits.csv").read_text().splitlines()
    assert splits[0] == "split,sample,label" and {line.split(",")[0] for line in splits[1:]} == {"train", "val", "test"}
    extract = [
        "extract", f"--backbone={TINY_BACKBONE}", "--weights=none", f"--image_size={TINY_SIZE}", *data,
        f"--cache_dir={tmp_path / 'cache'}", "--num_workers=0",
    ]  # fmt: skip
    assert run_cli(extract) == 0
    out = capsys.readouterr().out
    assert re.search(r"^train\s+24 rows", out, re.M) and re.search(r"^val\s+6 rows", out, re.M)
    assert run_cli(["check-data", f"hf:{hf_sources['saved']}"]) == 0
    assert "| total | 24 | 6 | 6 |" in capsys.readouterr().out


def test_a_datamodule_over_a_dataset_decodes_through_the_loader_workers(hf_sources: dict) -> None:
    config = preprocessing(TINY_BACKBONE, "none", TINY_SIZE)
    data = HFDataModule(str(hf_sources["saved"]), data_config=config, batch_size=6, num_workers=2, augment=False)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    assert batch.images.shape == (6, 3, TINY_SIZE, TINY_SIZE) and batch.labels.tolist() == [0, 1, 2, 0, 1, 2]
