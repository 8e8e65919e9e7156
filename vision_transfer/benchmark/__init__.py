"""Linear-probe (and fine-tune) benchmarks: backbones x datasets x seeds -> table and plots."""

from vision_transfer.benchmark.grid import BackboneEntry, DatasetEntry, run_grid
from vision_transfer.benchmark.summary import write_summary

__all__ = ["BackboneEntry", "DatasetEntry", "run_grid", "write_summary"]
