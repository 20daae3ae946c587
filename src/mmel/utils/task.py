"""The one wrapper of the programs (train, evaluate, explain), as lightning-hydra-template's ``task_wrapper``.

    @task("evaluate")
    def run(cfg, out): ...          # called as run(cfg) -> what the body returns

Before the body: the run directory (``resume=<dir>`` continues that one, else Hydra's / ``cfg.paths.output_dir``),
the log filters and the header saying what runs where (:func:`mmel.utils.logs.start_run`), and every seed
(``seed_everything(cfg.seed)``: python, numpy, torch and the data loader workers). After it, whatever happened: the
wandb run is finished, so the next job of a sweep starts its own; a failure is logged with the run directory that
holds what was written so far, then raised.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytorch_lightning as pl
from omegaconf import DictConfig

from mmel.utils.logs import start_run
from mmel.utils.runs import output_dir, run_device

log = logging.getLogger(__name__)
R = TypeVar("R")


def finish_wandb() -> None:
    """Close a wandb run so the next job of a sweep starts its own (no-op without one)."""
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a dependency
        return
    if wandb.run is not None:
        wandb.finish()


def task(name: str) -> Callable[[Callable[[DictConfig, Path], R]], Callable[[DictConfig], R]]:
    """Wrap a program body ``body(cfg, out)`` into its ``run(cfg)`` (see the module docstring)."""

    def wrap(body: Callable[[DictConfig, Path], R]) -> Callable[[DictConfig], R]:
        @functools.wraps(body)
        def run(cfg: DictConfig) -> R:
            resume = cfg.get("resume")
            out = Path(resume) if resume else output_dir(cfg)
            start_run(name, cfg, out, run_device(cfg))  # filters and the header first: every later line in context
            pl.seed_everything(int(cfg.get("seed", 0)), workers=True)
            try:
                return body(cfg, out)
            except Exception:
                log.error("%s failed; what it wrote so far is in %s", name, out)
                raise
            finally:
                finish_wandb()

        return run

    return wrap
