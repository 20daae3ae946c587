"""Frozen open_clip backbones: one loader for open_clip tags, local weight files and the project's own models.

`load_clip(name, pretrained)` returns a :class:`ClipBundle` (model, preprocess, tokenizer). The model is always
frozen (`requires_grad_(False)`) and in eval mode: every explainer and the HSRM treat CLIP as a fixed function.

`pretrained` may be
  * ``None``                 — random initialisation (tests, timing benchmarks);
  * an open_clip tag         — e.g. ``"openai"``, ``"laion2b_s34b_b88k"`` (downloaded once, needs internet or a
                               pre-filled Hugging Face cache with ``HF_HUB_OFFLINE=1``);
  * a local file             — ``.safetensors``, ``.pt``/``.pth``/``.bin`` in open_clip format, an OpenAI-format
                               state dict, or an OpenAI TorchScript archive (``ViT-B-16.pt`` from the CLIP repo);
  * a project tag            — e.g. ``"shapes"`` for ``mmel-tiny``: resolved by a registered resolver
                               (see :func:`register_local_weights`), which may build the file on first use.

OpenAI weights were trained with QuickGELU. open_clip's plain names (``ViT-B-16``) use nn.GELU, which silently
gives wrong activations with those weights, so loading OpenAI weights into a non-QuickGELU model is an error.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import open_clip
import torch
from torch import nn

from mmel.families import attn_pool_problem, vit_problem
from mmel.weights import (  # noqa: F401 - the weight-file helpers, long imported from here
    WEIGHT_SUFFIXES,
    _first_line,
    _load_file_into,
    file_sha256,
    looks_like_path,
    read_state_dict,
    uses_quick_gelu,
    weights_fingerprint,
)

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
# total stride of the CNN towers (ModifiedResNet, ConvNeXt): their inputs are multiples of it, like a ViT's patch
CNN_STRIDE = 32
# Keys that OpenAI's TorchScript archives carry next to the weights; open_clip's CLIP has no such entries.

HF_PREFIX = "hf:"
# Hugging Face config.model_type -> "module:function(source, *, device, precision) -> (model, preprocess, tokenizer,
# mean, std)", imported on first use (another family's loader registers here the same way)
HF_LOADERS: dict[str, str] = {"clip": "mmel.hf_clip:load", "siglip": "mmel.hf_siglip:load"}

_registered = False
# (model name, prompt) of truncated prompts already logged by ClipBundle.tokenize (once each per process)
_TOLD_TRUNCATED: set[tuple[str, str]] = set()
# (model name, tag) -> callable(cache_dir) -> path of a weight file, or "module:function" imported on first use
# (so that loading a backbone does not import the training code that can build the weights).
_LOCAL_WEIGHTS: dict[tuple[str, str], Callable[[Path], Path] | str] = {
    ("mmel-tiny", "shapes"): "mmel.pretrain.tiny:resolve_weights",
    ("mmel-tiny", "shapes-relations"): "mmel.pretrain.tiny:resolve_relations_weights",
}


def register_model_configs() -> None:
    """Make the project's architecture configs (``src/mmel/model_configs/*.json``) known to open_clip."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def register_local_weights(name: str, tag: str, resolver: Callable[[Path], Path]) -> None:
    """Register a project-owned weight tag: ``resolver(cache_dir)`` returns (and may first build) the file."""
    _LOCAL_WEIGHTS[(name, tag)] = resolver


def is_project_tag(name: str, tag: str) -> bool:
    """Whether (architecture, tag) is one of the project's own weights (resolved, and built if needed, locally)."""
    return (name, tag) in _LOCAL_WEIGHTS


def default_cache_dir() -> Path:
    """Where downloaded / project-built weights live: ``$MMEL_CACHE_DIR`` or ``~/.cache/mmel``."""
    return Path(os.environ.get("MMEL_CACHE_DIR", Path.home() / ".cache" / "mmel")).expanduser()


@dataclass
class ClipBundle:
    """A frozen CLIP with what is needed to feed it.

    model:      open_clip ``CLIP`` (frozen, eval)
    preprocess: PIL image -> normalised tensor [3, S, S] at the model's native size
    tokenizer:  list[str] -> LongTensor [K, context_length]
    """

    model: nn.Module
    preprocess: Callable
    tokenizer: Callable
    name: str
    pretrained: str | None = None
    mean: tuple[float, float, float] = field(default=open_clip.OPENAI_DATASET_MEAN)
    std: tuple[float, float, float] = field(default=open_clip.OPENAI_DATASET_STD)

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def patch_size(self) -> int:
        """The ViT patch side (a timm trunk's too); for a CNN tower (no patches) its total stride, 32: input sides
        must be multiples of it."""
        visual = self.model.visual
        patch = getattr(visual, "patch_size", None)
        if patch is None:  # a timm ViT trunk keeps it in its patch embedding
            patch = getattr(getattr(getattr(visual, "trunk", None), "patch_embed", None), "patch_size", None)
        return _pair(patch)[0] if patch is not None else CNN_STRIDE

    @property
    def image_size(self) -> tuple[int, int]:
        return _pair(self.model.visual.image_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Tokens [K, context_length] on the model's device. A prompt longer than the text tower's context is cut to
        it (the end token kept); that is logged once per prompt, with how many tokens were kept of how many."""
        for p in prompts:
            counts = self.token_counts(p)
            if counts is not None and counts[0] < counts[1] and (self.name, p) not in _TOLD_TRUNCATED:
                if len(_TOLD_TRUNCATED) < 10_000:  # bounded: a long evaluation does not grow it without end
                    _TOLD_TRUNCATED.add((self.name, p))
                log.warning(
                    "prompt %r: truncated to the text tower's context: %d of its %d tokens kept (start and end "
                    "tokens included; the end token is kept)", p[:60] + ("..." if len(p) > 60 else ""), *counts,
                )  # fmt: skip
        return self.tokenizer(prompts).to(self.device)

    def token_counts(self, prompt: str) -> tuple[int, int] | None:
        """(tokens kept, tokens of the prompt), start and end tokens included: kept < total when the text tower's
        context (``model.context_length``) cuts the prompt. None for tokenizers that cannot count (no ``encode``)."""
        if not hasattr(self.tokenizer, "encode"):
            return None
        total = len(self.tokenizer.encode(prompt)) + 2
        return min(total, int(self.model.context_length)), total

    @cached_property
    def fingerprint(self) -> str:
        """:func:`weights_fingerprint` of the loaded weights (computed once; the model is frozen)."""
        return weights_fingerprint(self.model)


class _QuietOpenClip(logging.Filter):
    """open_clip logs on the root logger: a dozen INFO lines per model build (parsing identifiers, configs, the
    tokenizer), which Hydra's INFO root level prints into every run log, and — with ``weights_loaded`` — the warning
    "No pretrained weights loaded … initialized randomly", which is false when we then load a weight file. Drop
    those; every warning or error of open_clip's still passes. :func:`load_clip` logs what was loaded instead."""

    def __init__(self, weights_loaded: bool) -> None:
        super().__init__()
        self.weights_loaded = weights_loaded

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}open_clip{os.sep}" not in record.pathname:
            return True
        if os.environ.get("MMEL_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on"):
            return True  # verbose=true / MMEL_VERBOSE=1 (mmel.utils.logs): everything open_clip says
        if self.weights_loaded and "initialized randomly" in record.getMessage():
            return False
        return record.levelno >= logging.WARNING


@contextlib.contextmanager
def quiet_open_clip(weights_loaded: bool) -> Iterator[None]:
    """Within: open_clip's INFO lines dropped, and its "initialized randomly" warning too when ``weights_loaded``
    (a model built only to be filled with weights, or to read its shapes)."""
    root, f = logging.getLogger(), _QuietOpenClip(weights_loaded)
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, tuple | list) else (v, v)


def _unknown_model_error(name: str) -> ValueError:
    names = open_clip.list_models()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f" Did you mean one of {close}?" if close else ""
    return ValueError(
        f"Unknown CLIP architecture '{name}'.{hint} Known: the project's "
        f"{sorted(p.stem for p in MODEL_CONFIG_DIR.glob('*.json'))} and open_clip's {len(names)} names "
        "(open_clip.list_models())."
    )


def load_clip(
    name: str,
    pretrained: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = "cpu",
    precision: str = "fp32",
) -> ClipBundle:
    """Load a frozen open_clip model.

    Args:
        name: open_clip architecture (``ViT-B-16-quickgelu``), a project config (``mmel-tiny``), or
            ``hf:<hub id or local folder>`` — a Hugging Face model, converted (:func:`load_hf`).
        pretrained: None (random init), an open_clip tag, a project tag, or a path to a weight file.
        cache_dir: where tag downloads / project-built weights are kept (default :func:`default_cache_dir`).
        device: device to put the model on (None: the CPU; the programs' trainer then moves it,
            :mod:`mmel.utils.placement`).
        precision: open_clip precision string (``fp32``, ``bf16``, ``fp16``, ...).
    """
    if str(name).startswith(HF_PREFIX):
        return load_hf(name, pretrained, device=device, precision=precision)
    register_model_configs()
    device = "cpu" if device is None else device
    if name not in open_clip.list_models():
        raise _unknown_model_error(name)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    tag = None if pretrained is None else str(pretrained)
    weight_file: Path | None = None

    if tag is not None and (name, tag) in _LOCAL_WEIGHTS:
        resolver = _LOCAL_WEIGHTS[(name, tag)]
        if isinstance(resolver, str):
            module, func = resolver.split(":")
            resolver = getattr(importlib.import_module(module), func)
        weight_file = Path(resolver(cache))
    elif tag is not None and looks_like_path(tag):
        weight_file = Path(tag).expanduser()
        if not weight_file.is_file():
            read_state_dict(weight_file)  # raises the documented FileNotFoundError
    elif tag is not None:
        base = name.removesuffix("-quickgelu")
        tags = open_clip.list_pretrained_tags_by_model(name) or open_clip.list_pretrained_tags_by_model(base)
        local = sorted(t for (n, t) in _LOCAL_WEIGHTS if n == name)
        if tag not in tags:
            raise ValueError(
                f"Unknown pretrained tag '{tag}' for '{name}'. Known tags: {sorted(tags) + local}; "
                "or pass the path of a local weight file."
            )
        if tag == "openai" and not name.endswith("-quickgelu"):
            raise ValueError(
                f"OpenAI weights need QuickGELU: use '{name}-quickgelu' instead of '{name}' (open_clip's plain "
                "names use GELU and give silently wrong activations with these weights)."
            )

    if weight_file is None and tag is not None:
        try:
            with quiet_open_clip(weights_loaded=False):
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=tag, cache_dir=str(cache), device=device, precision=precision
                )
        except Exception as e:  # noqa: BLE001 — offline downloads fail in many library-specific ways
            raise RuntimeError(
                f"Could not obtain pretrained weights '{tag}' for '{name}' ({type(e).__name__}: {e}). "
                "Offline? Download the weights on a machine with internet and pass the file: "
                f"model.pretrained=/path/to/{name}.safetensors (or .pt/.bin; OpenAI archives work), or copy a "
                "filled Hugging Face cache here and set HF_HUB_OFFLINE=1 (HF_HOME pointing at it). "
                "See data/README.md."
            ) from e
    else:
        # weights from a file: the "initialized randomly" line open_clip prints first would be untrue; without
        # weights it is true but doubles the line logged below, which also names the model's config
        with quiet_open_clip(weights_loaded=True):
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, precision=precision)
        if weight_file is not None:
            _load_file_into(model, weight_file, name)
        model.to(device)
    tokenizer = _tokenizer(name)
    model.requires_grad_(False)
    model.eval()
    mean = tuple(getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    bundle = ClipBundle(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        name=name,
        pretrained=None if tag is None else tag,
        mean=mean,
        std=std,
    )
    if tag is None:
        log.info("CLIP %s: random weights (pretrained=None: initialized randomly, nothing learned)", name)
    else:
        if weight_file is not None:  # the file's own hash too: the fingerprint covers only a few tensors
            source = f"file {weight_file} (sha256 {file_sha256(weight_file)[:12]}, fingerprint {bundle.fingerprint})"
        else:
            source = f"open_clip tag '{tag}' (fingerprint {bundle.fingerprint})"
        log.info("CLIP %s: loaded weights from %s", name, source)
    return bundle


def load_hf(
    name: str, pretrained: str | os.PathLike | None = None, *, device: str | torch.device = "cpu", precision="fp32"
) -> ClipBundle:
    """``hf:<hub id or local folder>``: a Hugging Face model read by the loader registered for its ``model_type``
    (``clip``: :mod:`mmel.hf_clip`, converted into open_clip's native CLIP). The weights come with the model:
    ``pretrained`` must be None. ``HF_HUB_OFFLINE=1`` loads from the Hugging Face cache (``HF_HOME``) only."""
    source = name[len(HF_PREFIX) :].strip()
    if not source:
        raise ValueError(
            f"model name {name!r}: expected hf:<hub id or local folder>, e.g. hf:openai/clip-vit-base-patch16"
        )
    if pretrained is not None:
        raise ValueError(
            f"{name}: a Hugging Face model carries its weights; leave pretrained null (got {pretrained!r})"
        )
    folder = Path(source).expanduser()
    # a hub id is "org/name"; a folder starts with / . ~ or has more parts (or exists)
    is_path = source.startswith(("/", ".", "~")) or source.count("/") > 1 or folder.is_dir()
    if is_path and not folder.is_dir():
        raise FileNotFoundError(f"{name}: no such folder {folder} (expected a save_pretrained folder or a hub id)")
    try:
        from transformers import AutoConfig

        from mmel.hf_clip import is_offline

        where = str(folder) if folder.is_dir() else source
        model_type = AutoConfig.from_pretrained(where, local_files_only=is_offline() or folder.is_dir()).model_type
    except Exception as e:  # noqa: BLE001 — offline / missing files fail in many library-specific ways
        raise RuntimeError(
            f"Could not obtain the Hugging Face model '{source}' ({type(e).__name__}: {_first_line(e)}). "
            "Offline? Save it on a machine with internet (CLIPModel/CLIPProcessor.save_pretrained(folder)) and pass "
            "model.name=hf:/path/to/folder, or copy a filled Hugging Face cache here and set HF_HUB_OFFLINE=1 "
            "(HF_HOME pointing at it). See data/README.md."
        ) from e
    if model_type not in HF_LOADERS:
        raise ValueError(
            f"{name}: a Hugging Face '{model_type}' model; mmel reads model types {sorted(HF_LOADERS)} "
            "(docs/model_families.md)."
        )
    module, func = HF_LOADERS[model_type].split(":")
    model, preprocess, tokenizer, mean, std = getattr(importlib.import_module(module), func)(
        source if not folder.is_dir() else str(folder), device=device, precision=precision
    )
    model.requires_grad_(False)
    model.eval()
    bundle = ClipBundle(
        model=model, preprocess=preprocess, tokenizer=tokenizer, name=name, pretrained=None, mean=mean, std=std
    )
    log.info("CLIP %s: Hugging Face %s model converted (fingerprint %s)", name, model_type, bundle.fingerprint)
    return bundle


def _tokenizer(name: str):
    """open_clip's tokenizer of ``name``; one that lives on the Hugging Face hub (SigLIP, PE, ...: ``hf-hub:...``)
    and is not in the local cache is a clear error saying how to provide it, not a bare OSError."""
    with quiet_open_clip(weights_loaded=False):
        try:
            return open_clip.get_tokenizer(name)
        except OSError as e:
            hub = (open_clip.get_model_config(name) or {}).get("text_cfg", {}).get("hf_tokenizer_name")
            raise OSError(
                f"{name}: its tokenizer ({hub or 'a Hugging Face tokenizer'}) is read from the Hugging Face hub and is "
                "not in the local cache (HF_HOME), and the hub cannot be reached. Run the same load once on a machine "
                "with network and copy its HF_HOME here (then HF_HUB_OFFLINE=1), or load the model as a Hugging Face "
                "folder with its tokenizer saved: model.name=hf:/path/to/folder (docs/model_families.md)."
            ) from e


def check_vit(model: nn.Module, name: str | None = None) -> nn.Module:
    """Return ``model.visual`` if it is the ViT the explainers' recomputation is written for, else a clear error.

    Recognised by what the tower holds (:func:`mmel.families.vit_problem`), not by class: ``conv1``,
    ``class_embedding``, ``positional_embedding``, ``ln_pre``, ``ln_post``, ``proj`` and blocks with ``ln_1``, a
    packed ``attn.in_proj_weight``, ``attn.out_proj``, ``ls_1``, ``ln_2``, ``mlp``, ``ls_2``; pooled at the CLS token.
    ``name``: the model's name, for the message.
    """
    visual = getattr(model, "visual", None)
    what = f"model {name!r}" if name else f"this {type(model).__name__}"
    problem = vit_problem(visual)
    if problem:
        raise TypeError(
            f"{what} is not a ViT CLIP whose blocks mmel can recompute: {problem}. ViT-only explainers need "
            "open_clip's native ViT layout (or an hf: CLIP, converted to it); for CNN towers (RN50, ConvNeXt) use "
            "gradcam, m2ib or rise (docs/model_families.md)."
        )
    pool = attn_pool_problem(visual)
    if pool:
        raise TypeError(
            f"{what}: {pool}, so the CLS token's attention does not make the embedding; ViT-only explainers "
            "refuse it. rise works on any image tower (docs/model_families.md)."
        )
    return visual
