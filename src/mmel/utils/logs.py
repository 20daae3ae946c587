"""Run logs that say what matters: third-party noise filtered at its source, and a header naming what runs where.

Every program (train, evaluate, explain) calls :func:`start_run` first. It

* drops, by logger / warning module and message, the lines that are noise in every run: Lightning's advertising
  tips ("💡 Tip: For seamless cloud logging ... litlogger", "... cloud uploads ... litmodels") and the
  ``isinstance(treespec, LeafSpec)`` deprecation warning that Lightning's own ``_pytree`` triggers in torch
  (nothing a user can act on). Anything else those libraries log passes; open_clip's chatter is handled where
  models are built (:func:`mmel.backbone.quiet_open_clip`);
* keeps all of them visible with ``verbose=true`` (a key of the primary configs) or ``MMEL_VERBOSE=1``; a verbose
  run sets ``MMEL_VERBOSE=1`` so lower layers (the backbone loader, DDP workers) see it too;
* logs the run header: model and weights (tag or file; the loader's line that follows adds the file and its
  sha256), data (name, root, split), the explainer, device, precision, torch threads, the machine key
  (:mod:`mmel.utils.machine`) and the output dir.
  The programs add the item count as soon as the data is indexed (:func:`log_items`).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from mmel.utils.machine import machine_fingerprint

log = logging.getLogger("mmel.run")

VERBOSE_ENV = "MMEL_VERBOSE"
# Lightning logs its tips through this logger (rank_zero_info) when a Trainer connects its loggers / callbacks
LIGHTNING_RANK_ZERO = "pytorch_lightning.utilities.rank_zero"
# an advertisement: Lightning's tip prefix, naming one of its cloud products
TIP_PREFIX, TIP_PRODUCTS = "💡 Tip:", ("litlogger", "litmodels")
# torch deprecates LeafSpec; pytorch_lightning.utilities._pytree still instantiates it (a FutureWarning per run)
LEAFSPEC_MESSAGE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
LEAFSPEC_MODULE = r"pytorch_lightning\.utilities\._pytree"


def verbose_requested(cfg: DictConfig | None = None) -> bool:
    """``cfg.verbose`` or the environment's ``MMEL_VERBOSE`` (1/true/yes)."""
    if cfg is not None and bool(cfg.get("verbose", False)):
        return True
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class _DropLightningTip(logging.Filter):
    """Drops Lightning's advertising tips for its cloud products; every other Lightning line passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(TIP_PREFIX) and any(p in message for p in TIP_PRODUCTS))


_TIP_FILTER = _DropLightningTip()


def quiet_third_party(verbose: bool) -> None:
    """Install (``verbose=False``) or remove (``verbose=True``) the filters of this module's docstring. Idempotent."""
    logger = logging.getLogger(LIGHTNING_RANK_ZERO)
    if verbose:
        logger.removeFilter(_TIP_FILTER)
        before = len(warnings.filters)
        warnings.filters[:] = [f for f in warnings.filters if not _is_leafspec_filter(f)]
        if len(warnings.filters) != before:
            warnings._filters_mutated()  # type: ignore[attr-defined]  # the registry caches the old decisions
        return
    logger.addFilter(_TIP_FILTER)  # a no-op when already installed
    # filterwarnings replaces an identical entry instead of adding a second one
    warnings.filterwarnings("ignore", message=LEAFSPEC_MESSAGE, category=FutureWarning, module=LEAFSPEC_MODULE)


def _is_leafspec_filter(f: tuple) -> bool:
    action, message, category, module, _ = f
    return action == "ignore" and getattr(message, "pattern", None) == LEAFSPEC_MESSAGE and category is FutureWarning


def _looks_like_file(tag: str) -> bool:
    # mmel.backbone.looks_like_path's rule, restated: utils may not import the backbone (import-linter layers)
    return tag.endswith((".safetensors", ".pt", ".pth", ".bin")) or os.sep in tag or tag.startswith((".", "~"))


def weights_text(model: Any) -> str:
    """How the configured weights read in the header: a file, a tag, or random init. The file a tag resolves to and
    every file's sha256 prefix are on the loader's line that follows (``CLIP <name>: loaded weights from ...``):
    hashing here too would read a large checkpoint twice."""
    tag = model.get("pretrained") if model is not None else None
    if tag is None:
        return "none (random init)"
    if _looks_like_file(str(tag)):
        return f"file {tag}" + ("" if Path(tag).expanduser().is_file() else " (not found)")
    return f"tag '{tag}'"


def _choice(group: str) -> str | None:
    """The option chosen for config group ``group`` (``data=shapes`` -> shapes) in a Hydra run, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return HydraConfig.get().runtime.choices.get(group)
    except (ImportError, ValueError):
        pass
    return None


def _options(node: Any, skip: tuple[str, ...]) -> str:
    if not isinstance(node, DictConfig):
        return ""
    items = OmegaConf.to_container(node, resolve=True)
    shown = {k: v for k, v in items.items() if k not in skip and v is not None and not isinstance(v, dict)}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def header_lines(task: str, cfg: DictConfig, out: str | os.PathLike, device: str) -> list[str]:
    """The run header (see the module docstring), one fact per line."""
    model = cfg.get("model")
    lines = [f"{task}: model {model.get('name') if model else None}, weights {weights_text(model)}"]
    data = cfg.get("data")
    if isinstance(data, DictConfig):
        name = _choice("data") or str(data.get("_target_", "?")).rsplit(".", 1)[-1]
        split = cfg.get("split") if task == "evaluate" else "train/val/test"
        batch = data.get("batch_size")
        lines.append(f"{task}: data {name}, root {data.get('root')}, split {split}, batch_size {batch}")
    elif OmegaConf.select(cfg, "image", default=None, throw_on_missing=False) is not None:
        prompts = OmegaConf.select(cfg, "prompts", default=None, throw_on_missing=False)
        n = len(prompts) if isinstance(prompts, ListConfig | list) else (1 if prompts else 0)
        lines.append(f"{task}: image {cfg.image}, {n} prompt(s)")
    explainer = cfg.get("explainer")
    if isinstance(explainer, DictConfig) and task != "train":
        opts = _options(explainer, ("_target_", "_partial_", "name"))
        lines.append(f"{task}: explainer {explainer.get('name')}" + (f" ({opts})" if opts else ""))
    facts, key = machine_fingerprint(device)
    trainer = cfg.get("trainer")
    precision = f"model {model.get('precision', 'fp32') if model else '?'}"
    if isinstance(trainer, DictConfig):
        precision += f", trainer {trainer.get('precision', '32-true')}"
    where = facts["gpu"] or f"{facts['cpu_model']}, torch CPU kernels {facts['cpu_capability']}"
    lines.append(
        f"{task}: device {device} ({where}), precision {precision}, {torch.get_num_threads()} torch threads, "
        f"machine key {key}"
    )
    lines.append(f"{task}: output {out}")
    return lines


def start_run(task: str, cfg: DictConfig, out: str | os.PathLike, device: str) -> bool:
    """Filters (per :func:`verbose_requested`) and the run header, before anything else is built; returns verbose."""
    verbose = verbose_requested(cfg)
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # the backbone loader (a lower layer) and DDP workers read it
    quiet_third_party(verbose)
    for line in header_lines(task, cfg, out, device):
        log.info("%s", line)
    return verbose


def log_items(task: str, split: str, n: int, limit: int | None = None) -> None:
    """The item count once the data is indexed (and how many a ``limit`` keeps)."""
    kept = f" (limit={limit}: the first {min(n, limit)})" if limit is not None else ""
    log.info("%s: %d items in split %s%s", task, n, split, kept)
