"""CLIP weight files: reading them (safetensors, torch.save dicts, OpenAI TorchScript archives) into an open_clip
state dict with clear errors, loading them into a model (the QuickGELU check, what does not fit named), and hashing
them (the file's sha256, a fingerprint of the weights themselves). Used by :func:`mmel.backbone.load_clip`."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import open_clip
import torch
from torch import nn

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of a CLIP's weights, so that caches and checkpoints follow the weights themselves, not just the
    name of the file or tag they came from. It hashes the few tensors that every (re)training changes: the
    projections, the patch embedding, the class and token embeddings."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        if name.endswith(("proj", "projection", "conv1.weight", "class_embedding", "token_embedding.weight")):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def looks_like_path(pretrained: str) -> bool:
    """Whether ``pretrained`` names a weight file (a known suffix or a path) rather than a tag."""
    p = str(pretrained)
    return p.endswith(WEIGHT_SUFFIXES) or os.sep in p or p.startswith((".", "~"))


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Read a weight file into an open_clip-keyed state dict.

    Returns (state_dict, is_openai_format). Accepts safetensors, ``torch.save`` dicts (optionally under
    ``state_dict`` and with DDP's ``module.`` prefix) and OpenAI TorchScript archives.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP weight file not found: {path}. Pass an existing .safetensors/.pt/.bin file, or an open_clip "
            "pretrained tag (see data/README.md for downloading weights on a machine with internet)."
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except RuntimeError as e:
                # OpenAI's released files are TorchScript archives, which torch.load refuses.
                if "TorchScript" not in str(e) and "jit" not in str(e).lower():
                    raise
                sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001 — any decoder failure means the same thing to the user
        raise ValueError(
            f"Could not read CLIP weights from {path} ({type(e).__name__}: {_first_line(e)}). "
            "Expected a .safetensors file, a torch.save'd state dict (.pt/.pth/.bin) or an OpenAI TorchScript "
            "archive; the file may be "
            "truncated or corrupt — download it again."
        ) from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (got {type(sd).__name__}).")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    is_openai = any(k in sd for k in _OPENAI_EXTRA_KEYS)
    for k in _OPENAI_EXTRA_KEYS:
        sd.pop(k, None)
    return sd, is_openai


def _first_line(e: Exception, limit: int = 160) -> str:
    text = str(e).strip().splitlines()
    return text[0][:limit] if text else ""


def uses_quick_gelu(model: nn.Module) -> bool:
    """True when the transformer MLPs use QuickGELU (what OpenAI's weights were trained with)."""
    return any(isinstance(m, open_clip.transformer.QuickGELU) for m in model.modules())


def _load_file_into(model: nn.Module, path: str | Path, name: str) -> None:
    sd, is_openai = read_state_dict(path)
    if is_openai and not uses_quick_gelu(model):
        raise ValueError(
            f"{path} holds OpenAI CLIP weights, which were trained with QuickGELU, but '{name}' uses GELU. "
            f"Use the '{name}-quickgelu' model name (e.g. model=vitb16 does)."
        )
    if "logit_scale" in sd and sd["logit_scale"].ndim != model.logit_scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"shape mismatch in {len(wrong)} (e.g. {k}: file {tuple(sd[k].shape)} vs model "
                f"{tuple(expected[k].shape)})"
            )
        raise ValueError(f"Weights in {path} do not fit architecture '{name}': " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)
