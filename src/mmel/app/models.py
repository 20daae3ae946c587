"""The explorer's models: the backbones it offers (one per ``conf/model`` file), whether their weights are here, and
the backbones, explainers and HSRM checkpoints built once and shared by every request (:class:`ModelCache`)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmel.app.inputs import InputError
from mmel.backbone import HF_PREFIX, is_project_tag, looks_like_path
from mmel.locations import config_dir, work_root

CHECKPOINT_SEP = " @ "  # an explainer choice "mmel @ logs/.../hsrm.pt" carries its checkpoint path
DEFAULT_BACKBONE = "tiny"


# -------------------------------------------------------------------------------------- backbones and caches


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone config (``conf/model/<key>.yaml``): ``load_clip`` arguments."""

    key: str
    name: str
    pretrained: str | None
    cache_dir: str | None = None
    device: str = "cpu"
    precision: str = "fp32"

    @property
    def label(self) -> str:
        return f"{self.key} ({self.name}, {self.pretrained or 'random init'})"


def repo_root() -> Path:
    """Where the app keeps ``data/shapes`` and ``.cache/``: ``$MMEL_ROOT``, else the current directory (never the
    installed package: see :mod:`mmel.locations`)."""
    return work_root()


def backbone_specs(conf_dir: str | os.PathLike | None = None) -> dict[str, BackboneSpec]:
    """Every ``conf/model/*.yaml`` as a spec, the tiny default first; ``paths.cache_dir`` resolved like the programs.

    ``conf_dir``: a config folder; default the one mmel ships (the checkout's ``conf/`` or ``mmel.conf``).
    """
    from omegaconf import OmegaConf

    conf = Path(conf_dir) if conf_dir else config_dir()
    files = sorted((conf / "model").glob("*.yaml"))
    cache = os.environ.get("MMEL_CACHE_DIR") or str(repo_root() / ".cache")
    specs = {}
    for f in files:
        cfg = OmegaConf.load(f)
        # the model files interpolate ${paths.cache_dir}; give them that one value instead of composing Hydra
        root = OmegaConf.create({"paths": {"cache_dir": cache}, "model": cfg})
        m = OmegaConf.to_container(root.model, resolve=True)
        specs[f.stem] = BackboneSpec(
            key=f.stem,
            name=m["name"],
            pretrained=None if m.get("pretrained") is None else str(m["pretrained"]),
            cache_dir=m.get("cache_dir"),
            device=m.get("device", "cpu"),
            precision=m.get("precision", "fp32"),
        )
    if DEFAULT_BACKBONE not in specs:
        specs[DEFAULT_BACKBONE] = BackboneSpec(DEFAULT_BACKBONE, "mmel-tiny", "shapes", f"{cache}/weights")
    return {DEFAULT_BACKBONE: specs.pop(DEFAULT_BACKBONE), **specs}


def missing_weights(spec: BackboneSpec, weights: str | None = None) -> str | None:
    """Why ``spec`` cannot be loaded offline (a message), or None when its weights are on this machine.

    Checked before loading because open_clip's download of a missing tag retries for about a minute offline.
    ``weights``: a local file replacing the config's ``pretrained``.
    """
    if spec.name.startswith(HF_PREFIX):
        return _hf_missing(spec, weights)
    tag = weights or spec.pretrained
    if tag is None or is_project_tag(spec.name, tag):
        return None  # random init, or a project tag whose resolver finds (or builds) the file
    if weights or looks_like_path(tag):
        return None if Path(tag).expanduser().is_file() else f"Backbone {spec.key}: weight file not found: {tag}"
    if _tag_cached(spec.name, tag, spec.cache_dir):
        return None
    return (
        f"Backbone {spec.key}: the weights '{tag}' of {spec.name} are not on this machine. Give the path of a local "
        "weight file (.safetensors/.pt/.bin) in 'weights file', or fill the cache (see data/README.md)."
    )


def hf_source(spec: BackboneSpec, weights: str | None = None) -> str:
    """The ``hf:`` name to load for a Hugging Face backbone: a folder typed in 'weights file' replaces the
    config's hub id / folder (its weights come with the model)."""
    return f"{HF_PREFIX}{weights}" if weights else spec.name


def _hf_missing(spec: BackboneSpec, weights: str | None) -> str | None:
    """Why a Hugging Face backbone cannot be loaded offline, or None (a local folder, or a hub id whose config is
    in the Hugging Face cache)."""
    source = hf_source(spec, weights)[len(HF_PREFIX) :]
    folder = Path(source).expanduser()
    if folder.is_dir():
        return None
    if weights or source.startswith(("/", ".", "~")) or source.count("/") > 1:
        return f"Backbone {spec.key}: no such Hugging Face model folder: {source}"
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "config.json"), str):
        return None
    return (
        f"Backbone {spec.key}: the Hugging Face model '{source}' is not in this machine's Hugging Face cache. Give "
        "the path of a save_pretrained folder in 'weights file', or fill the cache (see data/README.md)."
    )


def _tag_cached(name: str, tag: str, cache_dir: str | None) -> bool:
    """Whether open_clip would find the weights of (name, tag) without the network (HF cache or URL download)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag) or open_clip.get_pretrained_cfg(name.removesuffix("-quickgelu"), tag)
    if not cfg:
        return False
    if cfg.get("file"):
        return Path(cfg["file"]).is_file()
    dirs = [cache_dir, None]  # the configured cache, then the default Hugging Face cache
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, fname = os.path.split(cfg["hf_hub"])  # open_clip's own split: 'org/model/' -> no file name
        names = [fname] if fname else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for d in dirs:
            for n in names:
                if isinstance(try_to_load_from_cache(repo, n, cache_dir=d), str):
                    return True
    if cfg.get("url"):
        base = os.path.basename(cfg["url"])
        return any(Path(d, base).is_file() for d in dirs if d)
    return False


class ModelCache:
    """Backbones and explainers built once and shared by every request (thread-safe).

    Each cache key has its own lock, so two requests for a model that is still loading load it once, while
    loading one model never waits for another. :meth:`compute_lock` serialises the explanations of one backbone
    (its explainers share its modules); explanations of different backbones run in parallel.
    """

    def __init__(self, specs: dict[str, BackboneSpec] | None = None, policy: Any = None) -> None:
        self.specs = specs if specs is not None else backbone_specs()
        self.policy = policy  # a mmel.app.paths.PathPolicy: which typed paths may be opened (None: any)
        self._objects: dict[tuple, Any] = {}
        self._locks: dict[tuple, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, key: tuple) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def _once(self, key: tuple, build: Callable[[], Any]) -> Any:
        with self._lock(key):
            if key not in self._objects:
                self._objects[key] = build()  # a failed build raises and is not cached: the next request retries
            return self._objects[key]

    def loaded(self) -> list[tuple]:
        """Keys of what is built (for tests and the page's status line)."""
        with self._guard:
            return list(self._objects)

    def clip(self, backbone: str, weights: str | None = None):
        """The :class:`~mmel.backbone.ClipBundle` of config ``backbone`` (optionally with a local weight file)."""
        if backbone not in self.specs:
            raise InputError(f"Backbone: unknown config '{backbone}'; choose one of {sorted(self.specs)}.")
        spec = self.specs[backbone]
        weights = (weights or "").strip() or None
        if self.policy is not None:  # served beyond localhost: only the start-up weights folder
            weights = self.policy.weights(weights)
        why = missing_weights(spec, weights)
        if why:
            raise InputError(why)

        def build():
            from mmel.backbone import load_clip

            try:
                if spec.name.startswith(HF_PREFIX):  # the model brings its weights (a folder replaces it)
                    return load_clip(hf_source(spec, weights), None, device=spec.device, precision=spec.precision)
                return load_clip(
                    spec.name,
                    weights or spec.pretrained,
                    cache_dir=spec.cache_dir,
                    device=spec.device,
                    precision=spec.precision,
                )
            except (FileNotFoundError, ValueError, RuntimeError) as e:
                raise InputError(f"Backbone {spec.key}: {e}") from e

        return self._once(("clip", backbone, weights), build)

    def explainer(self, backbone: str, choice: str, weights: str | None = None):
        """The explainer of ``choice`` (a registered name, or ``"mmel @ <hsrm.pt>"``) on that backbone."""
        from mmel.explainers import available, build_explainer

        name, checkpoint = parse_explainer_choice(choice)
        if name not in available():
            raise InputError(f"Explainer: unknown '{name}'; available: {available()}.")
        if self.policy is not None:  # served beyond localhost: only the checkpoints offered at start-up
            checkpoint = self.policy.checkpoint(checkpoint)
        clip = self.clip(backbone, weights)
        weights = (weights or "").strip() or None

        def build():
            if checkpoint is None:
                try:
                    return build_explainer(name, clip)
                except TypeError as e:  # a method that does not run on this model family: the message says which do
                    raise InputError(f"Explainer: {e}") from e
            try:
                return build_explainer(name, clip, checkpoint=checkpoint)
            except (FileNotFoundError, ValueError) as e:  # unknown path, unreadable file, other backbone
                raise InputError(f"Checkpoint: {e}") from e

        return self._once(("explainer", backbone, weights, name, checkpoint), build)

    def compute_lock(self, backbone: str, weights: str | None = None) -> threading.Lock:
        """The lock that one backbone's explanations hold while computing."""
        return self._lock(("compute", backbone, (weights or "").strip() or None))


def find_checkpoints(root: str | os.PathLike = "logs", limit: int = 50) -> list[Path]:
    """The ``hsrm.pt`` files under ``root`` (train.py's run dirs), newest first, at most ``limit``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return []
    found = [p for p in root.rglob("hsrm.pt") if p.is_file()]
    found.sort(key=lambda p: (-p.stat().st_mtime, str(p)))
    return found[:limit]


def parse_explainer_choice(choice: str) -> tuple[str, str | None]:
    """``"grad_eclip"`` -> ("grad_eclip", None); ``"mmel @ path/hsrm.pt"`` -> ("mmel", "path/hsrm.pt")."""
    name, sep, path = choice.partition(CHECKPOINT_SEP)
    return name.strip(), (path.strip() or None) if sep else None


def explainer_choices(checkpoints: Sequence[str | os.PathLike] = ()) -> list[str]:
    """Every registered explainer (asked at call time: later registrations appear) and one entry per checkpoint."""
    from mmel.explainers import available

    return [*available(), *(f"mmel{CHECKPOINT_SEP}{p}" for p in checkpoints)]
