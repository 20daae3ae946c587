"""A callback for tests that kill a training process at a known point: it writes a flag file after a given
training batch and then sleeps, so the test can SIGKILL the process mid-epoch (see test_reproducibility.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl


class PauseMidEpoch(pl.Callback):
    """After batch ``batch`` of epoch ``epoch``: write ``flag`` and sleep (until killed, at most ``seconds``)."""

    def __init__(self, flag: str, epoch: int, batch: int, seconds: float = 600.0) -> None:
        self.flag, self.epoch, self.batch, self.seconds = Path(flag), epoch, batch, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            self.flag.write_text(f"epoch {trainer.current_epoch} batch {batch_idx}\n")
            time.sleep(self.seconds)
