"""Where a run computes and at what precision: one owner, the Lightning trainer.

``train`` and ``evaluate`` run as Lightning loops, so the trainer decides the device (``trainer.accelerator``,
``devices``, ``num_nodes``; under DDP each process its own GPU) and the precision (``trainer.precision``). Everything
else follows it: the frozen CLIP (moved with the module that holds it), the HSRM, the metrics and the feature-cache
build (run before Lightning moves the model, so it places the CLIP itself with :func:`trainer_device`).

``model.device`` is the device the CLIP is *loaded* on. It defaults to null (the CPU, then the trainer moves it);
set explicitly it must agree with the trainer (:func:`check_model_device`), so a config cannot ask for a GPU
trainer and a CPU CLIP (or the reverse) and silently get half of each.

Precision names: Lightning's (``32-true``, ``bf16-mixed``, ``16-mixed``) and the short ones (``fp32``, ``bf16``,
``fp16``) mean the same; :func:`autocast` gives the context that a program without a trainer (``explain``, the
benchmarks) wraps its frozen forwards and explainer calls in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

#: precision name -> autocast dtype (None: plain float32)
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "32": None,
    "32-true": None,
    "bf16": torch.bfloat16,
    "bf16-mixed": torch.bfloat16,
    "fp16": torch.float16,
    "16": torch.float16,
    "16-mixed": torch.float16,
}


FLOAT32 = ("fp32", "32", "32-true")


def precision_key(precision: str | int | None) -> str | None:
    """What a cache key / run fingerprint records of a precision: None for float32 (so float32 runs keep the keys
    they always had), else the setting as given (any Lightning precision, e.g. ``bf16-mixed`` or ``bf16-true``)."""
    return None if precision is None or str(precision) in FLOAT32 else str(precision)


def autocast_dtype(precision: str | int | None) -> torch.dtype | None:
    """The autocast dtype of a precision name (None for float32); a clear error for an unknown name."""
    key = "fp32" if precision is None else str(precision)
    if key not in PRECISIONS:
        raise ValueError(
            f"precision={precision!r}: expected one of {sorted(PRECISIONS)} (fp32 / 32-true: float32; bf16 / "
            "bf16-mixed: bfloat16 autocast; fp16 / 16-mixed: float16 autocast, GPUs only)"
        )
    return PRECISIONS[key]


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: str | int | None) -> Iterator[None]:
    """Autocast for ``precision`` on ``device``'s type (nothing for float32). float16 on the CPU is refused: CPU
    autocast is meant for bfloat16."""
    dtype = autocast_dtype(precision)
    kind = torch.device(device).type
    if dtype is None:
        yield
        return
    if dtype == torch.float16 and kind == "cpu":
        raise ValueError(f"precision={precision!r} (float16 autocast) needs a GPU; on the CPU use bf16")
    with torch.autocast(kind, dtype=dtype):
        yield


def trainer_device(trainer: Any) -> torch.device | None:
    """The device a Lightning trainer puts this process's model on (its strategy's root device), None without one.
    Known from the trainer's construction on (before ``fit`` / ``test`` moves anything)."""
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    device = getattr(strategy, "root_device", None)
    return torch.device(device) if device is not None else None


def place_clip(clip: Any, device: torch.device | None) -> None:
    """Move a :class:`mmel.backbone.ClipBundle`'s model to ``device`` (no-op when None or already there)."""
    if device is not None and clip is not None and clip.device != device:
        clip.model.to(device)


def accelerator_device_type(accelerator: str) -> str:
    """The torch device type a Lightning ``accelerator`` setting computes on (``auto``: cuda when one exists)."""
    a = str(accelerator).lower()
    if a in ("gpu", "cuda"):
        return "cuda"
    if a == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return a  # cpu, mps, tpu ...


def check_model_device(cfg: Any) -> None:
    """``model.device`` must be null or agree with the trainer (``train`` / ``evaluate``); else a ValueError naming
    both settings and what to set."""
    model, trainer = cfg.get("model") or {}, cfg.get("trainer") or {}
    device = model.get("device") if hasattr(model, "get") else None
    if device is None or not hasattr(trainer, "get"):
        return
    want = accelerator_device_type(trainer.get("accelerator", "cpu"))
    got = torch.device(str(device)).type
    if got != want:
        raise ValueError(
            f"model.device={device} disagrees with trainer.accelerator={trainer.get('accelerator')} (which computes "
            f"on {want}): the trainer places the CLIP, the HSRM, the metrics and the cache build. Remove the setting "
            f"(model.device=null, the default) or choose the trainer that computes there (e.g. trainer="
            f"{'gpu' if got == 'cuda' else 'cpu'})."
        )
