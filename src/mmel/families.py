"""Model families: what kind of CLIP a loaded model is, recognised by what its towers hold and compute.

mmel's explainers read different parts of a CLIP: most recompute the attention blocks of a ViT image tower, some
only need a feature map of a CNN stage, RISE only needs ``encode_image``. Which of them apply therefore depends on
the *family* of the model, not on the name it was loaded under. :func:`classify` answers the family from the
modules themselves (never from a class name alone): a block is a native transformer block when it holds
``ln_1``, an attention with a packed ``in_proj_weight`` [3C, C] (and ``in_proj_bias``), ``out_proj`` and
``num_heads``, ``ls_1``, ``ln_2``, ``mlp``, ``ls_2`` and none of the extras that change what it computes (q/k
norms, scaled-cosine attention, head scales, an inner norm, a norm after attention). So the attention class
open_clip's main branch uses instead of ``nn.MultiheadAttention`` (same parameter names) is recognised, and a block
that computes something else is refused with the reason.

The registry is a list of :class:`Family` entries checked in order; :func:`register_family` adds one (e.g. a timm
ViT path living in another module), optionally before an existing entry. Family names are plain strings, the
constants below. Explainers declare the families they support (``Explainer.families``); docs/model_families.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

NATIVE_VIT = "native_vit"
NATIVE_VIT_ATTN_POOL = "native_vit_attn_pool"
TIMM_VIT = "timm_vit"
MODIFIED_RESNET = "modified_resnet"
TIMM_CNN = "timm_cnn"
HF_CLIP = "hf_clip"
HF_SIGLIP = "hf_siglip"
# explainers' declarations (``Explainer.families``): ViT families whose blocks are recomputed, CNN towers, and
# every family (a method that needs only ``encode_image`` / ``encode_text``)
VIT_FAMILIES = frozenset({NATIVE_VIT, HF_CLIP})
CNN_FAMILIES = frozenset({MODIFIED_RESNET, TIMM_CNN})
ANY_FAMILY = "*"


@dataclass(frozen=True)
class Family:
    """One model family: ``name`` (a constant above), ``label`` (for tables), ``tower`` (what its image tower is,
    in the words an error message uses), ``detect(bundle_or_model) -> bool``, ``loadable``."""

    name: str
    label: str
    tower: str
    detect: Callable[[object], bool]
    loadable: bool = True  # load_clip can produce it (False: recognised, but no loader yet; no matrix column)


# ------------------------------------------------------------------------------------------- block detection
def _is_identity(m: object) -> bool:
    return m is None or isinstance(m, nn.Identity)


def native_block_problem(blk: nn.Module) -> str | None:
    """Why ``blk`` is not a block the explainers can recompute (``explainers/vit.py``), or None when it is.

    Checked: pre-norm ``ln_1`` / ``ln_2`` (callables), ``mlp``, ``ls_1`` / ``ls_2``, and an attention ``attn`` with
    an integer ``num_heads``, a packed ``in_proj_weight`` [3C, C], ``in_proj_bias`` [3C] (or None), ``out_proj``
    (weight [C, C]); and none of: a cross-attention norm (``ln_1_kv``), a norm after attention (``ln_attn``), q/k
    norms (``ln_q`` / ``ln_k``), scaled-cosine attention (``logit_scale``), head scales (``head_scale``), an inner
    norm (``ln_inner``).
    """
    missing = [n for n in ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2") if not callable(getattr(blk, n, None))]
    if missing:
        return f"block {type(blk).__name__} has no {missing}"
    attn = blk.attn
    w = getattr(attn, "in_proj_weight", None)
    if not isinstance(w, Tensor) or w.ndim != 2 or w.shape[0] != 3 * w.shape[1]:
        return (
            f"attention {type(attn).__name__} has no packed q/k/v projection (in_proj_weight [3C, C]); separate "
            "q/k/v projections are not read"
        )
    b = getattr(attn, "in_proj_bias", None)
    if b is not None and (not isinstance(b, Tensor) or tuple(b.shape) != (w.shape[0],)):
        return f"attention {type(attn).__name__}: in_proj_bias is not [3C]"
    out = getattr(attn, "out_proj", None)
    if not isinstance(getattr(out, "weight", None), Tensor) or tuple(out.weight.shape) != (w.shape[1], w.shape[1]):
        return f"attention {type(attn).__name__} has no out_proj of [C, C]"
    heads = getattr(attn, "num_heads", None)
    if not isinstance(heads, int) or heads < 1 or w.shape[1] % heads:
        return f"attention {type(attn).__name__}: num_heads {heads!r} does not divide the width {w.shape[1]}"
    if getattr(blk, "ln_1_kv", None) is not None:
        return "a cross-attention block (ln_1_kv)"
    extras = {
        "ln_attn": getattr(blk, "ln_attn", None),
        "ln_q": getattr(attn, "ln_q", None),
        "ln_k": getattr(attn, "ln_k", None),
        "ln_inner": getattr(attn, "ln_inner", None),
    }
    changed = [n for n, m in extras.items() if not _is_identity(m)]
    if getattr(attn, "head_scale", None) is not None:
        changed.append("head_scale")
    if isinstance(getattr(attn, "logit_scale", None), Tensor):
        changed.append("logit_scale (scaled-cosine attention)")
    if changed:
        return f"the block computes more than softmax(qk^T/sqrt(d))v: it has {changed}"
    return None


def vit_problem(visual: nn.Module | None) -> str | None:
    """Why ``visual`` is not a native (open_clip layout) CLS-pooled ViT image tower, or None when it is.

    Needs ``conv1`` (patch embedding), ``class_embedding``, ``positional_embedding``, ``ln_pre``, ``ln_post``,
    ``proj`` (or None), ``transformer.resblocks`` of native blocks (:func:`native_block_problem`), CLS pooling.
    """
    if visual is None:
        return "the model has no image tower (model.visual)"
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "ln_post", "transformer")
    missing = [n for n in needed if getattr(visual, n, None) is None]
    if missing or not hasattr(getattr(visual, "transformer", None), "resblocks"):
        return f"image tower {type(visual).__name__} is not a native ViT (no {missing or ['transformer.resblocks']})"
    if not hasattr(visual, "proj"):
        return f"image tower {type(visual).__name__} has no proj"
    for i, blk in enumerate(visual.transformer.resblocks):
        problem = native_block_problem(blk)
        if problem:
            return f"vision block {i}: {problem}"
    return None


def attn_pool_problem(visual: nn.Module) -> str | None:
    """Why a native ViT does not pool at the CLS token (attention pooling, another pool type), or None."""
    if getattr(visual, "attn_pool", None) is not None:
        return "it pools with an attention pooler (attn_pool), not at the CLS token"
    if getattr(visual, "pool_type", "tok") != "tok":
        return f"it pools with pool_type={visual.pool_type!r}, not at the CLS token"
    if getattr(visual, "final_ln_after_pool", False):
        return "it applies ln_post after pooling (final_ln_after_pool)"
    return None


def text_tower_problem(model: nn.Module) -> str | None:
    """Why the text side of ``model`` is not open_clip's native causal text transformer pooled at the EOS (argmax)
    token, or None when it is (then text tokens can be traced; otherwise only ``model.encode_text`` is used)."""
    needed = ("transformer", "token_embedding", "positional_embedding", "ln_final", "attn_mask")
    missing = [n for n in needed if getattr(model, n, None) is None]
    if missing:
        return f"the text tower is not open_clip's native one (no {missing})"
    if getattr(model, "text_pool_type", "argmax") != "argmax":
        return f"the text tower pools with {model.text_pool_type!r}, not at the EOS (argmax) token"
    for i, blk in enumerate(getattr(model.transformer, "resblocks", None) or []):
        problem = native_block_problem(blk)
        if problem:
            return f"text block {i}: {problem}"
    return None


# ------------------------------------------------------------------------------------------------ detectors
def _model(obj: object) -> nn.Module:
    return getattr(obj, "model", obj)  # a ClipBundle or a bare model


def _visual(obj: object) -> nn.Module | None:
    return getattr(_model(obj), "visual", None)


def _is_hf_source(obj: object) -> bool:
    return str(getattr(obj, "name", "")).startswith("hf:")


def _is_timm_trunk(obj: object, cnn: bool) -> bool:
    trunk = getattr(_visual(obj), "trunk", None)
    if trunk is None:
        return False
    has_stages = hasattr(trunk, "stages") and hasattr(trunk, "stem") and not hasattr(trunk, "blocks")
    return has_stages if cnn else hasattr(trunk, "blocks")


def _is_native_vit(obj: object) -> bool:
    visual = _visual(obj)
    return vit_problem(visual) is None and attn_pool_problem(visual) is None


_FAMILIES: list[Family] = [
    Family(
        HF_CLIP,
        "HF CLIP (converted to native ViT)",
        "a Hugging Face CLIPModel converted into open_clip's native ViT",
        lambda o: _is_hf_source(o) and _is_native_vit(o),
    ),
    Family(NATIVE_VIT, "native ViT", "open_clip's native ViT (CLS pooling)", _is_native_vit),
    Family(
        NATIVE_VIT_ATTN_POOL,
        "native ViT, attention pool / not CLS-pooled",
        "an open_clip ViT that does not pool at the CLS token (attention pooler / other pool type)",
        lambda o: vit_problem(_visual(o)) is None and attn_pool_problem(_visual(o)) is not None,
    ),
    Family(
        MODIFIED_RESNET,
        "ModifiedResNet (RN50, ...)",
        "a CNN (open_clip ModifiedResNet: stem, layer1-4, attention pool)",
        lambda o: all(hasattr(_visual(o), n) for n in ("layer1", "layer4", "attnpool")),
    ),
    Family(
        TIMM_CNN,
        "timm CNN (ConvNeXt, ...)",
        "a CNN (a timm trunk of stages: ConvNeXt and the like)",
        lambda o: _is_timm_trunk(o, cnn=True),
    ),
    Family(
        TIMM_VIT,
        "timm ViT (SigLIP, EVA, PE, ...)",
        "a timm ViT trunk (not open_clip's native blocks)",
        lambda o: _is_timm_trunk(o, cnn=False),
    ),
    Family(
        HF_SIGLIP,
        "HF SigLIP",
        "a Hugging Face SiglipModel",
        lambda o: type(_model(o)).__name__ in ("HFSiglipCLIP", "SiglipModel"),
    ),
]


def register_family(family: Family, before: str | None = None) -> None:
    """Add (or replace, by name) a family; ``before``: the name of the entry it must be checked ahead of."""
    global _FAMILIES
    _FAMILIES = [f for f in _FAMILIES if f.name != family.name]
    at = next((i for i, f in enumerate(_FAMILIES) if f.name == before), len(_FAMILIES))
    _FAMILIES.insert(at, family)


def families() -> list[Family]:
    """Every registered family, in the order :func:`classify` checks them."""
    return list(_FAMILIES)


def family(name: str) -> Family:
    """The registered family called ``name`` (a clear error naming the known ones otherwise)."""
    for f in _FAMILIES:
        if f.name == name:
            return f
    raise ValueError(f"unknown model family {name!r}; known: {[f.name for f in _FAMILIES]}")


def classify(obj: object) -> str:
    """The family (a name above) of a :class:`mmel.backbone.ClipBundle` or a bare CLIP model.

    A bundle loaded from ``hf:...`` is ``hf_clip`` (its model is a native ViT). Raises a ValueError naming what was
    found when no family matches (e.g. a ViT whose blocks compute something the explainers cannot recompute).
    """
    for f in _FAMILIES:
        if f.detect(obj):
            return f.name
    visual = _visual(obj)
    why = vit_problem(visual) or "no family's detector matched"
    name = getattr(obj, "name", type(_model(obj)).__name__)
    raise ValueError(
        f"model {name!r}: not a supported CLIP family ({why}). Supported: "
        f"{[f.label for f in _FAMILIES]}; docs/model_families.md lists what each explainer reads."
    )
