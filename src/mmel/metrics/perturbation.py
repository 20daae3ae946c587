"""Deletion / insertion curves and AUC (RISE, Petsiuk et al., BMVC 2018), batched.

Deletion replaces the most salient pixels of the image with a fill, step by step, and tracks the model's score for
the target (a good map makes it fall fast: lower AUC is better). Insertion starts from the fill and puts the most
salient pixels back (a good map makes it rise fast: higher AUC is better).

Conventions, with their sources:

* Everything happens at the **model input resolution**: ``images`` [N, 3, H, W] are what the model is fed
  (normalised), and maps [N, h, w] are resized to (H, W) bilinearly. (Grad-ECLIP's scripts perturb the original
  image and preprocess each step; at the input resolution the perturbation is exactly what the model sees.)
* **Order**: pixels by decreasing saliency; equal values in raster order (stable sort), so runs are reproducible.
* **Steps**: the fraction of the area perturbed goes ``0, step, 2*step, ...`` up to ``max_fraction`` (the last step
  may be shorter), i.e. ``S = ceil(max_fraction / step)`` steps and ``S + 1`` curve points; at each point
  ``round(fraction * H * W)`` pixels are perturbed. RISE: one row of pixels a step over the whole image
  (``max_fraction=1``); Grad-ECLIP (``imagenet_eval_deletion.py``): 10 points at 5%, 10%, ..., 50%
  (``step=0.05, max_fraction=0.5``), deletion fill uniform noise, insertion canvas black, zero-shot top-1 score.
* **AUC**: trapezoid rule over x = fraction / max_fraction in [0, 1] (RISE's ``auc``), so AUC is in the score's
  range whatever ``max_fraction`` is.
* **Fills** (``fill``: one name for both curves, or ``(deletion_fill, insertion_fill)``; default RISE's pair
  ``("dataset_mean", "blur")``), built in pixel space and normalised with ``pixel_mean`` / ``pixel_std``
  (CLIP's defaults; pass the bundle's ``clip.mean`` / ``clip.std``, or zeros / ones for unnormalised images):

  - ``"zeros"``: black pixels (pixel value 0; Grad-ECLIP's insertion canvas).
  - ``"dataset_mean"``: the normalisation's mean colour, i.e. zeros of the *normalised* tensor (RISE's deletion
    substrate ``torch.zeros_like`` on the preprocessed input).
  - ``"mean"``: the image's own mean colour (per channel).
  - ``"noise"``: uniform noise in [0, 1) per pixel and channel (Grad-ECLIP's deletion), drawn from a CPU generator
    seeded with ``seed``: the same pattern for every image of a size, so results never depend on batching/device.
  - ``"blur"``: the image blurred with a Gaussian (``blur_kernel`` 11, ``blur_sigma`` 5: RISE's insertion canvas),
    replicate padding at the border.
* **Batching**: all perturbed images of all pairs in one update are scored by one batched pass, cut in chunks of
  ``batch_size``. Identical images are scored once: the clean image (deletion at 0 and, with ``max_fraction=1``,
  insertion at 1) and, when both curves use the same fill, the fill-only image.
* **Scorer**: ``scorer(images [M, 3, H, W], targets LongTensor [M]) -> scores [M]`` when ``update`` is given
  ``targets``, else ``scorer(images) -> scores [M]``. It runs under ``torch.no_grad``. :class:`ClipScorer` scores
  a CLIP by cosine with the target prompt, softmax probability over the dataset's prompts, or top-1 correctness.

``compute()`` returns {"deletion_auc", "insertion_auc"} (mean over pairs; NaN for a curve not computed) and
:meth:`DeletionInsertion.curves` the per-pair curves for plots.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from mmel.metrics.protocol import ItemContext, Output

FILLS = ("zeros", "dataset_mean", "mean", "noise", "blur")
MODES = ("deletion", "insertion")
SCORES = ("cosine", "softmax", "top1")
_NAME = "DeletionInsertion"
Scorer = Callable[..., Tensor]
# OpenAI CLIP's input normalisation (equal to open_clip.OPENAI_DATASET_MEAN / _STD; a test pins it). Kept here so
# that importing the metrics does not import open_clip (seconds per DDP worker).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def step_fractions(step: float, max_fraction: float) -> Tensor:
    """Fractions of the area perturbed at each curve point [S + 1]: 0, step, ..., max_fraction."""
    if not 0 < step <= max_fraction <= 1:
        raise ValueError(f"{_NAME}: need 0 < step <= max_fraction <= 1; got step={step}, max_fraction={max_fraction}.")
    s = math.ceil(max_fraction / step - 1e-9)
    return (torch.arange(s + 1, dtype=torch.float64) * step).clamp(max=max_fraction).float()


def _fill_pair(fill: str | Sequence[str]) -> tuple[str, str]:
    pair = (fill, fill) if isinstance(fill, str) else tuple(fill)
    if len(pair) != 2 or any(f not in FILLS for f in pair):
        raise ValueError(f"{_NAME}: `fill` must be one of {FILLS} or a (deletion, insertion) pair; got {fill!r}.")
    return pair  # type: ignore[return-value]


@dataclass(frozen=True)
class PerturbationOptions:
    """How the curves are made (validated once; shared by the functional and the Metric).

    step / max_fraction: fraction of the area perturbed per step / at the last point; fill: one of FILLS or a
    (deletion, insertion) pair; modes: which curves; batch_size: perturbed images per scorer call; seed: noise fill;
    pixel_mean / pixel_std: the images' normalisation (zeros / ones for raw [0, 1] images); blur_*: blur fill.
    """

    step: float = 0.05
    max_fraction: float = 1.0
    fill: str | Sequence[str] = ("dataset_mean", "blur")
    modes: Sequence[str] = MODES
    batch_size: int = 64
    seed: int = 0
    pixel_mean: Sequence[float] = CLIP_MEAN
    pixel_std: Sequence[float] = CLIP_STD
    blur_kernel: int = 11
    blur_sigma: float = 5.0

    def __post_init__(self) -> None:
        step_fractions(self.step, self.max_fraction)  # validates
        modes = tuple(self.modes)
        if not modes or any(m not in MODES for m in modes):
            raise ValueError(f"{_NAME}: `modes` must be a non-empty subset of {MODES}; got {self.modes!r}.")
        if self.batch_size < 1:
            raise ValueError(f"{_NAME}: `batch_size` must be >= 1; got {self.batch_size}.")
        # normalised forms (Hydra passes lists)
        object.__setattr__(self, "fill", _fill_pair(self.fill))
        object.__setattr__(self, "modes", modes)
        object.__setattr__(self, "pixel_mean", tuple(self.pixel_mean))
        object.__setattr__(self, "pixel_std", tuple(self.pixel_std))

    @property
    def fractions(self) -> Tensor:
        return step_fractions(self.step, self.max_fraction)


def gaussian_blur(images: Tensor, kernel: int = 11, sigma: float = 5.0) -> Tensor:
    """Separable Gaussian blur of images [N, C, H, W] (replicate padding)."""
    x = torch.arange(kernel, dtype=images.dtype, device=images.device) - (kernel - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    c = images.shape[1]
    pad = kernel // 2
    out = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    out = F.conv2d(out, g.view(1, 1, 1, -1).expand(c, 1, 1, kernel), groups=c)
    return F.conv2d(out, g.view(1, 1, -1, 1).expand(c, 1, kernel, 1), groups=c)


def make_fill(
    name: str,
    images: Tensor,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    seed: int = 0,
    blur_kernel: int = 11,
    blur_sigma: float = 5.0,
) -> Tensor:
    """The substrate [N, 3, H, W] that replaces removed pixels, in the images' (normalised) space."""
    mean = torch.as_tensor(pixel_mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(pixel_std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    if name == "zeros":
        return ((0 - mean) / std).expand_as(images)
    if name == "dataset_mean":
        return torch.zeros_like(images)
    if name == "mean":
        return images.mean((2, 3), keepdim=True).expand_as(images)
    if name == "noise":
        gen = torch.Generator().manual_seed(seed)
        noise = torch.rand(images.shape[1:], generator=gen).to(images.device, images.dtype)
        return ((noise[None] - mean) / std).expand_as(images)
    if name == "blur":
        return gaussian_blur(images, blur_kernel, blur_sigma)
    raise ValueError(f"{_NAME}: unknown fill {name!r}; expected one of {FILLS}.")


def saliency_ranks(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Rank [N, H, W] of each pixel in decreasing saliency (0 = most salient; ties in raster order)."""
    if tuple(maps.shape[-2:]) != size:
        maps = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    flat = maps.flatten(1)
    order = flat.sort(dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=maps.device).expand_as(order))
    return ranks.view(-1, *size)


def _check_inputs(maps: Tensor, images: Tensor, targets: Tensor | None) -> None:
    if not isinstance(maps, Tensor) or maps.ndim != 3 or not maps.is_floating_point():
        raise ValueError(f"{_NAME}: `maps` must be a float tensor [N, h, w]; got {getattr(maps, 'shape', maps)}.")
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[0] != maps.shape[0]:
        raise ValueError(
            f"{_NAME}: `images` must be [N={maps.shape[0]}, C, H, W] (the model's input); "
            f"got {getattr(images, 'shape', images)}."
        )
    if targets is not None and (targets.shape != (maps.shape[0],) or targets.is_floating_point()):
        raise ValueError(f"{_NAME}: `targets` must be a LongTensor [N={maps.shape[0]}]; got {targets!r}.")


def _deletion_insertion_update(
    maps: Tensor, images: Tensor, scorer: Scorer, targets: Tensor | None, opts: PerturbationOptions
) -> dict[str, Tensor]:
    """Score curves {mode: [N, S + 1]} for maps [N, h, w] on images [N, 3, H, W]."""
    _check_inputs(maps, images, targets)
    modes, batch_size = opts.modes, opts.batch_size
    fills = dict(zip(MODES, opts.fill, strict=True))
    n, _, h, w = images.shape
    area = h * w
    counts = (opts.fractions.double() * area).round().long().tolist()  # pixels perturbed at each point
    ranks = saliency_ranks(maps.detach().to(images.device), (h, w)).view(n, 1, h, w)
    substrate = {
        f: make_fill(f, images, opts.pixel_mean, opts.pixel_std, opts.seed, opts.blur_kernel, opts.blur_sigma)
        for f in {fills[m] for m in modes}
    }

    # Every curve point as a canonical (sample, fill, pixels-of-fill) triple: deletion with k pixels removed shows
    # k fill pixels; insertion with k pixels inserted shows the area-k least salient ones as fill. The clean image
    # (0 fill pixels) and the fill-only image (area) coincide across curves and are scored once.
    keys: dict[tuple[int, str, int, bool], int] = {}
    where: dict[str, list[list[int]]] = {m: [] for m in modes}
    for i in range(n):
        for mode in modes:
            row = []
            for k in counts:
                nfill = k if mode == "deletion" else area - k
                fill_name = fills[mode] if nfill else ""
                row.append(keys.setdefault((i, fill_name, nfill, mode == "insertion" and 0 < nfill < area), len(keys)))
            where[mode].append(row)
    jobs = list(keys)
    scores = torch.empty(len(jobs), device=images.device)
    with torch.no_grad():
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            idx = torch.tensor([j[0] for j in chunk], device=images.device)
            nfill = torch.tensor([j[2] for j in chunk], device=images.device).view(-1, 1, 1, 1)
            inserting = torch.tensor([j[3] for j in chunk], device=images.device).view(-1, 1, 1, 1)
            # deletion: the nfill most salient pixels are fill; insertion: the nfill least salient ones are.
            r = ranks[idx]
            is_fill = torch.where(inserting, r >= area - nfill, r < nfill)  # [c, 1, H, W]
            batch = images[idx]
            # Composed by indexing, one fill at a time: torch.stack over per-image views is ~40x slower on CPU.
            for name, sub in substrate.items():
                rows = torch.tensor([k for k, j in enumerate(chunk) if j[1] == name], device=images.device)
                if rows.numel():
                    batch[rows] = torch.where(is_fill[rows], sub[idx[rows]], batch[rows])
            out = scorer(batch) if targets is None else scorer(batch, targets.to(images.device)[idx])
            if not isinstance(out, Tensor) or out.shape != (len(chunk),):
                raise ValueError(f"{_NAME}: the scorer must return scores [M={len(chunk)}]; got {out!r}.")
            scores[start : start + len(chunk)] = out.to(scores.dtype)
    return {m: scores[torch.tensor(where[m], device=images.device)].view(n, -1) for m in modes}


def auc(curves: Tensor, fractions: Tensor) -> Tensor:
    """Trapezoid AUC [N] of curves [N, S + 1] over x = fractions / fractions[-1] in [0, 1]."""
    x = (fractions / fractions[-1]).to(curves)
    return torch.trapezoid(curves, x, dim=-1)


def deletion_insertion(
    maps: Tensor, images: Tensor, scorer: Scorer, targets: Tensor | None = None, **options: Any
) -> dict[str, Tensor]:
    """Mean deletion / insertion AUC of maps [N, h, w] for images [N, 3, H, W] under ``scorer``.

    ``options``: the fields of :class:`PerturbationOptions` (step, max_fraction, fill, modes, batch_size, seed,
    pixel_mean, pixel_std, blur_kernel, blur_sigma).
    Returns {"deletion_auc", "insertion_auc"} (NaN for a mode not in ``modes``).

    Example (the score is the image's mean, the map ranks the left half first; zero fill, unnormalised images):
        >>> images = torch.ones(1, 3, 4, 4)
        >>> maps = torch.zeros(1, 4, 4)
        >>> maps[0, :, :2] = 1.0
        >>> out = deletion_insertion(maps, images, lambda x: x.mean((1, 2, 3)), step=0.5, fill="zeros",
        ...                          pixel_mean=(0, 0, 0), pixel_std=(1, 1, 1))
        >>> {k: v.item() for k, v in out.items()}
        {'deletion_auc': 0.5, 'insertion_auc': 0.5}
    """
    opts = PerturbationOptions(**options)
    curves = _deletion_insertion_update(maps, images, scorer, targets, opts)
    fractions = opts.fractions
    nan = maps.new_tensor(float("nan"))
    return {f"{m}_auc": auc(curves[m], fractions).mean() if m in curves else nan for m in MODES}


class DeletionInsertion(Metric):
    """Deletion and insertion AUC (RISE) of saliency maps under a scoring model; see the module docstring.

    ``update(maps [N, h, w], images [N, 3, H, W], targets [N] = None, scorer = None)`` — the images the model is
    fed (normalised with ``pixel_mean`` / ``pixel_std``); ``targets`` index the scorer's prompts. The scorer is given
    here or at construction (it is kept out of the module tree, so a CLIP inside it never enters checkpoints).
    ``compute()`` returns {"deletion_auc" (lower is better), "insertion_auc" (higher is better)}.

    ``higher_is_better`` is None because the two keys go opposite ways (torchmetrics' convention for mixed outputs).

    Example:
        >>> metric = DeletionInsertion(lambda x: x.mean((1, 2, 3)), step=0.25, fill="zeros",
        ...                            pixel_mean=(0, 0, 0), pixel_std=(1, 1, 1))
        >>> maps = torch.arange(16.0).view(1, 4, 4)  # bottom-right most salient
        >>> metric.update(maps, torch.ones(1, 3, 4, 4))
        >>> {k: round(v.item(), 3) for k, v in metric.compute().items()}
        {'deletion_auc': 0.5, 'insertion_auc': 0.5}
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, scorer: Scorer | None = None, **kwargs: Any) -> None:
        """``kwargs``: the fields of :class:`PerturbationOptions`; the rest go to ``torchmetrics.Metric``."""
        names = {f.name for f in fields(PerturbationOptions)}
        options = PerturbationOptions(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        super().__init__(**kwargs)
        self.options = options
        self.fractions = options.fractions
        # Not an attribute nn.Module would register: a CLIP scorer must stay out of state_dict / .to() / DDP.
        self.__dict__["scorer"] = scorer
        for m in MODES:
            self.add_state(f"{m}_auc", torch.tensor(0.0), dist_reduce_fx="sum")
            self.add_state(f"{m}_curves", [], dist_reduce_fx="cat")
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")

    needs = frozenset({"maps", "images", "prompts", "scorer"})

    @property
    def outputs(self) -> tuple[Output, ...]:
        return tuple(Output(f"{m}_auc", m == "insertion", field=f"{m}_auc") for m in MODES)

    def item_values(self, ctx: ItemContext) -> list[dict[str, Any]]:
        """Per item {"<mode>_curve": score after each step [S + 1], "<mode>_auc": its area} for each mode; the
        scorer's target is the item's prompt (``ctx.scorer.index``)."""
        if ctx.images is None and ctx.maps is not None and ctx.scorer is not None:  # the old engine's clearer message
            raise ValueError(f"{_NAME}: needs the items' images stacked, and these items' images differ in size "
                             "(keep-size evaluation); score deletion / insertion at a fixed input size")  # fmt: skip
        ctx.require(self.needs, _NAME)
        targets = torch.tensor([ctx.scorer.index(p) for p in ctx.prompts])
        curves = _deletion_insertion_update(ctx.maps, ctx.images, ctx.scorer, targets, self.options)
        out: list[dict[str, Any]] = [{} for _ in range(len(ctx))]
        for mode, c in curves.items():
            for k, (curve, a) in enumerate(zip(c.tolist(), auc(c, self.fractions).tolist(), strict=True)):
                out[k].update({f"{mode}_curve": curve, f"{mode}_auc": a})
        return out

    def update(
        self,
        maps: Tensor | None = None,
        images: Tensor | None = None,
        targets: Tensor | None = None,
        scorer: Scorer | None = None,
        *,
        records: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        """Add N (map, image) pairs scored by ``scorer``, or N per-item ``records`` of :meth:`item_values`."""
        if records is not None:
            n = len(self.fractions)
            curves = {
                m: torch.tensor([r[f"{m}_curve"] for r in records], dtype=torch.float32).reshape(-1, n)
                for m in self.options.modes
            }
        else:
            scorer = self.__dict__["scorer"] if scorer is None else scorer
            if scorer is None:
                raise ValueError(f"{_NAME}: no scorer: pass `scorer=` to the constructor or to update().")
            curves = _deletion_insertion_update(maps, images, scorer, targets, self.options)
        n_items = 0
        for m, c in curves.items():
            n_items = c.shape[0]
            setattr(self, f"{m}_auc", getattr(self, f"{m}_auc") + auc(c, self.fractions).sum())
            getattr(self, f"{m}_curves").append(c)
        self.total += n_items

    def compute(self) -> dict[str, Tensor]:
        modes = self.options.modes
        nan = self.total.new_tensor(float("nan"))
        return {f"{m}_auc": getattr(self, f"{m}_auc") / self.total if m in modes else nan for m in MODES}

    def curves(self) -> dict[str, Tensor]:
        """{"fractions": [S + 1] area fraction perturbed, "<mode>": [N, S + 1] scores per pair} for plots.

        Under DDP the curves of all processes are gathered (in rank order), like ``compute()`` does.
        """
        out = {"fractions": self.fractions}
        with self.sync_context(dist_sync_fn=self.dist_sync_fn):
            for m in self.options.modes:
                state = getattr(self, f"{m}_curves")
                empty = isinstance(state, list) and not state
                out[m] = torch.zeros(0, len(self.fractions)) if empty else dim_zero_cat(state).clone()
        return out


class ClipScorer:
    """Scores images for prompts with a frozen CLIP (:class:`mmel.backbone.ClipBundle`): the one scorer of the
    project (deletion/insertion, the prompt scores that explain.py and evaluate report).

    ``kind``: ``"cosine"`` — cosine of image and target-prompt embeddings (what Grad-ECLIP explains);
    ``"softmax"`` — probability of the target among ``prompts`` (CLIP's zero-shot softmax with its learnt
    temperature ``logit_scale.exp()``); ``"top1"`` — 1 when the target is the zero-shot prediction among ``prompts``
    (ties: the first prompt), else 0 (Grad-ECLIP's deletion/insertion score).

    ``scorer(images [M, 3, H, W], targets LongTensor [M] | int | None) -> scores [M]``; ``targets=None`` uses the
    ``target`` given at construction. :meth:`cosines` gives every prompt's cosine [M, K]; :meth:`index` a prompt's
    position. Prompt embeddings are computed once, here. Any input size works (keep-size evaluation): the
    positional embedding is interpolated like the explainers do.
    """

    def __init__(self, clip: Any, prompts: Sequence[str], kind: str = "cosine", target: int | None = None) -> None:
        if kind not in SCORES:
            raise ValueError(f"ClipScorer: `kind` must be one of {SCORES}; got {kind!r}.")
        if not prompts or (target is not None and not 0 <= target < len(prompts)):
            raise ValueError(f"ClipScorer: need >= 1 prompt and 0 <= target < {len(prompts)}; got target={target}.")
        self.clip, self.kind, self.target = clip, kind, target
        self.prompts = list(prompts)
        self._index: dict[str, int] = {}
        for i, p in enumerate(self.prompts):
            self._index.setdefault(p, i)  # a repeated prompt: its first position
        with torch.no_grad():
            self.text = F.normalize(clip.model.encode_text(clip.tokenize(self.prompts)).float(), dim=-1)  # [K, D]
            self.scale = clip.model.logit_scale.exp().float()

    def index(self, prompt: str) -> int:
        """Position of ``prompt`` among the scorer's prompts (a clear error for one it was not built with)."""
        if prompt not in self._index:
            raise KeyError(f"ClipScorer: prompt {prompt!r} is not among its {len(self.prompts)} prompts")
        return self._index[prompt]

    def cosines(self, images: Tensor) -> Tensor:
        """Unscaled cosine of each image with each prompt: images [M, 3, H, W] -> [M, K]."""
        # imported here, not at the top: it pulls in open_clip (seconds), which the metrics need only with a CLIP
        from mmel.explainers.vit import encode_image

        with torch.no_grad():
            f = F.normalize(encode_image(self.clip.model, images.to(self.text.device)).float(), dim=-1)
            return f @ self.text.T

    def __call__(self, images: Tensor, targets: Tensor | int | None = None) -> Tensor:
        if targets is None:
            if self.target is None:
                raise ValueError("ClipScorer: no target: pass `targets` or build the scorer with `target=`.")
            targets = self.target
        t = torch.as_tensor(targets, device=self.text.device).expand(images.shape[0])
        cos = self.cosines(images)  # [M, K]
        rows = torch.arange(cos.shape[0], device=cos.device)
        if self.kind == "cosine":
            return cos[rows, t]
        if self.kind == "softmax":
            return (self.scale * cos).softmax(-1)[rows, t]
        return (cos.argmax(-1) == t).float()
