"""The `train` program: learn the HSRM against a frozen CLIP from box annotations, then test it.

    python train.py model=vitb16 data=coco      # any config key can be overridden

Writes, in the run dir: `metrics.json` (train/val/test metrics, the HSRM next to the Grad-ECLIP it starts from),
`hsrm.pt` (the trained HSRM for `build_explainer("mmel", clip, checkpoint=...)`), Lightning checkpoints and logs.
Returns (metrics, objects); `main()` in the root shim returns `cfg.optimized_metric` for sweeps.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mmel.data.image_keys import image_keys
from mmel.hsrm import save_hsrm
from mmel.hsrm.features import CachedFeatureDataModule
from mmel.utils.placement import check_model_device, precision_key
from mmel.utils.runs import (
    announce,
    build_datamodule,
    check_loader_keys,
    instantiate_group,
    save_metrics,
)
from mmel.utils.task import task

log = logging.getLogger(__name__)


@task("train")
def run(cfg: DictConfig, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    if cfg.get("explainer") is not None:  # e.g. `+explainer=legrad`: it would be silently ignored
        raise ValueError(
            "train: the HSRM is trained on native Grad-ECLIP evidence; an `explainer` setting has no effect here. "
            "Remove it (choose explainers with evaluate.py; the HSRM's own settings are hsrm.*)."
        )
    check_loader_keys(cfg.data)  # bad numbers are named before anything is loaded
    check_model_device(cfg)  # the trainer places everything; model.device may only agree with it
    out.mkdir(parents=True, exist_ok=True)
    clip = instantiate(cfg.model)
    datamodule = build_datamodule(cfg, clip)
    module = instantiate(cfg.hsrm)(clip=clip)
    fc = cfg.get("feature_cache")
    if fc and fc.get("enabled", False):
        datamodule = cached_features(cfg, clip, datamodule, module)
    datamodule.order_seed = int(cfg.seed)  # the training order is a function of (seed, epoch): mmel.data.order
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = instantiate_group(cfg.get("callbacks"))
    if cfg.get("ckpt_path"):
        _continue_checkpoint_folder(callbacks, cfg.ckpt_path)
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)

    metrics: dict[str, Any] = {}
    if cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics.update({k: v for k, v in trainer.callback_metrics.items()})  # val/* of the last epoch
        ckpt_cb = trainer.checkpoint_callback
        if ckpt_cb is not None and ckpt_cb.best_model_score is not None:
            metrics[f"best/{ckpt_cb.monitor}"] = ckpt_cb.best_model_score  # the epoch that test/* and hsrm.pt use
    if cfg.get("test", True):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({k: v for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    if trainer.is_global_zero:
        save_hsrm(out / "hsrm.pt", module.hsrm, {**module.hsrm_config(), **trained_on(datamodule)})
        metrics["hsrm_checkpoint"] = str(out / "hsrm.pt")
        metrics["skipped"] = skip_counts(datamodule)
        save_metrics(metrics, out, cfg=cfg)
        announce(out)
    return metrics, {"clip": clip, "datamodule": datamodule, "module": module, "trainer": trainer}


def trained_on(datamodule: Any) -> dict[str, Any]:
    """``train_images``: the keys of the training split's images (mmel.data.image_keys), for the leakage guard
    of evaluate (mmel.evaluation.overlap); empty when the data module has no indexed training split."""
    base = getattr(datamodule, "base", datamodule)  # a feature-cache module wraps the box data module
    try:
        dataset = base.dataset("train")
    except (AttributeError, ValueError):
        return {}
    return {"train_images": sorted(image_keys(dataset))}


def skip_counts(datamodule: Any) -> dict[str, int]:
    """Samples / boxes left out, by reason (as evaluate's ``skipped``): the data module's own counts, and for a
    feature-cache module also its base module's (indexing) counts."""
    total: Counter = Counter()
    for dm in (getattr(datamodule, "base", None), datamodule):
        total.update(getattr(dm, "skipped", None) or {})
    return {k: int(v) for k, v in sorted(total.items()) if v}


def _continue_checkpoint_folder(callbacks: list[Any], ckpt_path: str) -> None:
    """Resuming: keep writing checkpoints into the folder ``ckpt_path`` lies in. Lightning restores
    ModelCheckpoint's best-k bookkeeping only for the same folder; in a fresh folder the resumed run would forget
    the best epoch before the kill and could test another checkpoint than the uninterrupted run."""
    folder = str(Path(ckpt_path).expanduser().resolve().parent)
    for cb in callbacks:
        if isinstance(cb, pl.callbacks.ModelCheckpoint) and cb.dirpath != folder:
            log.info("resuming from %s: checkpoints continue in %s (not %s)", ckpt_path, folder, cb.dirpath)
            cb.dirpath = folder


def cached_features(cfg: DictConfig, clip, datamodule, module):
    """Wrap the data module so the frozen-CLIP features are computed once into a cache (see mmel.hsrm.features)."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    loader = {k: data.pop(k) for k in ("num_workers", "pin_memory", "persistent_workers") if k in data}
    data.pop("batch_size", None)  # these do not change what is computed
    precision = precision_key((cfg.get("trainer") or {}).get("precision"))
    key = {
        "backbone": clip.name,
        "weights": f"{clip.pretrained}:{clip.fingerprint}",
        "resolution": list(clip.image_size),
        "evidence": "grad_eclip/native",
        "data": data,
    }
    if precision is not None:  # mixed-precision evidence is another cache (float32 keys unchanged)
        key["precision"] = precision
    fc = cfg.feature_cache
    return CachedFeatureDataModule(
        datamodule,
        module.evidence_fn(),
        module.layers,
        key,
        fc.dir,
        fc.batch_size,
        scales=list(module.hparams.scales),
        dtype=fc.get("dtype", "auto"),
        shard_size=fc.get("shard_size", 256),
        clip=clip,
        loader=loader,
    )
