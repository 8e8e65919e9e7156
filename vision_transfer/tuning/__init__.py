"""Which stage groups of a backbone train when, with which learning rate and BatchNorm behaviour."""

from vision_transfer.tuning.config import TuningConfig
from vision_transfer.tuning.groups import stage_groups
from vision_transfer.tuning.policy import TuningPolicy, build_param_groups
from vision_transfer.tuning.schedule import cosine_with_warmup, group_lr_lambdas

__all__ = [
    "TuningConfig",
    "TuningPolicy",
    "build_param_groups",
    "cosine_with_warmup",
    "group_lr_lambdas",
    "stage_groups",
]
