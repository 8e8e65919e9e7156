"""Lightning callbacks, checkpoint IO and the logger that make a run folder."""

from vision_transfer.callbacks.checkpointing import AtomicCheckpointIO, RunCheckpoint
from vision_transfer.callbacks.logger import RunLogger
from vision_transfer.callbacks.nan_guard import StopOnNonFiniteLoss
from vision_transfer.callbacks.oom import OutOfMemoryAdvice
from vision_transfer.callbacks.prediction import PredictionWriter
from vision_transfer.callbacks.report import RunReport

__all__ = [
    "AtomicCheckpointIO",
    "OutOfMemoryAdvice",
    "PredictionWriter",
    "RunCheckpoint",
    "RunLogger",
    "RunReport",
    "StopOnNonFiniteLoss",
]
