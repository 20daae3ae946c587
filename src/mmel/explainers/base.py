"""The explainer contract and the pieces every explainer shares.

``Explainer.__call__(images [B, 3, H, W], prompts list[str] of K) -> maps [B, K, H, W]`` in [0, 1]
(docs/contracts.md); ``Explainer.explain_batch(images [B, 3, H, W], prompts: B lists of K_b strings) -> B maps
[K_b, H, W]`` explains every image for its own prompts (an evaluation batch of COCO images naming different
categories). A subclass overrides one method, :meth:`Explainer.raw_maps`, returning unnormalised maps on the
patch grid (or any grid); the base validates inputs, min-max normalises each map (a constant map becomes zeros,
never NaN) and resizes bilinearly to the image size. Everything stays in torch.

Scores are the unscaled cosine S = cos(f_image, f_text) (docs/grad_eclip.md). The gradients of the K scores of a batch
are one batched vector-Jacobian product (:func:`batched_vjp`, docs/grad_eclip.md, Batching), never K backward passes.
An explainer whose maps come from per-image text scores implements :meth:`Explainer.raw_maps_text`; then
``explain_batch`` costs one forward of B images and one VJP with K_max = max_b K_b cotangent rows (row k selects
image b's k-th prompt; padding rows select a zero score). Any other explainer gets a per-image loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmel.backbone import check_vit
from mmel.explainers.memory import budget_bytes, chunk_size
from mmel.explainers.vit import check_images, encode_text
from mmel.families import ANY_FAMILY, MODIFIED_RESNET, VIT_FAMILIES, classify, family
from mmel.utils.maps import minmax


def to_image_maps(raw: Tensor, size: Sequence[int]) -> Tensor:
    """raw [B, K, h, w] -> [B, K, H, W]: min-max normalised on its grid, bilinearly resized, clamped to [0, 1]."""
    maps = minmax(raw.float())
    if tuple(maps.shape[-2:]) != tuple(size):
        B, K = maps.shape[:2]
        maps = F.interpolate(maps.flatten(0, 1)[:, None], size=tuple(size), mode="bilinear", align_corners=False)
        maps = maps.view(B, K, *size)
    return maps.clamp_(0.0, 1.0)


def cosine_scores(image_features: Tensor, text_features: Tensor) -> Tensor:
    """S[b, k] = cos(image_features[b], text_features[k]): [B, E] x [K, E] -> [B, K].

    Per-image prompts: text_features [B, K, E] gives S[b, k] = cos(image_features[b], text_features[b, k]); an
    all-zero text row (padding) scores exactly 0, so its gradient is zero."""
    f = F.normalize(image_features, dim=-1)
    if text_features.dim() == 3:
        return (f[:, None, :] * F.normalize(text_features, dim=-1)).sum(-1)
    return f @ F.normalize(text_features, dim=-1).T


def batched_vjp(scores: Tensor, inputs: Sequence[Tensor]) -> list[Tensor]:
    """Gradients of every column of ``scores`` [B, K] w.r.t. ``inputs``: a list of [K, *input.shape].

    One batched vector-Jacobian product (autograd's ``is_grads_batched``) for all K columns. The B images of a
    batch are independent, so summing over b in one backward gives each image its own gradient.
    """
    B, K = scores.shape
    if K == 1:
        grads = torch.autograd.grad(scores, inputs, grad_outputs=torch.ones_like(scores))
        return [g.unsqueeze(0) for g in grads]
    eye = torch.eye(K, dtype=scores.dtype, device=scores.device)
    cotangents = eye[:, None, :].expand(K, B, K)  # cotangent k selects column k for every image
    return list(torch.autograd.grad(scores, inputs, grad_outputs=cotangents, is_grads_batched=True))


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """A non-empty list of strings, else a clear error."""
    if isinstance(prompts, str):
        raise ValueError(f"prompts: expected a list of strings, got the single string {prompts!r}; wrap it in [...]")
    prompts = list(prompts) if prompts is not None else []
    if not prompts:
        raise ValueError("prompts: the list is empty; give at least one text prompt")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts: every prompt must be a string; got {bad[:3]}")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        # an empty prompt is tokenised to start+end only: a map of "nothing" that looks like a real explanation
        raise ValueError(f"prompts: prompt(s) at position {empty} are empty; every prompt needs some text")
    return prompts


def check_prompt_lists(prompts: Sequence[Sequence[str]], n_images: int) -> list[list[str]]:
    """One non-empty prompt list per image (each checked like :func:`check_prompts`), else a clear error."""
    if isinstance(prompts, str) or prompts is None:
        raise ValueError(f"prompts: expected one list of strings per image, got {prompts!r}")
    lists = list(prompts)
    if len(lists) != n_images:
        raise ValueError(f"prompts: expected one prompt list per image ({n_images}), got {len(lists)} lists")
    out = []
    for b, ps in enumerate(lists):
        try:
            out.append(check_prompts(ps))
        except ValueError as e:
            raise ValueError(f"prompts[{b}] (image {b}): {e}") from None
    return out


def _defining_class(cls: type, attr: str) -> type | None:
    return next((c for c in cls.__mro__ if attr in c.__dict__), None)


def supports(cls: type, family_name: str) -> bool:
    """Whether explainer class ``cls`` declares ``family_name`` (or every family) in its ``families``."""
    return ANY_FAMILY in cls.families or family_name in cls.families


def methods_for(family_name: str) -> list[str]:
    """The registered explainer names that run on ``family_name`` (their own class, or their tower version)."""
    from mmel.explainers import available, capability

    return [n for n in available() if capability(n, family_name) is None]


def refusal(cls: type, family_name: str) -> str | None:
    """Why explainer class ``cls`` refuses models of ``family_name`` (None when it supports them)."""
    if supports(cls, family_name):
        return None
    return f"it reads {cls.reads}; the image tower is {family(family_name).tower}"


def check_family(cls: type, clip) -> str:
    """The family of ``clip`` (:func:`mmel.families.classify`), or a TypeError naming the model, the family, the
    reason and the methods that do work on it."""
    fam = classify(clip)
    why = refusal(cls, fam)
    if why is not None:
        raise TypeError(
            f"explainer {cls.name!r} does not support model {getattr(clip, 'name', '?')!r} (family "
            f"{family(fam).label}): {why}. Methods that work on this family: {methods_for(fam)} "
            "(docs/model_families.md)."
        )
    return fam


def tokenize(clip, prompts: Sequence[str]) -> Tensor:
    """Tokens [K, context_length] on the model's device; a truncated prompt is logged by ``clip.tokenize`` (how many
    tokens were kept of how many; :meth:`mmel.backbone.ClipBundle.token_counts`)."""
    return clip.tokenize(list(prompts))


class Explainer:
    """Base explainer: ``explainer(images [B, 3, H, W], prompts) -> maps [B, K, H, W]`` in [0, 1].

    Subclasses set ``needs_grad`` and implement :meth:`raw_maps`; :func:`mmel.explainers.register` sets ``name``.
    ``set_dependent``: a prompt's map depends on the other prompts explained with it (e.g. CLIP Surgery's feature
    surgery); callers that need one prompt's map then explain it among the same set.
    """

    name = "base"
    needs_grad = False
    set_dependent = False
    #: bytes one explain_batch call may plan for (None: a share of the device's free memory)
    memory_budget: int | None = None
    # the model families (mmel.families) this explainer runs on; ANY_FAMILY: every family with encode_image
    families: frozenset[str] = VIT_FAMILIES
    # what it reads of the image tower: for the refusal on another family (reads) and the capability matrix (needs)
    reads = "the attention blocks and CLS token of a native ViT image tower"
    needs = "native ViT blocks"

    def __init__(self, clip) -> None:
        self.clip = clip
        self.model = clip.model
        self.family = check_family(type(self), clip)
        if self.family in VIT_FAMILIES:
            self.visual = check_vit(clip.model, getattr(clip, "name", None))
            self.patch = self.visual.conv1.kernel_size[0]
            self.depth = len(self.visual.transformer.resblocks)
        else:  # CNN towers and any-family methods: no blocks to count; inputs in multiples of the total stride
            self.visual = clip.model.visual
            self.patch = clip.patch_size
            self.depth = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, model={getattr(self.clip, 'name', '?')!r})"

    def label_options(self) -> dict[str, object]:
        """The options that change which method this is (a variant, a prompt-template set), for :attr:`label`."""
        return {}

    @property
    def label(self) -> str:
        """What this explainer computes, for tables and records: the registered name, then the options that change
        the method, e.g. ``gradcam[variant=grad_eclip_paper]`` or ``clearclip[templates=authors]``."""
        opts = self.label_options()
        return f"{self.name}[{', '.join(f'{k}={v}' for k, v in opts.items())}]" if opts else self.name

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """images [B, 3, H, W] normalised, prompts list of K strings -> maps [B, K, H, W] in [0, 1]."""
        images, prompts = self._prepare(images, prompts, grad=self.needs_grad)
        with torch.enable_grad() if self.needs_grad else torch.no_grad():
            raw = self.raw_maps(images, prompts)
        return to_image_maps(raw.detach(), images.shape[-2:])

    def evidence(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Unnormalised evidence [B, K]: the positive mass of each raw map on its own grid (before the min-max
        normalisation that gives every map a peak). What an explainer says about a prompt's *amount* of support —
        the only place "nothing here" can be read (:class:`mmel.metrics.relational.AbsentEvidence`). Comparable
        within one explainer and model, not across explainers."""
        images, prompts = self._prepare(images, prompts, grad=self.needs_grad)
        with torch.enable_grad() if self.needs_grad else torch.no_grad():
            raw = self.raw_maps(images, prompts)
        return raw.detach().float().clamp(min=0).flatten(2).sum(-1)

    def explain_batch(self, images: Tensor, prompts: Sequence[Sequence[str]]) -> list[Tensor]:
        """images [B, 3, H, W] normalised, prompts[b] a list of K_b strings -> B maps [K_b, H, W] in [0, 1].

        Map b equals ``self(images[b:b + 1], prompts[b])[0]`` (up to float rounding). Explainers with
        :meth:`raw_maps_text` do it in one forward of the B images and one batched VJP of K_max rows; others loop.
        The batch is cut into chunks whose estimated memory fits :attr:`memory_budget` (bytes; None: half the
        device's free memory, :mod:`mmel.explainers.memory`), so a large batch costs more calls, not a crash.
        """
        prompts = check_prompt_lists(prompts, len(images))
        if not self.batches_images():
            return [self(images[b : b + 1], ps)[0] for b, ps in enumerate(prompts)]
        k_max = max(len(ps) for ps in prompts)
        budget = budget_bytes(self.clip.device, self.memory_budget)
        step = chunk_size(self.clip, self, tuple(images.shape[-2:]), k_max, len(images), budget)
        if step < len(images):
            out: list[Tensor] = []
            for lo in range(0, len(images), step):
                out += self._explain_chunk(images[lo : lo + step], prompts[lo : lo + step])
            return out
        return self._explain_chunk(images, prompts)

    def _explain_chunk(self, images: Tensor, prompts: list[list[str]]) -> list[Tensor]:
        """:meth:`explain_batch`'s batched path for one chunk (one forward, one batched VJP)."""
        images, _ = self._prepare(images, [p for ps in prompts for p in ps], grad=self.needs_grad)
        with torch.enable_grad() if self.needs_grad else torch.no_grad():
            text = self.ragged_text_features(prompts)  # [B, K_max, E], zero rows for padding
            raw = self.raw_maps_text(images, text)
        counts = [len(ps) for ps in prompts]
        raw = raw.detach()
        if min(counts) < raw.shape[1]:  # normalise and resize the real rows only, not the padding ones
            raw = torch.cat([raw[b, :k] for b, k in enumerate(counts)])[None]
        maps = to_image_maps(raw, images.shape[-2:]).flatten(0, 1)
        return list(maps.split(counts))

    def batches_images(self) -> bool:
        """Whether :meth:`explain_batch` has the batched path: :meth:`raw_maps_text` is implemented by the same class
        that defines :meth:`raw_maps` (a subclass that overrides only ``raw_maps`` gets the per-image loop)."""
        text_cls = _defining_class(type(self), "raw_maps_text")
        return text_cls is not Explainer and text_cls is _defining_class(type(self), "raw_maps")

    def ragged_text_features(self, prompts: Sequence[Sequence[str]]) -> Tensor:
        """Per-image text embeddings [B, K_max, E] (each distinct prompt encoded once; padding rows are 0)."""
        distinct = list(dict.fromkeys(p for ps in prompts for p in ps))
        feats = self.text_features(distinct)  # [U, E]
        where = {p: i for i, p in enumerate(distinct)}
        k_max = max(len(ps) for ps in prompts)
        idx = torch.zeros(len(prompts), k_max, dtype=torch.long, device=feats.device)
        mask = torch.zeros(len(prompts), k_max, dtype=torch.bool, device=feats.device)
        for b, ps in enumerate(prompts):
            idx[b, : len(ps)] = torch.tensor([where[p] for p in ps], device=feats.device)
            mask[b, : len(ps)] = True
        return feats[idx] * mask[..., None]

    def raw_maps_text(self, images: Tensor, text_features: Tensor) -> Tensor:
        """Unnormalised maps [B, K, h, w] from text embeddings [K, E] (shared) or [B, K, E] (per image, zero rows =
        padding). Optional: implementing it (with ``raw_maps`` defined in the same class) batches
        :meth:`explain_batch`."""
        raise NotImplementedError

    def _prepare(self, images: Tensor, prompts: Sequence[str], grad: bool = True) -> tuple[Tensor, list[str]]:
        """The checks every entry point makes: prompts, image shape/patch multiple, gradients possible (``grad``).
        Returns the images on the model's device and the prompts as a list."""
        prompts = check_prompts(prompts)
        check_images(images, self.patch)
        if self.family == MODIFIED_RESNET and tuple(images.shape[-2:]) != tuple(self.clip.image_size):
            # its attention pool adds a positional embedding of the native grid: no other size exists for it
            raise ValueError(
                f"images: {tuple(images.shape[-2:])} but a ModifiedResNet CLIP takes only its native size "
                f"{tuple(self.clip.image_size)} (its attention pool's positional embedding is fixed): resize=model"
            )
        if grad:
            self.require_grad()
        return images.to(self.clip.device), prompts

    def require_grad(self) -> None:
        """Clear error when gradients are impossible (under ``torch.inference_mode``)."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{self.name} needs gradients but inference mode is on: call it outside torch.inference_mode() "
                "(Lightning: Trainer(inference_mode=False))."
            )

    def raw_maps(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Unnormalised maps [B, K, h, w] (any sign; normalised and resized by the caller)."""
        raise NotImplementedError

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """Unnormalised text embeddings [K, E], all prompts in one pass (no graph)."""
        return encode_text(self.model, tokenize(self.clip, prompts))
