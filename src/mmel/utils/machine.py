"""What machine a run ran on, as far as it decides the last bits of its numbers.

Float results agree to the last bit only between runs on the same *kind* of machine: torch picks its CPU kernels by
the instruction sets it finds (``torch.backends.cpu.get_cpu_capability()``: AVX2 vs AVX512 kernels sum in
different orders), by the number of threads (how reductions are split) and, on a GPU, by the GPU model.
:func:`machine` records these in every ``metrics.json`` (``run.machine``); :func:`machine_fingerprint` adds a short
stable ``key`` over the fields that change kernels, so code comparing runs (the README table generator) can tell
"same machine kind, numbers must agree exactly" from "different kind, expect last-digit differences".
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import torch

# CPU flags (as /proc/cpuinfo spells them) that change which float kernels torch / oneDNN run
KERNEL_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
)
# the fields of machine() that decide the kernels, hence the key: not the thread count's *source*, not versions
KEY_FIELDS = ("cpu_model", "cpu_flags", "cpu_capability", "threads", "device", "gpu")


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str | None, list[str] | None]:
    """(model name, kernel flags present) from ``path``; (None, None) where there is no such file (not Linux)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None, None
    model, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and flags is None:  # x86 | ARM spelling
            present = set(value.split())
            flags = [f for f in KERNEL_FLAGS if f in present]
        if model is not None and flags is not None:
            break
    return model, flags


def cpu_capability() -> str | None:
    """torch's chosen CPU kernel level (``DEFAULT``, ``AVX2``, ``AVX512``, ...; None on torch builds without it)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return None


def machine(device: str | torch.device | None = None, cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The machine facts that decide a run's last bits (plain JSON).

    ``device``: where the run computes (``cpu``, ``cuda``, ``cuda:1``; None: ``cuda`` when one is available, else
    ``cpu``). ``cpu_flags`` lists the :data:`KERNEL_FLAGS` present (None where /proc/cpuinfo is not readable; then
    ``cpu_model`` falls back to :func:`platform.processor`)."""
    model, flags = _cpuinfo(cpuinfo)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = None
    if dev.type == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(dev.index or 0)
    return {
        "cpu_model": model or platform.processor() or None,
        "cpu_flags": flags,
        "cpu_capability": cpu_capability(),
        "arch": platform.machine() or None,
        "threads": torch.get_num_threads(),
        "device": dev.type,
        "gpu": gpu,
        "cuda": torch.version.cuda if dev.type == "cuda" else None,
    }


def machine_key(facts: dict[str, Any]) -> str:
    """A short stable key (12 hex digits) over :data:`KEY_FIELDS` of a :func:`machine` dict: equal keys = the same
    kind of machine for float kernels. Missing fields count as null, so old records compare without errors."""
    picked = {k: facts.get(k) for k in KEY_FIELDS}
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:12]


def machine_fingerprint(device: str | torch.device | None = None) -> tuple[dict[str, Any], str]:
    """(:func:`machine` facts, :func:`machine_key` of them) for this process."""
    facts = machine(device)
    return facts, machine_key(facts)


def same_machine_kind(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool | None:
    """Whether two recorded ``machine`` entries (``run.machine`` of two metrics.json) are the same kind of machine;
    None when either is missing (a run recorded before machines were)."""
    if not a or not b:
        return None
    return machine_key(a) == machine_key(b)
