"""Which stage groups of a backbone train, with which learning rate and BatchNorm behaviour."""

from vision_transfer.tuning.groups import stage_groups
from vision_transfer.tuning.policy import TuningPolicy, build_param_groups

__all__ = ["TuningPolicy", "build_param_groups", "stage_groups"]
