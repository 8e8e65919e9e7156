"""Plots, summaries and logs of runs."""

from vision_transfer.report.callback import RunReport
from vision_transfer.report.logger import RunLogger
from vision_transfer.report.plots import plot_confusion_matrix, plot_image_grid, plot_training_curves
from vision_transfer.report.run import report, summary_text, write_summary

__all__ = [
    "RunLogger",
    "RunReport",
    "plot_confusion_matrix",
    "plot_image_grid",
    "plot_training_curves",
    "report",
    "summary_text",
    "write_summary",
]
