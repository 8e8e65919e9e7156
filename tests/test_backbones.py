"""Backbones: the packaged ImageNet weights are real, every weight source loads, bad ones say why."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from skimage import data as skdata

from tests.conftest import TINY_BACKBONE
from vision_transfer import create_backbone, create_model, list_backbones
from vision_transfer.backbones import resolve_weights
from vision_transfer.data import create_eval_transform
from vision_transfer.errors import UnknownBackboneError, UnsafeCheckpointError, WeightsError

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def imagenet_top1(model: torch.nn.Module, config, image: np.ndarray) -> int:
    """Classify one RGB array with the project's own eval transform and normalisation."""
    x = create_eval_transform(config)(image=image)["image"].unsqueeze(0).float() / 255
    x = (x - torch.tensor(config.mean).view(1, 3, 1, 1)) / torch.tensor(config.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        return int(model.eval()(x).argmax(1))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_packaged_weights_are_real_imagenet_weights(name: str) -> None:
    model, config = create_model(name, weights="packaged")
    assert config.mean == (0.5, 0.5, 0.5) and config.interpolation == "bicubic"
    assert imagenet_top1(model, config, skdata.chelsea()) in CAT_CLASSES
    assert imagenet_top1(model, config, skdata.coffee()) == ESPRESSO


def test_random_init_does_not_classify_photos_as_imagenet() -> None:
    # The same check on random weights fails, so the test above proves the mapping.
    model, config = create_model("tf_efficientnet_lite0", weights="none")
    assert model.pretrained_cfg["weights"]["kind"] == "none"
    assert (
        imagenet_top1(model, config, skdata.coffee()) != ESPRESSO
        or imagenet_top1(model, config, skdata.chelsea()) not in CAT_CLASSES
    )


def test_create_backbone_is_headless_with_data_config() -> None:
    model, config = create_backbone(TINY_BACKBONE, weights="none", image_size=32)
    features = model(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, model.num_features)
    assert config.input_size == (3, 32, 32)
    assert config.mean == tuple(model.pretrained_cfg["mean"])


def test_packaged_provenance_has_hash() -> None:
    source = resolve_weights("tf_efficientnet_lite0", "auto")
    assert source.kind == "packaged" and source.uri.endswith(".pth") and len(source.sha256 or "") == 64


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_round_trip(tmp_path: Path, suffix: str) -> None:
    source_model, _ = create_model(TINY_BACKBONE, weights="none")
    state = {k: v.contiguous() for k, v in source_model.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    model, _ = create_backbone(TINY_BACKBONE, weights=str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.pretrained_cfg["weights"]["kind"] == "file"
    assert model.pretrained_cfg["weights"]["sha256"]


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # what a malicious checkpoint does
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth.*refused"):
        create_backbone(TINY_BACKBONE, weights=str(path))
    assert not (tmp_path / "pwned").exists()


def test_weights_of_wrong_shape_name_the_file(tmp_path: Path) -> None:
    other, _ = create_model("test_resnet", weights="none")
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(WeightsError, match=r"resnet\.safetensors: weights do not fit test_efficientnet"):
        create_backbone(TINY_BACKBONE, weights=str(path))


def test_unknown_backbone_suggests_close_names() -> None:
    with pytest.raises(UnknownBackboneError, match="tf_efficientnet_lite0"):
        create_backbone("tf_efficientnet_lite_0", weights="none")


def test_missing_weights_file_and_bad_setting() -> None:
    with pytest.raises(WeightsError, match="not found"):
        create_backbone(TINY_BACKBONE, weights="/nonexistent/w.safetensors")
    with pytest.raises(WeightsError, match="not understood"):
        create_backbone(TINY_BACKBONE, weights="imagenet")
    with pytest.raises(WeightsError, match="no packaged weights for 'test_efficientnet'"):
        create_backbone(TINY_BACKBONE, weights="packaged")


def test_offline_hub_failure_lists_offline_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # read at import: without this the hub client tries the network (47 s of retries on a closed network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(WeightsError, match=r"test_resnet.*offline: tf_efficientnet_lite0 \(weights='packaged'\)"):
        create_backbone("test_resnet", weights="timm")


def test_list_backbones_reports_packaged_weights() -> None:
    names = {(b.name, b.weights) for b in list_backbones()}
    assert {(f"tf_efficientnet_lite{i}", "packaged") for i in range(3)} <= names
