"""The `train` program: learn the HSRM against a frozen CLIP from box annotations, then test it.

    python train.py model=vitb16 data=coco      # any config key can be overridden

Writes, in the run dir: `metrics.json` (train/val/test metrics, the HSRM next to the Grad-ECLIP it starts from),
`hsrm.pt` (the trained HSRM for `build_explainer("mmel", clip, checkpoint=...)`), Lightning checkpoints and logs.
Returns (metrics, objects); `main()` in the root shim returns `cfg.optimized_metric` for sweeps.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from mmel.utils.runs import announce, build_datamodule, instantiate_group, output_dir, save_metrics

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    pl.seed_everything(cfg.seed, workers=True)
    out = output_dir(cfg)
    clip = instantiate(cfg.model)
    datamodule = build_datamodule(cfg, clip)
    module = instantiate(cfg.hsrm)(clip=clip)
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = instantiate_group(cfg.get("callbacks"))
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)

    metrics: dict[str, Any] = {}
    if cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics.update({k: v for k, v in trainer.callback_metrics.items()})
    if cfg.get("test", True):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({k: v for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    if trainer.is_global_zero:
        torch.save(module.hsrm_checkpoint(), out / "hsrm.pt")
        metrics["hsrm_checkpoint"] = str(out / "hsrm.pt")
        save_metrics(metrics, out)
        announce(out)
    _finish_wandb()
    return metrics, {"clip": clip, "datamodule": datamodule, "module": module, "trainer": trainer}


def _finish_wandb() -> None:
    """Close a wandb run so the next job of a sweep starts its own (no-op without wandb)."""
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a dependency; stay robust if it is absent
        return
    if wandb.run is not None:
        wandb.finish()
