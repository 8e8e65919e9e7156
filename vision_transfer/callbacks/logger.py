"""RunLogger: one run folder with both ``metrics.csv`` and TensorBoard event files."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities import rank_zero_only


class RunLogger(CSVLogger):
    """Lightning's CSVLogger that also writes TensorBoard events into the same version folder.

    Two loggers side by side would each pick their own ``version_N``; one logger keeps every
    file of a run in one folder (``tensorboard --logdir runs`` finds them there).

    Args:
        save_dir: root of all runs.
        name: experiment folder under ``save_dir``.
        version: ``version_N`` folder; None picks the next free one.
        tensorboard: also write TensorBoard event files (needs the ``tensorboard`` package).
    """

    def __init__(
        self,
        save_dir: str = "runs",
        name: str = "lightning_logs",
        version: int | str | None = None,
        tensorboard: bool = True,
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__(save_dir, name=name, version=version, flush_logs_every_n_steps=flush_logs_every_n_steps)
        self.tensorboard = tensorboard
        self._writer: Any = None

    @property
    def writer(self) -> Any:
        """The TensorBoard SummaryWriter, opened on first use (rank zero only)."""
        if self._writer is None and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        return self._writer

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        if self.writer is not None:
            for key, value in metrics.items():
                if key != "epoch":
                    self.writer.add_scalar(key, float(value), global_step=step)

    def keep_history_before(self, step: int) -> None:
        """Resuming into this run folder: keep ``metrics.csv``'s rows from before ``step``.

        Lightning's CSV writer deletes ``metrics.csv`` when it opens an existing folder; rows from
        after the checkpoint (what a killed run logged past it) are dropped.
        """
        path = Path(self.log_dir) / "metrics.csv"
        if not path.is_file():
            return
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if int(float(row.get("step") or 0)) < step]
        writer = self.experiment  # opening the writer deletes the old file
        with path.open("w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=header)
            out.writeheader()
            out.writerows(rows)
        writer.metrics_keys = header  # its next save appends to these columns

    @rank_zero_only
    def save(self) -> None:
        super().save()
        if self._writer is not None:
            self._writer.flush()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
