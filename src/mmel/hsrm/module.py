"""The HSRM: multi-scale relationship propagation, adaptive layer/scale weighting, cross-modal gating.

Inputs per (image, prompt) pair, all from the frozen CLIP (and therefore cacheable):
    evidence      g^l   [P, L, h, w]   signed Grad-ECLIP evidence of the selected blocks (before ReLU)
    keys          k^l   [P, L, N, C]   patch keys of those blocks (N = h*w, heads concatenated)
    patch_tokens  x     [P, N, W]      last block's output patch tokens (before ln_post)
    text          t     [P, D]         text embedding of the prompt (encode_text output)
The keys are only read through the cosines of their pooled, normalised windows (:func:`key_cosines`), so those
may be given instead of the keys (``cosines``: what the feature cache stores, far smaller than the keys).

1. Multi-scale relationships. For each granularity s (patch windows s x s) the keys are average-pooled to
   regions, R^{l,s} = softmax_b(cos(k_a, k_b) / tau_s), and the evidence is propagated between related regions:
   g^{l,s} = upsample(R^{l,s} pool_s(g^l)). The un-propagated g^l is the term s = 0.
2. Adaptive weighting. G = sum_l alpha_l sum_s beta_s g^{l,s}, with alpha = e_last + d_alpha and
   beta = e_0 + d_beta, d_* zero-initialised. With ``conditioning="prompt"`` the weights are chosen per prompt:
   (alpha_p, beta_p) = (alpha, beta) + C t_p/|t_p| with C [L + 1 + |S|, D] zero-initialised, so which layers and
   which granularities of relation count depends on what the prompt asks (a relation word, a row, a part).
   Why not softmax(theta) as in the paper's wording: a softmax saturated
   on the last layer gives the other layers no gradient, while at the one-hot start of this parametrisation
   dG/d d_alpha_l = g^{l,0} and dG/d d_beta_s = g^{last,s}, so every weight learns from step one.
3. Cross-modal alignment. P_v = Linear(W -> D) after a LayerNorm, both initialised from CLIP's ln_post / proj, and
   P_t = Linear(D -> D) initialised to the identity give a_i = cos(P_v x_i, P_t t); gate A = sigmoid(gamma (a - mean a))
   with gamma = 0 at the start (A = 1/2 everywhere, which min-max normalisation removes).
4. Map. M = minmax(ReLU(G) * A), upsampled bilinearly to the image (the explainers' `to_image_maps`).

At initialisation M equals the single-layer Grad-ECLIP map of the last selected block exactly (a test pins it).
Each layer's evidence is first divided by its own max |g| per pair: a positive per-map constant does not change
min-max-normalised maps, but puts layers of very different gradient magnitude on one scale for the weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmel.explainers.base import to_image_maps
from mmel.explainers.grad_eclip import LayerEvidence
from mmel.explainers.vit import last_layers, resolve_layers


@dataclass(frozen=True)
class HSRMSettings:
    """The HSRM's architecture settings and their defaults, written down once: :class:`HSRM`, its Lightning trainer
    (:class:`mmel.lit_module.HSRMLitModule`), the ``mmel`` explainer and the configs (``conf/hsrm/default.yaml``,
    ``conf/explainer/mmel.yaml``, through the ``${hsrm_default:<key>}`` resolver) all read them here.

    layers: an int n = the last n vision blocks (clamped to the model's depth), or a list of block indices;
    scales: relationship granularities (patch windows; empty = no propagation); tau: initial softmax temperature,
    one for all scales or one per scale (learnt); layer_weights: ``learned`` | ``uniform`` | ``last``; gate: the
    cross-modal alignment gate on / off; conditioning: ``prompt`` (layer / scale weights chosen per prompt from its
    text embedding; the default since it beat one set of weights for every prompt on both shapes worlds, over three
    seeds: docs/hsrm.md) | ``none``.
    """

    layers: int | tuple[int, ...] = 6
    scales: tuple[int, ...] = (1, 2, 4)
    tau: float | tuple[float, ...] = 0.1
    layer_weights: str = "learned"
    gate: bool = True
    conditioning: str = "prompt"


DEFAULTS = HSRMSettings()


def hsrm_default(key: str) -> Any:
    """One default of :data:`DEFAULTS` as a config value (tuples as lists): the ``hsrm_default`` resolver."""
    if key not in HSRMSettings.__dataclass_fields__:
        raise KeyError(f"hsrm_default: no HSRM setting {key!r}; known: {sorted(HSRMSettings.__dataclass_fields__)}")
    v = getattr(DEFAULTS, key)
    return list(v) if isinstance(v, tuple) else v


def hsrm_layers(layers: Sequence[int] | int, depth: int) -> list[int]:
    """Block indices for the HSRM: an int n means the last n blocks, clamped to the model's depth (so the default
    of 6 also fits the 4-block tiny CLIP); a list is checked by the explainers' resolver and must increase."""
    if isinstance(layers, int):
        return last_layers(min(layers, depth) if layers >= 1 else layers, depth)
    out = resolve_layers(layers, depth, "hsrm.layers")
    if out != sorted(out):
        raise ValueError(f"hsrm.layers must be increasing (shallow to deep), got {list(layers)} -> {out}")
    return out


@dataclass
class HSRMInputs:
    """Frozen-CLIP quantities for P (image, prompt) pairs of B images; see the module docstring for shapes.

    Image quantities (keys, patch tokens) are given once per image, pair quantities (evidence, text) once per pair,
    pairs ordered image-major (P = B * K: the K prompts of image 0, then of image 1, ...). So K prompts of one
    image share its relation matrices instead of recomputing them K times.
    """

    evidence: Tensor  # [P, L, h, w]
    keys: Tensor | None  # [B, L, N, C]; None when ``cosines`` are given
    patch_tokens: Tensor  # [B, N, W]
    text: Tensor  # [P, D]
    # per scale s of the HSRM: cos of pooled normalised keys [B, L, R_s, R_s] (key_cosines), or packed [B, L, T]
    # (pack_cosines); replaces the keys
    cosines: tuple[Tensor, ...] | Tensor | None = None

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The tensor names of the keys form, in order (evidence, keys, patch_tokens, text)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "cosines")

    @classmethod
    def from_evidence(cls, ev: LayerEvidence) -> HSRMInputs:
        """The one conversion from Grad-ECLIP's :class:`~mmel.explainers.grad_eclip.LayerEvidence` (detached).

        Shared prompts (``ev.paired`` False): evidence [B, K, L, h, w] -> P = B*K pairs, image-major, the K text
        embeddings repeated per image (or, per-image prompts [B, K, D], taken as they are). Paired (image b with
        prompt b, K = 1): P = B, text [B, D] as it is.
        """
        b, k = ev.evidence.shape[:2]
        if ev.paired:
            text = ev.text_features
        elif ev.text_features.dim() == 3:  # per-image prompts [B, K, D] (zero rows: padding)
            text = ev.text_features.flatten(0, 1)
        else:
            text = ev.text_features[None].expand(b, k, -1).flatten(0, 1)
        return cls(
            evidence=ev.evidence.flatten(0, 1).detach(),
            keys=ev.keys.detach(),
            patch_tokens=ev.patch_tokens.detach(),
            text=text.detach(),
        )

    def rows(self) -> list[dict[str, Tensor]]:
        """One dict per pair (needs one pair per image, P = B: e.g. paired evidence), for a feature cache."""
        if self.evidence.shape[0] != self.keys.shape[0]:
            raise ValueError(f"rows() needs one pair per image, got P={self.evidence.shape[0]}, B={self.keys.shape[0]}")
        return [{f: getattr(self, f)[j] for f in self.fields()} for j in range(self.evidence.shape[0])]

    @classmethod
    def stack(cls, rows: Sequence[Mapping[str, Tensor]]) -> HSRMInputs:
        """Inverse of :meth:`rows`: dicts of per-pair tensors -> inputs of P = B pairs."""
        return cls(**{f: torch.stack([torch.as_tensor(r[f]) for r in rows]) for f in cls.fields()})

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.evidence.shape[-2]), int(self.evidence.shape[-1])

    @property
    def num_images(self) -> int:
        """B, the number of images (keys or cosines are given once per image)."""
        return int(self.patch_tokens.shape[0])

    def to(self, device: torch.device | str) -> HSRMInputs:
        moved = {f: None if getattr(self, f) is None else getattr(self, f).to(device) for f in self.fields()}
        cos = self.cosines
        if cos is not None:
            cos = cos.to(device) if isinstance(cos, Tensor) else tuple(c.to(device) for c in cos)
        return HSRMInputs(**moved, cosines=cos)


def key_cosines(keys: Tensor, grid: tuple[int, int], scales: Sequence[int]) -> list[Tensor]:
    """What the HSRM reads from the keys: per scale s, cos(k_a, k_b) of the s x s window-averaged keys.

    keys [B, L, N = h*w, C] -> one [B, L, R_s, R_s] float32 matrix per scale (R_s = ceil(h/s) * ceil(w/s)), exactly
    symmetric (the upper triangle mirrored), so that storing the upper triangle alone loses nothing.
    """
    b, l, n, c = keys.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"keys have N={n} patches, but the grid is {h}x{w}")
    k = keys.float().reshape(b * l, h, w, c).permute(0, 3, 1, 2)  # [BL, C, h, w]
    out = []
    for s in scales:
        # ceil_mode keeps a partial last window, so any grid size works (e.g. 7x7 with s = 2)
        kp = F.avg_pool2d(k, s, s, ceil_mode=True) if s > 1 else k
        kr = F.normalize(kp.flatten(2).transpose(1, 2), dim=-1)  # [BL, R, C]
        cos = kr @ kr.transpose(1, 2)
        cos = cos.triu() + cos.triu(1).transpose(1, 2)
        out.append(cos.reshape(b, l, *cos.shape[-2:]))
    return out


def region_counts(grid: tuple[int, int], scales: Sequence[int]) -> list[int]:
    """R_s, the number of s x s windows (partial ones included) of a grid, per scale."""
    return [math.ceil(grid[0] / s) * math.ceil(grid[1] / s) for s in scales]


def pack_cosines(cosines: Sequence[Tensor]) -> Tensor:
    """Upper triangles (diagonal included) of :func:`key_cosines`' matrices [..., R_s, R_s], concatenated:
    -> [..., T] with T = sum_s R_s (R_s + 1) / 2 (the compact form a feature cache stores)."""
    parts = []
    for c in cosines:
        iu = torch.triu_indices(c.shape[-1], c.shape[-1], device=c.device)
        parts.append(c[..., iu[0], iu[1]])
    if not parts:
        raise ValueError("pack_cosines: no scales (an HSRM without propagation reads no cosines)")
    return torch.cat(parts, dim=-1)


@functools.lru_cache(maxsize=16)
def _triangle_index(r: int, device: torch.device) -> Tensor:
    """[R, R] positions in the row-major upper triangle (diagonal included) of an R x R matrix, symmetric."""
    a = torch.arange(r, device=device)
    lo, hi = torch.minimum(a[:, None], a[None, :]), torch.maximum(a[:, None], a[None, :])
    return lo * r - lo * (lo - 1) // 2 + (hi - lo)


def unpack_cosines(packed: Tensor, grid: tuple[int, int], scales: Sequence[int]) -> list[Tensor]:
    """Inverse of :func:`pack_cosines`: [..., T] -> per scale [..., R_s, R_s] float32 (symmetric)."""
    counts = region_counts(grid, scales)
    need = sum(r * (r + 1) // 2 for r in counts)
    if packed.shape[-1] != need:
        raise ValueError(
            f"packed cosines have {packed.shape[-1]} values, grid {grid} scales {list(scales)} need {need}"
        )
    out, start = [], 0
    flat = packed.reshape(-1, packed.shape[-1])
    for r in counts:
        # one gather: entry (a, b) of the matrix reads triangle entry (min(a, b), max(a, b)); torch.gather over an
        # expanded index is several times faster on CPU than advanced indexing with the [R, R] index
        idx = (start + _triangle_index(r, packed.device)).flatten()
        full = torch.gather(flat, 1, idx.expand(flat.shape[0], -1))
        out.append(full.reshape(*packed.shape[:-1], r, r).float())
        start += r * (r + 1) // 2
    return out


class HSRM(nn.Module):
    """Hierarchical Semantic Relationship Module (reconstructed).

    Args:
        num_layers: L, the number of selected CLIP blocks (the last one is the Grad-ECLIP block).
        width: W, the vision transformer width (patch-token size).
        embed_dim: D, CLIP's joint embedding size.
        scales: granularities s (patch-window sizes) for relationship propagation.
        tau: initial softmax temperature per scale (learnt, in log space).
        ln_post, proj: CLIP's own final LayerNorm and projection, used to initialise P_v.
        layer_weights: ``learned`` (alpha = e_last + d_alpha), or fixed for ablations: ``uniform`` (1/L each) or
            ``last`` (only the Grad-ECLIP block). ``scales=()`` switches multi-scale propagation off.
        gate: False switches the cross-modal alignment gate off (A = 1; its projections are then unused).
        conditioning: ``none`` | ``prompt``: layer and scale weights chosen per prompt (module docstring, step 2;
            with fixed layer weights only the scale weights are conditioned).
    """

    LAYER_WEIGHTS = ("learned", "uniform", "last")
    CONDITIONING = ("none", "prompt")

    def __init__(
        self,
        num_layers: int,
        width: int,
        embed_dim: int,
        scales: Sequence[int] = DEFAULTS.scales,
        tau: float | Sequence[float] = DEFAULTS.tau,
        ln_post: nn.LayerNorm | None = None,
        proj: Tensor | None = None,
        layer_weights: str = DEFAULTS.layer_weights,
        gate: bool = DEFAULTS.gate,
        conditioning: str = DEFAULTS.conditioning,
    ) -> None:
        super().__init__()
        if layer_weights not in self.LAYER_WEIGHTS:
            raise ValueError(f"hsrm layer_weights={layer_weights!r}: expected one of {self.LAYER_WEIGHTS}")
        if conditioning not in self.CONDITIONING:
            raise ValueError(f"hsrm conditioning={conditioning!r}: expected one of {self.CONDITIONING}")
        self.conditioning = conditioning
        self.layer_weights, self.use_gate = layer_weights, bool(gate)
        if num_layers < 1:
            raise ValueError(f"HSRM needs at least one layer, got num_layers={num_layers}")
        scales = [int(s) for s in scales]
        if any(s < 1 for s in scales):
            raise ValueError(f"HSRM scales must be positive window sizes, got {scales}")
        taus = [float(tau)] * len(scales) if isinstance(tau, int | float) else [float(t) for t in tau]
        if len(taus) != len(scales) or any(t <= 0 for t in taus):
            raise ValueError(f"tau needs one positive value per scale {scales}, got {taus}")
        self.num_layers, self.scales = num_layers, scales
        self.log_tau = nn.Parameter(torch.tensor([math.log(t) for t in taus]))
        # an ablated weight is a buffer: same state-dict key, no gradient, never moved by the optimiser
        self._param_or_buffer("d_alpha", torch.zeros(num_layers), layer_weights == "learned")
        self.d_beta = nn.Parameter(torch.zeros(1 + len(scales)))
        self.register_buffer("alpha0", F.one_hot(torch.tensor(num_layers - 1), num_layers).float())
        self.register_buffer("beta0", F.one_hot(torch.tensor(0), 1 + len(scales)).float())
        self.ln_v = nn.LayerNorm(width)
        self.proj_v = nn.Linear(width, embed_dim, bias=False)
        self.proj_t = nn.Linear(embed_dim, embed_dim, bias=False)
        self._param_or_buffer("gamma", torch.zeros(()), self.use_gate)
        if conditioning == "prompt":  # zero: the start is the unconditioned HSRM (Grad-ECLIP's map) exactly
            self.cond = nn.Parameter(torch.zeros(num_layers + 1 + len(scales), embed_dim))
        with torch.no_grad():
            if ln_post is not None:
                self.ln_v.load_state_dict(ln_post.state_dict())
            if proj is not None:
                if tuple(proj.shape) != (width, embed_dim):
                    raise ValueError(f"proj must be [width={width}, embed_dim={embed_dim}], got {tuple(proj.shape)}")
                self.proj_v.weight.copy_(proj.t())
            self.proj_t.weight.copy_(torch.eye(embed_dim))

    def _param_or_buffer(self, name: str, value: Tensor, learnt: bool) -> None:
        if learnt:
            setattr(self, name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    @property
    def alpha(self) -> Tensor:
        """Layer weights [L] (learned: the last selected layer first carries all the weight)."""
        if self.layer_weights == "uniform":
            return torch.full_like(self.alpha0, 1.0 / self.num_layers)
        return self.alpha0 + self.d_alpha

    @property
    def beta(self) -> Tensor:
        """Scale weights [1 + |S|]: un-propagated term first."""
        return self.beta0 + self.d_beta

    def propagate(
        self,
        evidence: Tensor,
        keys: Tensor | None,
        grid: tuple[int, int],
        cosines: Sequence[Tensor] | Tensor | None = None,
    ) -> Tensor:
        """g^{l,s} for s in {0} + scales: evidence [P, L, h, w], keys [B, L, N, C] -> [P, L, 1+|S|, h, w].

        ``cosines`` (one [B, L, R_s, R_s] per scale, :func:`key_cosines`, or all of them packed [B, L, T] by
        :func:`pack_cosines`) replace the keys: the same maps exactly (float32).
        """
        p, l, h, w = evidence.shape
        if not self.scales:  # multi-scale propagation switched off: the un-propagated term only
            return evidence[:, :, None]
        if cosines is None:
            if keys is None:
                raise ValueError("HSRM.propagate needs keys or their cosines")
            cosines = key_cosines(keys, (h, w), self.scales)
        if isinstance(cosines, Tensor):  # packed upper triangles [B, L, T] (the feature cache's form)
            cosines = unpack_cosines(cosines, (h, w), self.scales)
        if len(cosines) != len(self.scales):
            raise ValueError(f"got cosines for {len(cosines)} scales, the HSRM has scales {self.scales}")
        b = cosines[0].shape[0]
        kk = p // b  # prompts per image
        # one relation matrix per (image, layer), applied to the K prompts' evidence at once (K as channels)
        g = evidence.reshape(b, kk, l, h, w).transpose(1, 2).reshape(b * l, kk, h, w)
        terms = [evidence]
        for i, s in enumerate(self.scales):
            gp = F.avg_pool2d(g, s, s, ceil_mode=True) if s > 1 else g
            hs, ws = gp.shape[-2:]
            cos = cosines[i].reshape(b * l, hs * ws, hs * ws).to(evidence.dtype)
            rel = torch.softmax(cos * (-self.log_tau[i]).exp(), dim=-1)  # [BL, R, R]; times 1/tau (cheaper)
            prop = (rel @ gp.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b * l, kk, hs, ws)
            if s > 1:
                prop = F.interpolate(prop, scale_factor=s, mode="nearest")[..., :h, :w]
            terms.append(prop.reshape(b, l, kk, h, w).transpose(1, 2).reshape(p, l, h, w))
        return torch.stack(terms, dim=2)

    def alignment(self, patch_tokens: Tensor, text: Tensor) -> Tensor:
        """Patch-text cosine a [P, N] through the learnt projections: tokens [B, N, W], text [P = B*K, D]."""
        v = F.normalize(self.proj_v(self.ln_v(patch_tokens)), dim=-1)  # [B, N, D], once per image
        t = F.normalize(self.proj_t(text), dim=-1).reshape(v.shape[0], -1, v.shape[-1])  # [B, K, D]
        return torch.einsum("bnd,bkd->bkn", v, t).flatten(0, 1)

    def forward(self, inputs: HSRMInputs, out_size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """Returns (map M [P, H, W] in [0,1], unnormalised energy map E = ReLU(G) * A [P, h, w]).

        ``out_size`` (H, W) upsamples M bilinearly (default: the patch grid).
        """
        energy = self.energy(inputs)
        # the explainers' own normalise-then-resize, so that the start is Grad-ECLIP's map bit for bit
        m = to_image_maps(energy[:, None], out_size or inputs.grid)[:, 0]
        return m, energy

    def energy(self, inputs: HSRMInputs) -> Tensor:
        """The unnormalised energy map E = ReLU(G) * A [P, h, w] alone (what the energy objective reads)."""
        ev = inputs.evidence
        if ev.dim() != 4 or ev.shape[1] != self.num_layers:
            raise ValueError(f"evidence must be [P, L={self.num_layers}, h, w], got {tuple(ev.shape)}")
        b = inputs.num_images
        cos = inputs.cosines
        per_image = inputs.keys if inputs.keys is not None else (cos if isinstance(cos, Tensor) or not cos else cos[0])
        if per_image is None or per_image.shape[0] != b or ev.shape[0] % b or inputs.text.shape[0] != ev.shape[0]:
            shape = None if per_image is None else tuple(per_image.shape)
            raise ValueError(
                f"HSRM inputs disagree: evidence {tuple(ev.shape)} and text {tuple(inputs.text.shape)} need P = B*K "
                f"rows for keys/cosines {shape} / tokens {tuple(inputs.patch_tokens.shape)} of B images"
            )
        h, w = inputs.grid
        scale = ev.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        terms = self.propagate(ev / scale, inputs.keys, (h, w), inputs.cosines)  # [P, L, S+1, h, w]
        if self.conditioning == "prompt":
            delta = F.normalize(inputs.text.float(), dim=-1) @ self.cond.t()  # [P, L + 1 + |S|]
            d_alpha = delta[:, : self.num_layers] if self.layer_weights == "learned" else 0.0
            alpha = self.alpha[None] + d_alpha
            beta = self.beta[None] + delta[:, self.num_layers :]
            g = torch.einsum("plshw,pl,ps->phw", terms, alpha.to(terms.dtype), beta.to(terms.dtype))
        else:
            g = torch.einsum("plshw,l,s->phw", terms, self.alpha, self.beta)
        if not self.use_gate:
            return F.relu(g)
        a = self.alignment(inputs.patch_tokens, inputs.text).reshape(-1, h, w)
        return F.relu(g) * torch.sigmoid(self.gamma * (a - a.mean(dim=(-2, -1), keepdim=True)))

    @classmethod
    def for_clip(cls, model: nn.Module, num_layers: int, **kw) -> HSRM:
        """Build an HSRM sized for an open_clip ViT CLIP and initialised from its ln_post / proj."""
        visual = model.visual
        return cls(
            num_layers=num_layers,
            width=visual.ln_post.normalized_shape[0],
            embed_dim=visual.proj.shape[1],
            ln_post=visual.ln_post,
            proj=visual.proj.detach(),
            **kw,
        )
