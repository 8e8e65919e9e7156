"""Plots and summaries of runs and of backbone grids, drawn from their files (no Lightning here)."""

from vision_transfer.report.grid import write_grid_summary
from vision_transfer.report.plots import plot_confusion_matrix, plot_image_grid, plot_training_curves
from vision_transfer.report.run import report, summary_text, write_run_summary

__all__ = [
    "plot_confusion_matrix",
    "plot_image_grid",
    "plot_training_curves",
    "report",
    "summary_text",
    "write_grid_summary",
    "write_run_summary",
]
