"""Two-process CPU DDP (gloo) run with a gradual unfreeze milestone mid-run; used by test_resume_ddp.

Usage: python tests/ddp_run.py OUT_DIR [STRATEGY] [PEFT] [TEACHER]. Each rank saves its final weights to
OUT_DIR/rank<N>.pt and the frozen-group count it saw at each epoch. TEACHER: a checkpoint to distil from
(logits and features, on fixed views with kd_cache), with PEFT's adapters or a full fine-tune.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import tiny_data, tiny_model, write_folder


class FrozenLog(pl.Callback):
    def __init__(self) -> None:
        self.frozen: list[int] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.frozen.append(pl_module.policy.num_frozen)  # type: ignore[union-attr]


def main() -> None:
    out = Path(sys.argv[1])
    strategy = sys.argv[2] if len(sys.argv) > 2 else "ddp_find_unused_parameters_true"
    data = out / "images"
    if not data.exists():  # rank 0 and rank 1 both get here; the content is seeded and identical
        write_folder(data, per_class=12)
    pl.seed_everything(0)
    peft = sys.argv[3] if len(sys.argv) > 3 else "none"
    teacher = sys.argv[4] if len(sys.argv) > 4 else None
    # with a teacher: fixed views, so its outputs are computed once (kd_cache) and shared between the ranks
    datamodule = tiny_data(data, batch_size=4, verify_images=False, **({"augment": "none"} if teacher else {}))
    distil = {} if teacher is None else {"teacher": teacher, "kd_alpha": 0.7, "kd_feature_weight": 100.0,
                                         "kd_cache": True, "cache_dir": str(out / "cache")}  # fmt: skip
    if peft == "none" and teacher is None:
        model = tiny_model(datamodule, mode="gradual", unfreeze_every=1, lr=0.05, warmup_epochs=0)
    else:  # adapters (or every weight) from the first step: every parameter that requires grad is used
        model = tiny_model(datamodule, mode="full", peft=peft, lr=0.05, warmup_epochs=0, **distil)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    log = FrozenLog()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[log],
        default_root_dir=out,
    )
    trainer.fit(model, datamodule)
    torch.save(
        {
            "state_dict": model.state_dict(),
            "initial": initial,
            "frozen": log.frozen,
            "world": trainer.world_size,
            "memo": [model._memo.hits, model._memo.misses, len(model._memo.rows)] if model._memo else None,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
