"""Progress bars that stay readable in log files.

Lightning's TQDM bar redraws on every batch; when stdout is a file (a cluster job, ``python train.py > log``) each
redraw is another carriage-return update written to disk, thousands per epoch. :class:`SparseProgressBar` behaves
exactly like Lightning's bar on a terminal, and otherwise redraws at most once per ``interval`` seconds (and at the
end of each loop, so the final counts are always written).
"""

from __future__ import annotations

import sys
import time

from pytorch_lightning.callbacks import TQDMProgressBar


class SparseProgressBar(TQDMProgressBar):
    """Lightning's TQDM progress bar; off a terminal it refreshes at most every ``interval`` seconds."""

    def __init__(self, refresh_rate: int = 1, interval: float = 30.0, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self.interval = float(interval)
        self._last_draw = float("-inf")

    @staticmethod
    def on_terminal() -> bool:
        """Whether the bars' stream (Lightning's bars write to stdout) is a terminal."""
        return bool(getattr(sys.stdout, "isatty", lambda: False)())

    def _should_update(self, current: int, total: int) -> bool:
        if self.on_terminal():
            return super()._should_update(current, total)
        if not self.is_enabled:
            return False
        now = time.monotonic()
        if current == total or now - self._last_draw >= self.interval:
            self._last_draw = now
            return True
        return False
