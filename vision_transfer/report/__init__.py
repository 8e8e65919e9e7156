"""Plots and summaries of runs."""

from vision_transfer.report.plots import plot_confusion_matrix, plot_training_curves

__all__ = ["plot_confusion_matrix", "plot_training_curves"]
