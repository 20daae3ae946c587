"""Run bookkeeping shared by the programs: where a run writes, its results file, loggers and callbacks.

Every program writes ``metrics.json`` next to Hydra's ``.hydra/config.yaml`` in its run directory and prints
that directory, so that experiments/ can aggregate runs into tables without knowing how each was made.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from mmel.utils.machine import machine_fingerprint

log = logging.getLogger(__name__)


def output_dir(cfg: DictConfig | None = None) -> Path:
    """The current run's directory (Hydra's output dir, or ``cfg.paths.output_dir`` outside Hydra)."""
    # the config's own path first: it is Hydra's output dir in a Hydra run (an interpolation of it) and an
    # explicit folder when a program is called from Python
    if cfg is not None and cfg.get("paths") and cfg.paths.get("output_dir"):
        return Path(cfg.paths.output_dir)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path.cwd()


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return _plain(v.item()) if v.numel() == 1 else _plain(v.tolist())
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf; null is explicit about "not defined"
    return v


def save_metrics(
    metrics: dict[str, Any], directory: str | os.PathLike, name: str = "metrics.json", cfg: DictConfig | None = None
) -> Path:
    """Write ``metrics`` (tensors converted to numbers) atomically as JSON; returns the file path.

    With ``cfg`` the file also gets a ``run`` entry (:func:`provenance`): seeds, package versions, git commit.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    if cfg is not None:
        metrics = {**metrics, "run": provenance(cfg)}
    tmp.write_text(json.dumps(_plain(metrics), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)  # a reader never sees a half-written file
    return path


# the packages whose versions decide a run's numbers (distribution names)
PACKAGES = ("torch", "torchvision", "open_clip_torch", "pytorch-lightning", "torchmetrics", "numpy", "mmel")


def provenance(cfg: DictConfig) -> dict[str, Any]:
    """What someone needs to reproduce a run's numbers: the run's ``seed`` (every random choice of training),
    ``data_seed`` (the world's / subset's seed), the versions of :data:`PACKAGES` and python, and the git commit
    of the mmel checkout with a ``dirty`` flag (tracked files modified; null values outside a git checkout), and
    the ``machine`` (:func:`mmel.utils.machine.machine`: CPU model and kernel flags, torch's CPU capability and
    thread count, device and GPU) with its ``key`` (equal keys: same machine kind, the numbers agree to the bit)."""
    data = cfg.get("data") or {}
    facts, key = machine_fingerprint(run_device(cfg))
    return {
        "seed": cfg.get("seed"),
        "data_seed": data.get("seed") if hasattr(data, "get") else None,
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}},
        "git": git_state(Path(__file__).resolve().parents[3]),
        "machine": {**facts, "key": key},
    }


def run_device(cfg: DictConfig) -> str:
    """Where a run computes: ``cuda`` when its trainer's accelerator (or, without a trainer, its model's device) asks
    for a GPU, else ``cpu``."""
    trainer = cfg.get("trainer") or {}
    accel = str(trainer.get("accelerator", "") if hasattr(trainer, "get") else "")
    model = cfg.get("model") or {}
    device = str((model.get("device") if hasattr(model, "get") else None) or "cpu")
    if accel in ("gpu", "cuda") or (not accel and device.startswith("cuda")):
        return "cuda"
    if accel == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state(root: Path) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the git checkout at ``root`` (None: not one)."""

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    if not (root / ".git").exists():  # an installed (non-editable) mmel: its site-packages is no checkout
        return {"commit": None, "dirty": None}
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def announce(directory: str | os.PathLike) -> None:
    """Print the run directory (the last line a program prints; scripts grep for it)."""
    print(f"run dir: {directory}", flush=True)


def _int_key(key: str, value: Any, minimum: int, meaning: str, example: str) -> int:
    """``value`` as an int >= ``minimum``, else a ValueError naming ``key``, what it means and an example."""
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).strip().lstrip("-").isdigit():
        raise ValueError(f"{key}={value!r}: expected an integer >= {minimum} ({meaning}), e.g. {key}={example}")
    if int(value) < minimum:
        raise ValueError(f"{key}={value}: expected an integer >= {minimum} ({meaning}), e.g. {key}={example}")
    return int(value)


def check_loader_keys(data: Any) -> None:
    """``data.batch_size`` >= 1 and ``data.num_workers`` >= 0, checked before anything is built (a zero batch size
    would otherwise fail deep in the chunking as "range() arg 3 must not be zero")."""
    if data is None or not hasattr(data, "get"):
        return
    if data.get("batch_size") is not None:
        _int_key("data.batch_size", data.get("batch_size"), 1, "samples per batch", "32")
    if data.get("num_workers") is not None:
        _int_key("data.num_workers", data.get("num_workers"), 0, "loader processes; 0 = in the main process", "2")


def check_limit(limit: Any) -> int | None:
    """``limit``: null (the whole split) or an int >= 1 (the first N samples); anything else is a clear error."""
    if limit is None:
        return None
    return _int_key("limit", limit, 1, "score the first N samples of the split; null = all of them", "100")


def build_datamodule(cfg: DictConfig, clip) -> Any:
    """The configured datamodule (``cfg.data``), sized and normalised for the loaded CLIP bundle."""
    return instantiate(
        cfg.data, image_size=clip.image_size[0], mean=list(clip.mean), std=list(clip.std), patch_size=clip.patch_size
    )


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (loggers, callbacks)."""
    objs: list[Any] = []
    if not cfg:
        return objs
    for key, conf in cfg.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            log.info("instantiating %s <%s>", key, conf._target_)
            objs.append(instantiate(conf))
    return objs


STAGES = ("train", "val", "test", "best")


def optimized_value(metrics: dict[str, Any], key: str | None) -> float | None:
    """What a sweep optimises: ``metrics[key]`` as a float, None when no key is configured or when the key's stage
    did not run (``val/...`` of a ``train=false`` run; logged).

    Any other key the run did not produce is an error: a typo in a sweep config must fail, not optimise None."""
    if key is None:
        return None
    if key in metrics:
        return float(metrics[key])
    stage = key.split("/", 1)[0] if "/" in key else None
    if stage in STAGES and not any(k.startswith(f"{stage}/") for k in metrics):
        log.warning("optimized_metric=%s: this run has no %s/ metrics (stage not run); returning None", key, stage)
        return None
    known = sorted(k for k, v in metrics.items() if isinstance(v, int | float | torch.Tensor))
    raise KeyError(f"optimized_metric={key!r} is not among this run's metrics {known}")
