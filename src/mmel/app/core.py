"""The explorer's logic without any UI: inputs checked into messages, cached models, explanations, renderings.

Everything here takes PIL images / prompt text and returns plain results, so it is unit-tested without a browser;
:mod:`mmel.app.ui` only wires these functions to Gradio components. The computing is the library's:
:func:`mmel.explain.explain_maps` (preprocess, maps, CLIP's scores, text side), :func:`mmel.explain.overlay`,
:func:`mmel.backbone.load_clip`, :func:`mmel.explainers.build_explainer` and the functional metrics.

Every user mistake raises :class:`InputError` with a sentence meant for the page; the UI shows it instead of
results, so a bad request never takes the server down.
"""

from __future__ import annotations

import io
import json
import math
import os
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from mmel.backbone import is_project_tag, looks_like_path
from mmel.data.base import as_displayed
from mmel.explain import _slug, explain_maps, load_image, overlay
from mmel.locations import config_dir, work_root

MAX_SIDE = 1024  # larger uploads are downscaled (with a note): maps are computed at the model's size anyway
DISPLAY_MIN_SIDE = 256  # small images (the shapes world is 64 px) are enlarged for display, pixels kept sharp
MAX_PROMPTS = 16
CHECKPOINT_SEP = " @ "  # an explainer choice "mmel @ logs/.../hsrm.pt" carries its checkpoint path
DEFAULT_BACKBONE = "tiny"


class InputError(ValueError):
    """A problem with what the user asked for; its message is shown in the page."""


# ---------------------------------------------------------------------------------------------------- inputs


def parse_prompts(text: str | None) -> list[str]:
    """Prompt text, one per line -> list of K non-empty, stripped prompts (1 ≤ K ≤ MAX_PROMPTS)."""
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise InputError("Prompts: enter at least one prompt, one per line.")
    if len(prompts) > MAX_PROMPTS:
        raise InputError(f"Prompts: {len(prompts)} given; at most {MAX_PROMPTS} per request.")
    return prompts


def read_upload(path: str | os.PathLike | None) -> Image.Image:
    """An uploaded file -> 8-bit RGB PIL image (the library's loader), or InputError naming the file."""
    if path is None or str(path) == "":
        raise InputError("Image: none given; upload an image or load a sample from the shapes world.")
    name = Path(path).name
    try:
        return load_image(path)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"Image: '{name}' is not a readable image ({e}).") from e
    except Image.DecompressionBombError as e:  # Pillow refuses images of more than ~179 Mpx outright
        raise InputError(f"Image: '{name}' is too large to decode safely ({e}).") from e


def fit_image(img: Image.Image, max_side: int = MAX_SIDE) -> tuple[Image.Image, str | None]:
    """RGB image -> (image whose longer side is at most ``max_side``, a note when it had to be downscaled)."""
    img = as_displayed(img)
    w, h = img.size
    if max(w, h) <= max_side:
        return img, None
    s = max_side / max(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    note = f"The image ({w}×{h}) was downscaled to {size[0]}×{size[1]} (longest side at most {max_side} px)."
    return img.resize(size, Image.Resampling.LANCZOS), note


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
                return build_explainer(name, clip)
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


# ------------------------------------------------------------------------------------------------ explaining


@dataclass
class Explanation:
    """One explainer's result for one image: maps [K, H, W] in [0, 1] at the image's size, CLIP's cosine per
    prompt, the text side (per prompt [(token, weight)]) when the explainer has one, and the compute time."""

    explainer: str
    prompts: list[str]
    maps: np.ndarray
    scores: list[float]
    tokens: list[list[tuple[str, float]]] | None
    seconds: float
    resize: str


def explain(
    cache: ModelCache, backbone: str, choice: str, img: Image.Image, prompts: list[str], weights: str | None = None
) -> Explanation:
    """Explain ``img`` (RGB) for ``prompts`` with explainer ``choice`` on ``backbone`` (models from ``cache``)."""
    explainer = cache.explainer(backbone, choice, weights)
    clip = cache.clip(backbone, weights)
    with cache.compute_lock(backbone, weights):
        t = time.perf_counter()
        res = explain_maps(img, prompts, clip, explainer)
        seconds = time.perf_counter() - t
    tokens = None
    if res["tokens"] is not None:
        tokens = [list(zip(t, w, strict=True)) for t, w in zip(res["tokens"], res["token_weights"], strict=True)]
    maps = res["maps"].detach().float().cpu().numpy()
    return Explanation(choice, list(prompts), maps, [float(s) for s in res["scores"]], tokens, seconds, res["resize"])


# ------------------------------------------------------------------------------------------------- rendering


def display_factor(size: tuple[int, int], min_side: int = DISPLAY_MIN_SIDE) -> int:
    """The integer factor that brings the shorter side of a (W, H) image to at least ``min_side`` (1 if it is)."""
    return max(1, math.ceil(min_side / max(1, min(size))))


def enlarge(img: Image.Image, min_side: int = DISPLAY_MIN_SIDE) -> Image.Image:
    """``img`` enlarged by :func:`display_factor` with nearest neighbour (pixels stay sharp; display only)."""
    f = display_factor(img.size, min_side)
    return img if f == 1 else img.resize((img.width * f, img.height * f), Image.Resampling.NEAREST)


def peak(heat: np.ndarray) -> tuple[int, int]:
    """(x, y) pixel of the first maximum of a [H, W] map (raster order, like ``torch.argmax``)."""
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return int(x), int(y)


def render(
    img: Image.Image,
    heat: np.ndarray,
    alpha: float = 0.5,
    boxes: np.ndarray | None = None,
    min_side: int = DISPLAY_MIN_SIDE,
) -> Image.Image:
    """The overlay of a [H, W] map over ``img`` (the library's :func:`~mmel.explain.overlay`), enlarged to at least
    ``min_side`` (nearest neighbour), with the peak marked (white ring, black cross) and ``boxes`` [M, 4] xyxy in
    image pixels drawn in green."""
    ov = overlay(img, torch.from_numpy(np.asarray(heat, dtype=np.float32)), float(alpha))
    f = display_factor(ov.size, min_side)
    ov = enlarge(ov, min_side)
    draw = ImageDraw.Draw(ov)
    lw = max(2, min(ov.size) // 128)
    for b in [] if boxes is None else np.asarray(boxes, dtype=np.float32).reshape(-1, 4):
        draw.rectangle([b[0] * f, b[1] * f, b[2] * f - 1, b[3] * f - 1], outline=(0, 255, 0), width=lw)
    x, y = peak(heat)
    cx, cy, r = (x + 0.5) * f, (y + 0.5) * f, max(5, min(ov.size) // 32)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(255, 255, 255), width=lw)
    draw.line([cx - r, cy, cx + r, cy], fill=(0, 0, 0), width=max(1, lw // 2))
    draw.line([cx, cy - r, cx, cy + r], fill=(0, 0, 0), width=max(1, lw // 2))
    return ov


def item_metrics(heat: np.ndarray, boxes: np.ndarray, tolerance: float, ties: str = "all") -> dict[str, float]:
    """Per-item localisation of one [H, W] map against its boxes [M, 4] (xyxy, image pixels), by the library's
    functional metrics: pointing-game hit (0/1), energy pointing game (mass in the boxes) and IoU (mean rule)."""
    from mmel.metrics import energy_pointing_game, pointing_game, saliency_iou

    maps = torch.from_numpy(np.asarray(heat, dtype=np.float32))[None]  # [1, H, W]
    b = [torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)]
    return {
        "pointing": float(pointing_game(maps, b, tolerance=tolerance, ties=ties)["accuracy"]),
        "energy": float(energy_pointing_game(maps, b)),
        "iou": float(saliency_iou(maps, b)["miou"]),
    }


def pointing_tolerance(conf_dir: str | os.PathLike | None = None, default: float = 15.0) -> float:
    """The shapes world's pointing tolerance in pixels (``conf/metrics/shapes.yaml``), else ``default``."""
    from omegaconf import OmegaConf

    f = Path(conf_dir or config_dir()) / "metrics" / "shapes.yaml"
    if f.is_file():
        v = OmegaConf.select(OmegaConf.load(f), "pointing_game.tolerance")
        if v is not None:
            return float(v)
    return default


# --------------------------------------------------------------------------------------------------- samples


@dataclass
class Sample:
    """An image from a dataset split with its ground truth: prompt -> boxes [M, 4] xyxy (image pixels)."""

    image: Image.Image
    label: str
    boxes: dict[str, np.ndarray] = field(default_factory=dict)


class ShapesSamples:
    """Images of the shapes world (COCO format) under ``root``, generated there on first use when absent.

    Generation only happens into a root holding no world at all: an existing world of other parameters is read
    as it is and never regenerated (regenerating would delete its files).
    """

    def __init__(self, root: str | os.PathLike, seed: int = 0, **generate_kwargs: Any) -> None:
        self.root = Path(root).expanduser()
        self.seed = seed
        self.generate_kwargs = generate_kwargs  # e.g. n_train=0 for a small world in tests
        self._datasets: dict[str, Any] = {}
        self._lock = threading.RLock()  # one generation at a time; dataset() holds it around ensure()

    def ensure(self) -> str | None:
        """Make sure the world is there; returns a note when it was generated now."""
        with self._lock:
            if (self.root / "coco" / "annotations").is_dir():
                return None
            if any((self.root / n).exists() for n in ("coco", "flickr30k", "MANIFEST.json")):
                raise InputError(f"Samples: {self.root} holds an incomplete shapes world (no coco/annotations).")
            from mmel.data.shapes import generate

            t = time.perf_counter()
            generate(self.root, seed=self.seed, **self.generate_kwargs)
        return f"Generated the shapes world (seed {self.seed}) under {self.root} in {time.perf_counter() - t:.0f} s."

    def dataset(self, split: str):
        """The COCO-format dataset of ``split`` (train / val / test), indexed once."""
        from mmel.data import CocoBoxes, DatasetError

        with self._lock:
            self.ensure()
            if split not in self._datasets:
                try:
                    self._datasets[split] = CocoBoxes(self.root / "coco", split)
                except (DatasetError, FileNotFoundError, ValueError) as e:
                    raise InputError(f"Samples: cannot read split '{split}' of {self.root / 'coco'} ({e}).") from e
            return self._datasets[split]

    def count(self, split: str) -> int:
        """Number of images in ``split``."""
        return len(self.dataset(split).groups_by_image())

    def sample(self, split: str, index: int) -> Sample:
        """Image ``index`` of ``split`` with one prompt per category present and its boxes."""
        ds = self.dataset(split)
        groups = ds.groups_by_image()
        if not 0 <= int(index) < len(groups):
            raise InputError(f"Samples: index {index} out of range; split '{split}' has {len(groups)} images.")
        idx = groups[int(index)]
        first = ds[idx[0]]
        if first is None:
            raise InputError(f"Samples: the image of item {idx[0]} in '{split}' cannot be read.")
        boxes = {ds.records[i].prompt: ds.records[i].boxes.copy() for i in idx}
        return Sample(first["image"], f"{split} #{index} ({Path(first['file']).name})", boxes)


# ------------------------------------------------------------------------------------------------- downloads


def overlays_zip(
    img: Image.Image,
    results: Sequence[Explanation],
    alpha: float,
    out: str | os.PathLike,
    boxes: dict[str, np.ndarray] | None = None,
    metrics: dict | None = None,
) -> Path:
    """Write every overlay (one PNG per explainer and prompt, at the current opacity) and a ``results.json``
    (scores, token weights, per-item metrics) into the zip file ``out``; returns its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = []
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for r in results:
            slug = _slug(r.explainer)
            for k, p in enumerate(r.prompts):
                buf = io.BytesIO()
                bx = None if boxes is None else boxes.get(p)
                render(img, r.maps[k], alpha, bx).save(buf, format="PNG")
                name = f"{slug}/{k}_{_slug(p)}.png"
                z.writestr(name, buf.getvalue())
                entry = {"explainer": r.explainer, "prompt": p, "score": r.scores[k], "file": name}
                if r.tokens is not None:
                    entry["token_weights"] = [[t, w] for t, w in r.tokens[k]]
                if metrics and (r.explainer, p) in metrics:
                    entry["metrics"] = metrics[(r.explainer, p)]
                summary.append(entry)
        z.writestr("results.json", json.dumps({"opacity": alpha, "results": summary}, indent=2))
    return out
