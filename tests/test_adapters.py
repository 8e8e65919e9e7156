"""LoRA, DoRA and BitFit on every timm family with a group_matcher (tests/family_configs.py's table).

One training step through the production path (``apply_peft``, then ``TuningPolicy.forward`` in training
mode, backward, ``after_backward``, SGD over the optimizer groups ``build_param_groups`` makes) must give a
gradient to every adapter (or bias) parameter and leave every other parameter and every persistent buffer
bit-identical; the merged plain backbone (what every export holds), built in place or from the state dict
alone, must give the adapted model's outputs (max abs diff < 1e-4 in fp32) under timm's own key names.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from torch import nn

from tests.family_configs import CONFIGS, SLOW, build, one_thread
from vision_transfer.errors import ConfigError
from vision_transfer.tuning import TuningConfig, TuningPolicy, build_param_groups
from vision_transfer.tuning.adapters import apply_peft, merged_backbone, merged_from_state

MERGE_TOLERANCE = 1e-4  # fp32, what the issue asks of every export
# families that have no layer LoRA can adapt (no linear layer or plain 1x1 convolution whose forward runs)
NO_LORA_TARGETS: dict[str, str] = {}


_one_thread = one_thread  # autouse, module-scoped: tiny models, one thread each (tests/family_configs.py)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_floating_point():
        return a.shape == b.shape and torch.equal(
            a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
        )
    return torch.equal(a, b)


def _adapted(family: str, peft: str, dora: bool = False) -> tuple[nn.Module, nn.Module, int]:
    """The family's tiny model, the adapted copy (LoRA's B matrices random, so adapters act) and its input size."""
    torch.manual_seed(0)
    reference = build(family)
    size = CONFIGS[family][2]
    backbone = copy.deepcopy(reference)
    apply_peft(backbone, peft, (3, size, size), r=4, alpha=8.0, dora=dora)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in backbone.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return reference, backbone, size


def _step(backbone: nn.Module, size: int, peft: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state before one training step, and the trainable parameters that got no gradient."""
    config = TuningConfig(mode="full", peft=peft)  # type: ignore[arg-type]
    policy = TuningPolicy(backbone, config)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    out = policy.forward(images, training=True)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    policy.after_backward()
    head = nn.Linear(1, 1)
    groups = build_param_groups(policy.groups, backbone, head, lr=0.1, head_lr=0.1)
    trainable = [p for g in groups if g["stage"] >= 0 for p in g["params"]]
    names = {id(p): n for n, p in backbone.named_parameters()}
    missing = [names[id(p)] for p in trainable if p.grad is None]
    torch.optim.SGD(trainable, lr=0.1).step()
    return before, missing


def _trains(name: str, peft: str) -> bool:
    return ".lora_" in name if peft == "lora" else name.rsplit(".", 1)[-1].endswith("bias")


def _check_step(family: str, peft: str, dora: bool = False) -> None:
    _, backbone, size = _adapted(family, peft, dora)
    params = dict(backbone.named_parameters())
    chosen = sorted(n for n, p in params.items() if p.requires_grad)
    assert chosen, f"{family}: {peft} made nothing trainable"
    assert all(_trains(n, peft) for n in chosen), f"{family}: trainable beyond the {peft} set: {chosen[:5]}"
    before, missing = _step(backbone, size, peft)
    assert not missing, f"{family}: {peft} parameters got no gradient: {missing[:5]} ({len(missing)} in all)"
    after = backbone.state_dict()
    moved = [k for k in after if not _trains(k, peft) and not _same(before[k], after[k])]
    assert not moved, f"{family}: {peft} changed what must stay frozen: {moved[:5]} ({len(moved)} in all)"


def _check_merge(family: str, dora: bool = False) -> None:
    """The merged backbone computes what the adapted one does: whole model, and layer by layer on an input
    of each adapted layer's shape (where the adapter visibly acts, even when a random tiny model scales a
    residual branch by zero, as NFNet's skipinit gain does)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    reference, backbone, size = _adapted(family, "lora", dora)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4))
    backbone.eval()
    merged = merged_backbone(backbone).eval()
    assert set(merged.state_dict()) == set(reference.state_dict()), f"{family}: merged keys are not timm's"
    layers = {n: m for n, m in backbone.named_modules() if isinstance(m, BaseTunerLayer)}
    inputs: dict[str, torch.Tensor] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:  # returns None: a returned value replaces the input
            inputs.setdefault(name, args[0])

        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in layers.items()]
    with torch.no_grad():
        adapted, plain = backbone(images), merged(images)
        for hook in hooks:
            hook.remove()
        rebuilt = merged_from_state(build(family), backbone.state_dict(), {"lora_alpha": 8.0}, family)(images)
        scale = max(1.0, float(adapted.abs().max()))
        for what, out in (("merged", plain), ("merged from the state dict", rebuilt)):
            diff = float((out - adapted).abs().max())
            assert diff < MERGE_TOLERANCE * scale, f"{family}: {what} differs from the adapted model by {diff:.2e}"
        assert set(inputs) == set(layers), (
            f"{family}: adapted layers that never ran: {sorted(set(layers) - set(inputs))[:3]}"
        )
        for name, layer in layers.items():  # a random input of the shape it sees (a tiny model's can be all 0)
            x = torch.randn(inputs[name].shape, generator=torch.Generator().manual_seed(5))
            out, base, folded = layer(x), layer.get_base_layer()(x), merged.get_submodule(name)(x)
            acts = float((out - base).abs().max())
            diff = float((folded - out).abs().max())
            assert acts > 0 and diff < 0.01 * acts, (
                f"{family}: {name}: the adapter adds {acts:.2e}, merged is off by {diff:.2e}"
            )


def _params(keys: list[str]) -> list[object]:
    return [pytest.param(k, marks=[pytest.mark.slow] if k in SLOW else []) for k in keys]


@pytest.mark.parametrize("family", _params(list(CONFIGS)))
def test_lora_trains_only_the_adapters_and_merges_exactly(family: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _check_step(family, "lora")
        except ConfigError as e:
            assert family in NO_LORA_TARGETS, f"{family}: refused: {e}"
            return
        _check_merge(family)


@pytest.mark.parametrize("family", ["vision_transformer", "convnext", "efficientnet", "resnet"])
def test_dora_trains_only_the_adapters_and_merges_exactly(family: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check_step(family, "lora", dora=True)
        _check_merge(family, dora=True)
        assert any(".lora_magnitude_vector." in n for n, _ in _adapted(family, "lora", True)[1].named_parameters())


@pytest.mark.parametrize("family", _params(list(CONFIGS)))
def test_bitfit_trains_only_the_biases(family: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _check_step(family, "bitfit")
        except ConfigError as e:
            assert "no bias terms" in str(e)


def test_a_layer_whose_parent_reads_its_weight_is_not_adapted() -> None:
    """BEiT's attention runs F.linear on qkv.weight: an adapter there would never act, so it is left out
    automatically and refused when named."""
    beit = build("beit")
    qkv = [n for n, _ in beit.named_modules() if n.endswith("attn.qkv")]
    backbone = copy.deepcopy(beit)
    summary = apply_peft(backbone, "lora", (3, 32, 32))
    assert summary is not None and qkv and not set(qkv) & set(summary.modules)
    with pytest.raises(ConfigError, match="never run their own forward"):
        apply_peft(copy.deepcopy(beit), "lora", (3, 32, 32), targets=[r"blocks\.\d+\.attn\.qkv"])


def test_named_targets_adapt_exactly_those_and_unknown_ones_are_refused() -> None:
    vit = build("vision_transformer")
    summary = apply_peft(copy.deepcopy(vit), "lora", (3, 32, 32), targets=[r"blocks\.\d+\.attn\.qkv"])
    qkv = tuple(f"blocks.{i}.attn.qkv" for i in range(len(vit.blocks)))  # type: ignore[arg-type]
    assert summary is not None and summary.modules == qkv
    with pytest.raises(ConfigError, match="matches no linear layer"):
        apply_peft(copy.deepcopy(vit), "lora", (3, 32, 32), targets=["nothing_like_this"])


def test_weight_standardised_convolutions_are_not_candidates() -> None:
    """A merged adapter on StdConv2d would add to the weight before standardisation: not the same model."""
    from timm.layers import StdConv2d

    from vision_transfer.tuning.adapters import is_candidate

    assert not is_candidate(StdConv2d(8, 8, 1))
    assert is_candidate(nn.Conv2d(8, 8, 1)) and not is_candidate(nn.Conv2d(8, 8, 3))
    assert not is_candidate(nn.Conv2d(8, 8, 1, groups=8))
    assert timm.layers.Linear is not nn.Linear and is_candidate(timm.layers.Linear(2, 2))


# -- through the classifier, the command line, the checkpoint and every export -------------------------
@pytest.mark.parametrize("peft", ["lora", "bitfit"])
def test_fit_from_the_cli_trains_only_the_peft_set_and_every_export_gives_its_logits(
    peft: str, tmp_path: Path, split_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import tiny_fit_args
    from vision_transfer.app.checkpoints import model_from_checkpoint
    from vision_transfer.checkpoint import read_checkpoint
    from vision_transfer.cli import main
    from vision_transfer.export import export_checkpoint, load_classifier

    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={split_folder}"]
    main(tiny_fit_args(data, tmp_path, f"--model.peft={peft}", "--model.lr=0.05", "--model.calibrate=false"))
    assert ("LoRA on" if peft == "lora" else "BitFit (") in capsys.readouterr().out
    best = next(tmp_path.glob("runs/lightning_logs/version_*/checkpoints/best.ckpt"))
    entry, content = read_checkpoint(best)
    model = model_from_checkpoint(entry, content).eval()
    untrained = type(model)(**entry.settings).state_dict()  # the same seeded random init, adapters added
    trained = model.state_dict()
    frozen = [k for k in trained if k.startswith("backbone.") and not _trains(k.removeprefix("backbone."), peft)]
    assert frozen and all(_same(trained[k], untrained[k]) for k in frozen), "base weights or BN statistics moved"
    assert any(not _same(trained[k], untrained[k]) for k in trained if k.startswith("backbone.") and k not in frozen)

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(images)
        loaded = load_classifier(best)(images)
    assert not any(".lora_" in k for k in load_classifier(best).state_dict())
    assert float((loaded - reference).abs().max()) < MERGE_TOLERANCE
    formats = ("timm", "torchscript", "onnx") if peft == "lora" else ("timm",)
    report = export_checkpoint(best, tmp_path / "export", formats=formats)
    assert all(diff < MERGE_TOLERANCE for diff in report["max_abs_diff"].values())
    with torch.no_grad():
        exported = load_classifier(tmp_path / "export")(images)
        plain_timm = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()(images)
    assert float((exported - reference).abs().max()) < MERGE_TOLERANCE
    assert float((plain_timm - reference).abs().max()) < MERGE_TOLERANCE
    if peft == "lora":  # the adapter alone, from the command line, back to the same logits
        main(["export", str(best), "--to", str(tmp_path / "adapter"), "--adapter_only"])
        assert "adapter parameters" in capsys.readouterr().out
        with torch.no_grad():
            from_adapter = load_classifier(tmp_path / "adapter")(images)
        assert float((from_adapter - reference).abs().max()) < MERGE_TOLERANCE


def test_lp_ft_with_lora_probes_first_then_trains_the_adapters(tmp_path: Path, image_folder: Path) -> None:
    """Phase 1 trains the head only (adapters as initialised), phase 2 the adapters and the head."""
    import pytorch_lightning as pl

    from tests.conftest import tiny_data, tiny_model

    seen: list[tuple[int, bool]] = []

    class Watch(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, module: Any) -> None:
            b = [p for n, p in module.backbone.named_parameters() if ".lora_B." in n]
            seen.append((trainer.current_epoch, any(bool(p.abs().sum() > 0) for p in b)))

    data = tiny_data(image_folder)
    model = tiny_model(data, mode="lp_ft", lp_epochs=1, peft="lora", lr=0.05, warmup_epochs=0)
    trainer = pl.Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Watch()],
    )  # fmt: skip
    trainer.fit(model, data)
    assert seen == [(0, False), (1, True)]  # lora_B starts at 0: it moves only once the fine-tune phase begins


def test_bf16_autocast_trains_the_adapters(image_folder: Path) -> None:
    """Mixed precision (bf16 autocast, as on a GPU) through LoRA layers: finite loss, adapters move, base stays."""
    import pytorch_lightning as pl

    from tests.conftest import tiny_data, tiny_model

    data = tiny_data(image_folder)
    model = tiny_model(data, peft="lora", lr=0.05, warmup_epochs=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = pl.Trainer(
        max_steps=3, precision="bf16-mixed", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(model, data)
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in after if ".lora_B." in k)
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("backbone.") and ".lora_" not in k)


def test_peft_is_refused_where_it_cannot_act() -> None:
    from vision_transfer.tasks import ImageClassifier

    common = dict(backbone="test_efficientnet", weights="none", image_size=32, class_names=["a", "b"])
    with pytest.raises(ConfigError, match="mode='linear_probe' trains the head only"):
        ImageClassifier(**common, mode="linear_probe", peft="lora")
    with pytest.raises(ConfigError, match="lora_r=4 \\(acts only with peft='lora'\\)"):
        ImageClassifier(**common, peft="bitfit", lora_r=4)
    with pytest.raises(
        ConfigError, match="peft='lora' trains part of the backbone"
    ):  # cached features need a frozen one
        ImageClassifier(**common, mode="linear_probe", cache_features=True, peft="lora")
    with pytest.raises(ConfigError, match="cache_features=True needs mode='linear_probe'"):
        ImageClassifier(**common, mode="full", cache_features=True, peft="lora")


# -- the adapter alone (PEFT's format) plus the base weights' identity ------------------------------------
@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA classifier (random adapters, so they matter) of a ViT and of a convnet, as checkpoints."""
    from vision_transfer.tasks import ImageClassifier

    folder = tmp_path_factory.mktemp("lora_ckpt")
    model = ImageClassifier(
        "test_vit", weights="none", image_size=32, class_names=["a", "b", "c"], peft="lora", lora_r=4, lora_dora=True
    )
    with torch.no_grad():
        for name, param in model.backbone.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    return model.save_standalone_checkpoint(folder / "lora.ckpt")


def test_adapter_alone_loads_back_to_the_same_logits_and_in_peft_itself(lora_checkpoint: Path, tmp_path: Path) -> None:
    import peft
    from safetensors.torch import load_file

    from vision_transfer.backbones import create_backbone
    from vision_transfer.export import load_classifier
    from vision_transfer.export.adapter import ADAPTER_WEIGHTS, export_adapter

    written = export_adapter(lora_checkpoint, tmp_path / "adapter")
    whole = load_classifier(lora_checkpoint)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    adapter_state = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    assert sum(v.numel() for v in adapter_state.values()) == written["adapter_parameters"]
    assert written["adapter_parameters"] < 0.2 * sum(p.numel() for p in whole.backbone.parameters())
    with torch.no_grad():
        reference = whole(images)
        loaded = load_classifier(tmp_path / "adapter")(images)
        # PEFT itself reads the folder onto the base it names
        base, _ = create_backbone("test_vit", "none", image_size=32)
        in_peft = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(images)
        features = whole.backbone(images)
    assert float((loaded - reference).abs().max()) < 1e-5
    assert float((in_peft - features).abs().max()) < 1e-5


def test_adapter_on_other_base_weights_is_refused(lora_checkpoint: Path, tmp_path: Path) -> None:
    import timm

    from vision_transfer.errors import WeightsError
    from vision_transfer.export.adapter import export_adapter, load_adapter

    export_adapter(lora_checkpoint, tmp_path / "adapter")
    other = timm.create_model("test_vit", num_classes=0)  # unseeded: not the base it trained on
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="not the ones this adapter was trained on"):
        load_adapter(tmp_path / "adapter", weights=str(tmp_path / "other.pth"))


def test_adapter_only_export_of_a_model_without_lora_is_refused(tmp_path: Path) -> None:
    from vision_transfer.errors import ExportError
    from vision_transfer.export.adapter import export_adapter
    from vision_transfer.tasks import ImageClassifier

    model = ImageClassifier("test_vit", weights="none", image_size=32, class_names=["a", "b"], peft="bitfit")
    checkpoint = model.save_standalone_checkpoint(tmp_path / "bitfit.ckpt")
    with pytest.raises(ExportError, match="has no LoRA adapters \\(peft='bitfit'\\)"):
        export_adapter(checkpoint, tmp_path / "adapter")


@pytest.mark.parametrize("backbone", ["test_vit", "test_efficientnet", "test_convnext"])
def test_gradient_checkpointing_gives_the_adapters_the_same_gradients(backbone: str) -> None:
    """The frozen stem's output needs no grad: a re-entrant checkpoint would then cut the adapters of the first
    checkpointed block off (the known PEFT pitfall); timm's is not, and every adapter gets the same gradient."""
    from vision_transfer.tasks import ImageClassifier

    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # LoRA's A matrices are drawn from the global generator
        model = ImageClassifier(
            backbone,
            weights="none",
            image_size=32,
            class_names=["a", "b", "c"],
            peft="lora",
            grad_checkpointing=checkpointing,
        ).eval()  # fmt: skip  (eval: no dropout or BatchNorm update, so both runs compute the same)
        with torch.no_grad():
            for name, param in model.backbone.named_parameters():
                if ".lora_B." in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        model.backbone.train()  # timm checkpoints only in training mode
        for m in model.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        grads.append({n: p.grad for n, p in model.backbone.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert all(g is not None for g in checkpointed.values()), [n for n, g in checkpointed.items() if g is None][:3]
    for name, grad in plain.items():
        assert torch.allclose(grad, checkpointed[name], atol=1e-6), name


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_same_padding_convs_become_plain_convs_with_the_same_outputs(stride: int) -> None:
    """peft >= 0.22 cannot build an adapter beside timm's Conv2dSame: a targeted 1x1 one becomes nn.Conv2d
    holding the same parameters ('same' padding of a 1x1 kernel is none), outputs bit-identical at any size."""
    from timm.layers import Conv2dSame

    from vision_transfer.tuning.adapters import _plain_pointwise_convs

    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(3, 4, 1, stride=stride), nn.ReLU(), Conv2dSame(4, 4, 3, stride=stride))
    inputs = [torch.randn(2, 3, size, size) for size in (7, 8, 15)]
    before = [model(x) for x in inputs]
    weight = model[0].weight
    _plain_pointwise_convs(model, ["0"])
    assert type(model[0]) is nn.Conv2d and model[0].weight is weight and type(model[2]) is Conv2dSame
    assert all(torch.equal(model(x), b) for x, b in zip(inputs, before, strict=True))
