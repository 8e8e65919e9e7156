"""One tiny, CPU-fast configuration per timm family (module of ``timm.models``) with a ``group_matcher``.

``FAMILIES`` maps each family to ``(model name, timm kwargs, input size)``: the family's ``test_*`` model
when it has one, else a small variant shrunk with the kwargs its entry point lets through (an entry
point that fixes ``depths`` or ``embed_dim`` itself rejects a second value), at the smallest input it
accepts. ``tests/test_families.py`` trains one step at every freeze level of each and checks that
exactly the trainable groups train; its first test fails when timm gains a family this table lacks.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import timm
import torch
from timm.models._efficientnet_builder import decode_arch_def

FamilyConfig = tuple[str, dict[str, Any], int]

FAMILIES: dict[str, FamilyConfig] = {
    "beit": ("beit_base_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), 32),
    # halonet_h1 (the smallest) needs every stage's feature map divisible by its 8-px halo blocks (256 px);
    # the lambda layers of lambda_resnet26t take any size.
    "byoanet": ("lambda_resnet26t", {}, 32),
    "byobnet": ("test_byobnet", {}, 32),
    "cait": (
        "cait_xxs24_224",
        dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, depth_token_only=1),
        32,
    ),
    # num_heads stays 8: the conv relative position encoding splits the channels of each head 2:3:3
    "coat": (
        "coat_tiny",
        dict(img_size=32, embed_dims=(16, 16, 16, 16), serial_depths=(1, 1, 1, 1), parallel_depth=1),
        32,
    ),
    "convit": (
        "convit_tiny",
        dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, local_up_to_layer=1),
        32,
    ),
    # every convmixer entry point fixes dim and depth (20M+ parameters): the one with the fewest blocks (20, not 32),
    # at one 14-px patch
    "convmixer": ("convmixer_1024_20_ks9_p14", {}, 14),
    "convnext": ("test_convnext", {}, 32),
    "cpubone": ("cpubone_nano", {}, 32),
    "crossvit": (
        "crossvit_tiny_240",
        dict(img_size=48, img_scale=(1.0, 1.0), embed_dim=(16, 32), num_heads=(1, 2), depth=((1, 1, 1), (1, 1, 1))),
        48,
    ),
    "cspnet": ("cs3darknet_focus_s", {}, 32),
    "cspnext": ("cspnext_tiny", {}, 32),
    "davit": ("davit_tiny", dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8)), 32),
    "deepseek_vit": ("deepseek_vit_412m", dict(img_size=42, embed_dim=32, depth=2, num_heads=2), 42),
    "deit": ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), 32),
    "densenet": ("densenet121", dict(growth_rate=8, block_config=(1, 1, 1, 1)), 32),
    "dla": ("dla46x_c", {}, 32),
    "dpn": ("dpn48b", dict(k_sec=(1, 1, 1, 1)), 32),
    "edgenext": ("edgenext_xx_small", {}, 32),
    # the attention of the last stage has a fixed 7x7 bias table (224 px input, img_size is ignored); tiny widths
    "efficientformer": ("efficientformer_l1", dict(depths=(1, 1, 1, 2), embed_dims=(8, 8, 16, 16)), 224),
    "efficientformer_v2": ("efficientformerv2_s0", dict(img_size=32, depths=(1, 1, 2, 2)), 32),
    "efficientnet": ("test_efficientnet", {}, 32),
    "efficientvim": ("efficientvim_m1", dict(depths=(1, 1, 1)), 32),
    "efficientvit_mit": ("efficientvit_b0", {}, 32),
    "efficientvit_msra": ("efficientvit_m0", {}, 32),
    "eva": ("vit_tiny_patch16_dinov3_qkvb", dict(img_size=32, depth=2), 32),
    "fasternet": ("fasternet_t0", {}, 32),
    "fastvit": ("fastvit_t8", dict(layers=(1, 1, 1, 1)), 32),
    # every focalnet entry point fixes depths and embed_dim
    "focalnet": ("focalnet_tiny_srf", {}, 32),
    # depths and num_heads are fixed by the entry point; windows are img_size // (32, 32, 16, 32)
    "gcvit": ("gcvit_xxtiny", dict(img_size=64, embed_dim=16), 64),
    "gemma4_vit": (
        "gemma4_vit_167m",
        dict(img_size=48, embed_dim=32, depth=2, num_heads=2, head_dim=16, intermediate_size=64),
        48,
    ),
    "ghostnet": ("ghostnet_050", {}, 32),
    "hardcorenas": ("hardcorenas_b", {}, 32),
    "hgnet": ("hgnetv2_b0", {}, 32),
    "hiera": ("hiera_tiny_224", dict(img_size=(64, 64), stages=(1, 1, 1, 1), embed_dim=16), 64),
    # windows halve at each q-pooling block, so each stage's window is at least 2; one global block
    "hieradet_sam2": (
        "sam2_hiera_tiny",
        dict(stages=(1, 1, 2, 1), embed_dim=16, global_att_blocks=(3,), window_spec=(4, 2, 2, 2)),
        32,
    ),
    "hrnet": ("hrnet_w18_small", {}, 32),
    "iformer": ("iformer_t", {}, 32),
    "inception_next": ("inception_next_atto", {}, 32),
    # the three inception families have no size kwargs; 75 px is the smallest input their stems accept.
    # inception_resnet_v2 and inception_v4 are built with two blocks of each repeated kind (see SHORTEN)
    "inception_resnet_v2": ("inception_resnet_v2", {}, 75),
    "inception_v3": ("inception_v3", {}, 75),
    "inception_v4": ("inception_v4", {}, 75),
    "lcnetv2": ("lcnetv2_small", {}, 32),
    "levit": ("levit_128s", dict(img_size=64), 64),
    "lowformer": ("lowformer_b0", dict(depth_list=[0, 1, 1, 1, 1]), 32),
    "mambaout": ("test_mambaout", {}, 32),
    "maxxvit": ("test_maxvit", dict(img_size=32), 32),
    # the mixer entry points fix depth and width; Mixer-S/32 has the fewest blocks, one token at 32 px
    "mlp_mixer": ("mixer_s32_224", dict(img_size=32), 32),
    "mobilenetv3": ("lcnet_035", {}, 32),
    # timm's own decoder builds a four-stage miniature of mobilenetv5_base (edge residual, universal
    # inverted residual and multi-query attention blocks); each stage ends in a UIR block as timm requires
    "mobilenetv5": (
        "mobilenetv5_base",
        dict(
            block_args=decode_arch_def(
                [
                    ["er_r1_k3_s2_e4_c16"],
                    ["uir_r1_a3_k5_s2_e4_c24"],
                    ["uir_r1_a5_k5_s2_e4_c32", "mqa_r1_k3_h2_s2_d8_c32", "uir_r1_a0_k0_s1_e2_c32"],
                    ["uir_r1_a5_k5_s2_e4_c48", "mqa_r1_k3_h2_s1_d8_c48", "uir_r1_a0_k0_s1_e2_c48"],
                ]
            ),
            stem_size=16,
            num_features=64,
            msfa_output_resolution=2,
        ),
        32,
    ),
    "mobilevit": ("mobilevit_xxs", {}, 32),
    "mvitv2": ("mvitv2_tiny", dict(img_size=(32, 32)), 32),
    "naflexvit": (
        "naflexvit_base_patch16_parfac_gap",
        dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
        32,
    ),
    # cell widths are num_features // 24: 4 channels instead of 168
    "nasnet": ("nasnetalarge", dict(stem_size=8, num_features=96), 32),
    # depths and widths are fixed by the entry point
    "nest": ("nest_tiny", dict(img_size=32), 32),
    # the smallest depths the stage layout allows (the third stage is built in fives)
    "nextvit": ("nextvit_small", dict(depths=(1, 1, 5, 1)), 32),
    "nfnet": ("test_nfnet", {}, 32),
    # no size kwargs at all: 82M parameters, the slowest family left (marked slow)
    "pnasnet": ("pnasnet5large", {}, 32),
    "pvt_v2": ("pvt_v2_b0", dict(depths=(1, 1, 1, 1)), 32),
    "qwen3_vit": ("qwen3_vit_88m", dict(img_size=32, embed_dim=32, depth=2, num_heads=2), 32),
    "rdnet": ("rdnet_tiny", {}, 32),
    "regnet": ("regnetx_002", {}, 32),
    "repghost": ("repghostnet_050", {}, 32),
    "repvit": ("repvit_m1", dict(depth=(1, 1, 1, 1)), 32),
    "res2net": ("res2next50", dict(layers=(1, 1, 1, 1)), 32),
    "resnest": ("resnest14d", {}, 32),
    "resnet": ("test_resnet", {}, 32),
    "resnetv2": ("resnetv2_18", {}, 32),
    "rexnet": ("rexnet_100", dict(depth_mult=0.5, width_mult=0.5), 32),
    "selecsls": ("selecsls42", {}, 32),
    "senet": ("legacy_seresnet18", {}, 32),
    "sequencer": ("sequencer2d_s", dict(layers=(1, 1, 1, 1)), 32),
    "shvit": ("shvit_s1", dict(depth=(1, 1, 1)), 32),
    "sknet": ("skresnet18", {}, 32),
    "starnet": ("starnet_s050", {}, 32),
    "swiftformer": ("swiftformer_xs", {}, 32),
    "swin_transformer": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, window_size=2, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
        32,
    ),
    "swin_transformer_v2": (
        "swinv2_tiny_window8_256",
        dict(img_size=32, window_size=2, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
        32,
    ),
    "swin_transformer_v2_cr": (
        "swinv2_cr_tiny_224",
        dict(img_size=(32, 32), window_size=2, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
        32,
    ),
    "tiny_vit": ("tiny_vit_5m_224", dict(depths=[1, 1, 1, 1]), 32),
    "tnt": ("tnt_s_legacy_patch16_224", dict(img_size=32, depth=2), 32),
    "tresnet": ("tresnet_m", dict(layers=[1, 1, 1, 1]), 32),
    "twins": ("twins_svt_small", dict(depths=(1, 1, 1, 1)), 32),
    # the 4096-wide classifier MLP is most of VGG's weights; its hidden width shrinks with mlp_ratio
    "vgg": ("vgg11", dict(mlp_ratio=1 / 64), 32),
    "visformer": ("visformer_tiny", dict(img_size=32, depth=(1, 1, 1)), 32),
    "vision_transformer": ("test_vit", {}, 32),
    "vision_transformer_hybrid": ("vit_tiny_r_s16_p8_224", dict(img_size=32, depth=2), 32),
    "vision_transformer_relpos": ("test_vit_relpos", dict(img_size=32), 32),
    "vision_transformer_sam": (
        "samvit_base_patch16_224",
        dict(img_size=32, embed_dim=32, depth=2, num_heads=2, neck_chans=16),
        32,
    ),
    "vitamin": ("vitamin_small_224", dict(img_size=32, depth=2), 32),
    # layers and widths are fixed by every volo entry point
    "volo": ("volo_d1_224", dict(img_size=32), 32),
    "vovnet": ("ese_vovnet19b_slim_dw", {}, 32),
    # the family's only model; no size kwargs
    "xception": ("legacy_xception", {}, 32),
    # xception41 is the model the audit found; xception41p is smaller but has the same block layout
    "xception_aligned": ("xception41", {}, 32),
    "xcit": ("xcit_nano_12_p8_224", dict(img_size=32, depth=2), 32),
}

# More models of a family, for block types its table entry lacks that the audit found broken;
# id -> (family, config).
VARIANTS: dict[str, tuple[str, FamilyConfig]] = {
    # MobileOne blocks (conv_kxk / conv_scale / identity branches); test_byobnet has none
    "byobnet-mobileone": ("byobnet", ("mobileone_s0", {}, 32)),
}

# Every configuration the guard trains: the families, then the variants.
CONFIGS: dict[str, FamilyConfig] = {**FAMILIES, **{key: config for key, (_, config) in VARIANTS.items()}}

# Parameters that get no gradient even when nothing is frozen: the guard does not ask them to train
# (it still checks that they stay put while frozen, and that they really get no gradient in "full").
UNUSED_IN_FULL: dict[str, dict[str, str]] = {
    "efficientvim": {
        "weights": "weighs the per-stage classifier heads; timm sets requires_grad=False on it when the "
        "model has no classifier (num_classes=0)",
    },
}

# Families whose guard takes more than 5 s on two shared CPU cores (load ~7), marked slow: big models
# timm gives no size kwargs for (inception*, pnasnet, xception*, volo, convmixer), or many stage groups
# (one training step per level: convmixer has 21, nasnet 19).
SLOW = {
    "convmixer",
    "inception_resnet_v2",
    "inception_v3",
    "inception_v4",
    "nasnet",
    "pnasnet",
    "volo",
    "xception",
    "xception_aligned",
}


def _two_of_each_repeat(model: torch.nn.Module) -> None:
    """Keep the first two Block35, Block17 and Block8 of inception_resnet_v2's 10 + 20 + 9 repeats: every
    block kind and every kind of group boundary stays (stem, mixed, repeat -> repeat, repeat -> mixed,
    block8), at 12 stage groups instead of 45 (its guard took 74 s, one training step per level)."""
    for name in ("repeat", "repeat_1", "repeat_2"):
        setattr(model, name, getattr(model, name)[:2])


def _ends_of_each_repeat(model: torch.nn.Module) -> None:
    """Keep the first and last of inception_v4's 4 InceptionA, 7 InceptionB and 3 InceptionC blocks (the
    others become Identity, so the block indices its group matcher and feature_info name stay): every block
    kind and group boundary stays, at 12 stage groups instead of 20 (its guard took 29 s)."""
    kinds = [type(block).__name__ for block in model.features]
    for i in range(1, len(kinds) - 1):
        if kinds[i - 1] == kinds[i] == kinds[i + 1] and kinds[i].startswith("Inception"):
            model.features[i] = torch.nn.Identity()


class _PassOn(torch.nn.Module):
    """A NASNet cell removed: it hands on one of its two inputs (same shape: a normal cell inside a stage)."""

    def __init__(self, which: int) -> None:
        super().__init__()
        self.which = which

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return inputs[self.which]


def _pass_on_cells(names: tuple[str, ...], which: int) -> Callable[[torch.nn.Module], None]:
    """Replace the normal cells ``names`` (each between two normal cells of its stage, the next one reading
    both its input and its output) by :class:`_PassOn`: the cell after one sees the shapes it always did."""

    def shorten(model: torch.nn.Module) -> None:
        for name in names:
            setattr(model, name, _PassOn(which))

    return shorten


# Families whose entry points take no depth kwargs, shortened after construction (before the guard
# builds the stage groups, which timm derives from the model's modules).
SHORTEN = {
    "inception_resnet_v2": _two_of_each_repeat,
    "inception_v4": _ends_of_each_repeat,
    # cell(x, x_prev) -> x_cell; 12 of 19 stage groups kept, every cell kind (its guard took 16 s)
    "nasnet": _pass_on_cells(("cell_3", "cell_4", "cell_9", "cell_10", "cell_15", "cell_16"), 0),
    # cell(x_left, x_right) -> x_cell; the last normal cell of each stage goes, the largest (its guard took 27 s)
    "pnasnet": _pass_on_cells(("cell_3", "cell_7", "cell_11"), 1),
}

# Families the rest of the suite already trains with partial freezing: refusing them is a regression.
MUST_SUPPORT = {"efficientnet", "resnet", "convnext", "vision_transformer"}


# Families none of whose models has a group_matcher (checked by the coverage test, so a timm upgrade that
# gives them one fails it). mobilenetv5 is not here: MobileNetV5 has one, only its encoder variant lacks it.
WITHOUT_GROUP_MATCHER = {"csatv2", "metaformer", "pit"}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread than on two contended ones (CI has two shared cores): a module
    that sweeps the families takes it as ``_one_thread = one_thread``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(key: str, device: str | None = None) -> torch.nn.Module:
    """The tiny headless model of a family (or variant); ``device="meta"`` builds it without memory or
    init compute."""
    name, kwargs, _ = CONFIGS[key]
    with warnings.catch_warnings(), torch.device(device or "cpu"):
        warnings.simplefilter("ignore")  # e.g. "img_size is ignored", deprecated model names
        model = timm.create_model(name, pretrained=False, num_classes=0, **copy.deepcopy(kwargs))
    if key in SHORTEN:
        SHORTEN[key](model)
    return model


def has_group_matcher(module: str) -> bool:
    """Whether a family not in the table has a group_matcher: on a class it defines, or on its first
    model that builds (on the meta device). Classes catch a family whose first model lacks one
    (mobilenetv5_300m_enc); the model catches a family whose models reuse another module's class."""
    mod = importlib.import_module(f"timm.models.{module}")
    for obj in vars(mod).values():
        if (
            inspect.isclass(obj)
            and issubclass(obj, torch.nn.Module)
            and obj.__module__ == mod.__name__
            and callable(getattr(obj, "group_matcher", None))
        ):
            return True
    for name in timm.list_models(module=module):
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                model = timm.create_model(name, num_classes=0)
        except Exception:  # an entry point that needs real tensors at init: try the next model
            continue
        return callable(getattr(model, "group_matcher", None))
    return False
