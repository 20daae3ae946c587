"""`hsrm.pt`: the one writer and the one reader of a trained HSRM, side by side.

The file is a ``torch.save``'d dict with two keys, readable with ``weights_only=True``:
    hsrm    the HSRM's state dict
    config  how it was made: ``format`` (FORMAT_VERSION), ``backbone`` (open_clip architecture name),
            ``pretrained`` (tag or weight file), ``fingerprint`` (:func:`mmel.backbone.weights_fingerprint` of the
            CLIP it was trained against), ``layers``, ``scales``, ``tau`` (+ any training hyper-parameters)

An HSRM reads evidence of one particular CLIP: loading it for another architecture is refused (the shapes would
not even fit, or would fit by accident); for the same architecture with other weights (``model.pretrained=null``,
another tag) it loads, with a warning that the maps are not the ones it was trained for. Files written before the
format was versioned (no ``format`` / ``fingerprint``) load as format 1 without the weights check.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mmel.backbone import ClipBundle
from mmel.hsrm.module import HSRM, hsrm_layers

FORMAT_VERSION = 2


def hsrm_config(clip: ClipBundle, layers: Sequence[int], scales: Sequence[int], tau: Any, **extra: Any) -> dict:
    """The ``config`` entry of ``hsrm.pt`` for an HSRM over ``clip`` at block indices ``layers``."""
    return {
        "format": FORMAT_VERSION,
        "backbone": clip.name,
        "pretrained": clip.pretrained,
        "fingerprint": clip.fingerprint,
        "layers": [int(i) for i in layers],
        "scales": [int(s) for s in scales],
        "tau": tau if isinstance(tau, int | float) else [float(t) for t in tau],
        **extra,
    }


def save_hsrm(path: str | Path, hsrm: HSRM, config: Mapping[str, Any]) -> Path:
    """Write ``hsrm.pt`` (``config`` from :func:`hsrm_config`); returns the path."""
    path = Path(path)
    missing = {"format", "backbone", "fingerprint", "layers", "scales", "tau"} - set(config)
    if missing:
        raise ValueError(f"save_hsrm: config lacks {sorted(missing)} (build it with hsrm_config)")
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"hsrm": hsrm.state_dict(), "config": dict(config)}, tmp)
    tmp.replace(path)  # a reader never sees half a file
    return path


def read_hsrm(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, config) of ``hsrm.pt``, with errors that say what is wrong with the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"HSRM checkpoint not found: {path} (train.py writes hsrm.pt in its run dir)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        cfg, state = dict(ckpt["config"]), ckpt["hsrm"]
    except Exception as e:  # noqa: BLE001 - one message for every way a checkpoint can be unreadable
        why = f"{type(e).__name__}: {e}"
        raise ValueError(f"{path} is not an HSRM checkpoint written by train.py ({why})") from e
    fmt = int(cfg.get("format", 1))
    if fmt > FORMAT_VERSION:
        raise ValueError(f"{path} has HSRM checkpoint format {fmt}; this mmel reads up to {FORMAT_VERSION} (upgrade)")
    return state, cfg


def load_hsrm(path: str | Path, clip: ClipBundle) -> tuple[HSRM, dict[str, Any]]:
    """The HSRM saved at ``path``, built for ``clip`` and checked against it; returns (hsrm, config).

    Another architecture than the one it was trained for is an error; other weights of the same architecture
    (fingerprint differs) give a warning.
    """
    state, cfg = read_hsrm(path)
    if cfg.get("backbone") not in (None, clip.name):
        raise ValueError(f"{path} was trained for backbone '{cfg['backbone']}', not '{clip.name}'")
    saved = cfg.get("fingerprint")
    if saved is not None and saved != clip.fingerprint:
        warnings.warn(
            f"{path} was trained on {cfg['backbone']} weights '{cfg.get('pretrained')}' (fingerprint {saved}), "
            f"but the loaded CLIP has weights '{clip.pretrained}' (fingerprint {clip.fingerprint}): the HSRM reads "
            "evidence it was not trained on, so its maps are not those of the trained MMEL. Load the same weights "
            "(model.pretrained=...) to reproduce them.",
            UserWarning,
            stacklevel=2,
        )
    depth = len(clip.model.visual.transformer.resblocks)
    layers = hsrm_layers(list(cfg["layers"]), depth)
    # the switches (absent from a file: the defaults); conditioning absent: what the weights hold (a file written
    # before that setting existed holds an unconditioned HSRM, one without its matrix ``cond``)
    switches = {k: cfg[k] for k in ("layer_weights", "gate") if k in cfg}
    switches["conditioning"] = cfg.get("conditioning", "prompt" if "cond" in state else "none")
    hsrm = HSRM.for_clip(clip.model, num_layers=len(layers), scales=cfg["scales"], tau=cfg["tau"], **switches)
    try:
        hsrm.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: the saved HSRM does not fit '{clip.name}' ({str(e).splitlines()[0]})") from e
    return hsrm, {**cfg, "layers": layers}
