"""Prompt specificity: does a prompt's map peak on the object it names, on another object, or on background?

An objectness map (one that points at *some* object whatever the prompt says) scores well on the pointing game of
single-object images. On images with several objects it does not: this metric asks, for each (image, prompt) pair,
where the map's maximum lies —

* **named**: inside the boxes of the object the prompt names,
* **other**: inside the boxes of another object of the image (and not the named one's: a pixel in both counts as
  named, the benefit of the doubt where objects overlap),
* **background**: anywhere else,

and reports ``specificity = named / (named + other)`` (how often a map that lands on an object lands on the right
one; 0.5 would be an objectness map on two-object images, lower with more objects).

Conventions (maps / boxes as in :mod:`mmel.metrics._common`: maps resized bilinearly to the original image size,
boxes xyxy in original pixels, a box covers the pixels it overlaps):

* **Ties**: every pixel attaining the maximum votes with an equal share, so a sample contributes fractions
  (named, other, background) summing to 1; a 2x2 plateau from bilinear upsampling on one object changes nothing,
  a flat map splits its vote by area. An all-zero map points nowhere: it counts as background.
* **Which pairs count**: a pair whose image has no other object (``other_boxes`` empty) cannot separate a
  prompt-specific map from an objectness map; it is skipped and counted in ``skipped``. The caller may pass every
  pair; specificity is computed on the multi-object ones.
* **Hard case**: ``hard`` [N] flags pairs where another object shares an attribute with the named one (on the
  shapes world: the colour); ``hard_specificity`` is the same ratio on them.
* **Absent prompts**: a pair whose ``boxes`` are empty names a category not in the image. Its map is scored
  separately: ``absent_on_object`` is the fraction of absent-prompt maps that still peak on an object (lower is
  better; an objectness map scores ~ the objects' area share of the peak, a prompt-following map lower). Absent
  pairs need at least one object in ``other_boxes`` (else they are skipped too).
* Undefined ratios (nothing counted) are NaN; the key set never changes.

Under DDP every state is a sum (``dist_reduce_fx="sum"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from mmel.data.boxes import union_masks
from mmel.metrics._common import check_boxes, check_maps, check_mask, check_sizes, resize_group, size_groups
from mmel.metrics.protocol import ItemContext, Output

_NAME = "PromptSpecificity"
STATES = (
    "named",
    "other",
    "background",
    "total",
    "hard_named",
    "hard_other",
    "hard_total",
    "absent_object",
    "absent_total",
    "skipped",
)


def _box_list(boxes: Sequence[Tensor], sizes: list[tuple[int, int]], device: torch.device, field: str) -> list[Tensor]:
    """N tensors [M_i, 4] (M_i may be 0); non-empty ones validated like the other metrics' boxes."""
    return check_boxes(boxes, sizes, device, _NAME, field=field, allow_empty=True)


def _prompt_specificity_items(
    maps: Tensor,
    boxes: Sequence[Tensor],
    other_boxes: Sequence[Tensor],
    sizes: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-pair values of maps [N, h, w], named boxes (N of [M_i, 4], empty = absent prompt) and the image's other
    objects' boxes (N of [M'_i, 4]): {"named", "other" [N] float (shares of the peak), "kind" [N] long}, with kind
    0 = skipped (no other object), 1 = a named pair, 2 = an absent-prompt pair (its share on any object in
    "other", "named" 0)."""
    maps = check_maps(maps, _NAME)
    size_list = check_sizes(sizes, maps, _NAME)
    named_boxes = _box_list(boxes, size_list, maps.device, "boxes")
    others = _box_list(other_boxes, size_list, maps.device, "other_boxes")
    n = maps.shape[0]
    out = {"named": maps.new_zeros(n, dtype=torch.float32), "other": maps.new_zeros(n, dtype=torch.float32),
           "kind": torch.zeros(n, dtype=torch.long, device=maps.device)}  # fmt: skip
    for size, idx in size_groups(size_list).items():  # one batched pass per original size
        m = resize_group(maps[idx], size)  # [n, H, W]
        top, low = m.flatten(1).amax(1), m.flatten(1).amin(1)
        # every pixel at the maximum votes; an all-zero map points nowhere
        peaks = (m == top[:, None, None]) & ((top != 0) | (low != 0))[:, None, None]
        n_peaks = peaks.flatten(1).sum(1).clamp(min=1).float()
        on_named = union_masks([named_boxes[i] for i in idx], size, maps.device)
        on_other = union_masks([others[i] for i in idx], size, maps.device)
        has_other = torch.tensor([others[i].shape[0] > 0 for i in idx], device=maps.device)
        absent = torch.tensor([named_boxes[i].shape[0] == 0 for i in idx], device=maps.device)
        # an absent prompt names nothing (on_named is empty): its "other" is its share on any object
        named = (peaks & on_named).flatten(1).sum(1) / n_peaks
        other = (peaks & on_other & ~on_named).flatten(1).sum(1) / n_peaks
        where = torch.tensor(idx, device=maps.device)
        out["kind"][where] = torch.where(has_other, torch.where(absent, 2, 1), 0)
        out["named"][where] = torch.where(has_other & ~absent, named, 0.0)
        out["other"][where] = torch.where(has_other, other, 0.0)
    return out


def _prompt_specificity_accumulate(
    named: Tensor, other: Tensor, kind: Tensor, hard: Tensor | None = None
) -> dict[str, Tensor]:
    """Summed states (see :data:`STATES`) of per-pair values (:func:`_prompt_specificity_items`) and hard [N]."""
    named, other = named.float(), other.float()
    pair, absent = kind == 1, kind == 2
    hard = pair if hard is None else pair & hard.to(device=pair.device, dtype=torch.bool)
    z = named.new_zeros(())
    return {
        "named": z + named[pair].sum(),
        "other": z + other[pair].sum(),
        "background": z + (1 - named[pair] - other[pair]).sum(),
        "total": z + pair.sum(),
        "hard_named": z + named[hard].sum(),
        "hard_other": z + other[hard].sum(),
        "hard_total": z + hard.sum(),
        "absent_object": z + other[absent].sum(),
        "absent_total": z + absent.sum(),
        "skipped": z + (kind == 0).sum(),
    }


def _prompt_specificity_update(
    maps: Tensor,
    boxes: Sequence[Tensor],
    other_boxes: Sequence[Tensor],
    sizes: Tensor | None = None,
    hard: Tensor | None = None,
) -> dict[str, Tensor]:
    """Summed states (see :data:`STATES`) of maps [N, h, w], named boxes (N of [M_i, 4], empty = absent prompt),
    the image's other objects' boxes (N of [M'_i, 4]) and an optional hard flag [N]."""
    v = _prompt_specificity_items(maps, boxes, other_boxes, sizes)
    hard = check_mask(hard, v["kind"].numel(), _NAME, "hard", v["kind"].device)
    return _prompt_specificity_accumulate(v["named"], v["other"], v["kind"], hard)


def _ratio(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(b > 0, a / b.clamp(min=torch.finfo(torch.float32).tiny), torch.full_like(a, float("nan")))


def _prompt_specificity_compute(s: dict[str, Tensor]) -> dict[str, Tensor]:
    """{"specificity", "hard_specificity", "named_rate", "other_rate", "background_rate", "absent_on_object",
    "pairs", "hard_pairs", "absent_pairs", "skipped"} from summed states."""
    return {
        "specificity": _ratio(s["named"], s["named"] + s["other"]),
        "hard_specificity": _ratio(s["hard_named"], s["hard_named"] + s["hard_other"]),
        "named_rate": _ratio(s["named"], s["total"]),
        "other_rate": _ratio(s["other"], s["total"]),
        "background_rate": _ratio(s["background"], s["total"]),
        "absent_on_object": _ratio(s["absent_object"], s["absent_total"]),
        "pairs": s["total"],
        "hard_pairs": s["hard_total"],
        "absent_pairs": s["absent_total"],
        "skipped": s["skipped"],
    }


def prompt_specificity(
    maps: Tensor,
    boxes: Sequence[Tensor],
    other_boxes: Sequence[Tensor],
    sizes: Tensor | None = None,
    hard: Tensor | None = None,
) -> dict[str, Tensor]:
    """Prompt specificity of maps [N, h, w]; see the module docstring.

    boxes: N tensors [M_i, 4] of the named object (empty [0, 4] = the prompt names an absent category);
    other_boxes: N tensors [M'_i, 4] of the image's other objects; sizes [N, 2] original (H, W); hard [N] bool.

    Example:
        >>> maps = torch.zeros(2, 10, 10)
        >>> maps[0, 1, 1] = 1.0  # peaks on the named object
        >>> maps[1, 8, 8] = 1.0  # peaks on the other one
        >>> named, other = torch.tensor([[0.0, 0.0, 3.0, 3.0]]), torch.tensor([[7.0, 7.0, 10.0, 10.0]])
        >>> prompt_specificity(maps, [named, named], [other, other])["specificity"]
        tensor(0.5000)
    """
    return _prompt_specificity_compute(_prompt_specificity_update(maps, boxes, other_boxes, sizes, hard))


HARD_RULES = (None, "first_word")


def shares_attribute(category: str, others: Sequence[str], rule: str | None) -> bool:
    """The hard-case flag of a pair: does another object's category share an attribute with the named one?
    ``rule="first_word"``: the category names' first words are equal (the shapes world's colour, "red circle" vs
    "red star"); None: never (no attribute is known)."""
    if rule not in HARD_RULES:
        raise ValueError(f"{_NAME}: hard={rule!r}; expected one of {list(HARD_RULES)}")
    if rule is None:
        return False
    first = category.split()[0] if category.split() else ""
    return any(o != category and o.split() and o.split()[0] == first for o in others)


class PromptSpecificity(Metric):
    """Where each prompt's map peaks (named object / another object / background); see the module docstring.

    ``update(maps [N, h, w], boxes N x [M_i, 4], other_boxes N x [M'_i, 4], sizes [N, 2] = None, hard [N] = None)``;
    ``compute()`` returns the dict of :func:`prompt_specificity`.

    Options the evaluate engine reads (``metrics.prompt_specificity``; the metric itself only sums): ``hard`` is the
    hard-case rule of :func:`shares_attribute` (``first_word`` on the shapes world); ``absent=True`` also explains,
    per image, one seeded category absent from it (``seed``) and scores where that map peaks.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, hard: str | None = None, absent: bool = True, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        shares_attribute("", [], hard)  # validates the rule
        self.hard, self.absent, self.seed = hard, bool(absent), int(seed)
        for name in STATES:
            self.add_state(name, torch.tensor(0.0), dist_reduce_fx="sum")

    needs = frozenset({"maps", "boxes", "sizes", "categories", "others"})

    outputs = (
        *(Output(k, True) for k in ("specificity", "hard_specificity", "named_rate")),
        Output("other_rate", False),
        Output("background_rate", None),
        Output("absent_on_object", False),
        *(Output(k, None) for k in ("pairs", "hard_pairs", "absent_pairs", "skipped")),
    )

    def item_values(self, ctx: ItemContext) -> list[dict[str, Any]]:
        """Per item {"named", "other": shares of the map's peak, "kind": 0 skipped / 1 counted, "hard": bool,
        "absent": {"prompt", "on_object"} on the first item of an image with an absent prompt, else None}."""
        ctx.require(self.needs | ({"absent"} if self.absent else set()), _NAME)
        others = ctx.others()  # per item: (other objects' boxes, their categories, every object's boxes)
        other_boxes = [o[0] for o in others]
        v = _prompt_specificity_items(ctx.maps, ctx.boxes, other_boxes, ctx.sizes)
        recs = [
            {"named": float(v["named"][j]), "other": float(v["other"][j]), "kind": int(v["kind"][j]),
             "hard": shares_attribute(ctx.categories[j], cats, self.hard), "absent": None}
            for j, (_, cats, _) in enumerate(others)
        ]  # fmt: skip
        if self.absent:  # once per image: the absent prompt's map against every object of the image
            absent = ctx.absent(self.seed)
            js = [j for j, (_, m, first) in enumerate(absent) if m is not None and first]
            if js:
                every = [others[j][2] for j in js]
                a = _prompt_specificity_items(torch.stack([absent[j][1] for j in js]), [torch.zeros(0, 4)] * len(js),
                                              every, ctx.sizes[js] if ctx.sizes is not None else None)  # fmt: skip
                for k, j in enumerate(js):
                    if int(a["kind"][k]) == 2:
                        recs[j]["absent"] = {"prompt": absent[j][0], "on_object": float(a["other"][k])}
        return recs

    def update(
        self,
        maps: Tensor | None = None,
        boxes: Sequence[Tensor] | None = None,
        other_boxes: Sequence[Tensor] | None = None,
        sizes: Tensor | None = None,
        hard: Tensor | None = None,
        *,
        records: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        """Add N pairs (see :func:`prompt_specificity` for the arguments), or N per-item ``records`` of
        :meth:`item_values` (each absent-prompt entry counts as one more, absent, pair)."""
        if records is None:
            self._add(_prompt_specificity_update(maps.detach(), boxes, other_boxes, sizes, hard))
            return
        rows = [(r["named"], r["other"], r["kind"], r["hard"]) for r in records]
        rows += [(0.0, r["absent"]["on_object"], 2, False) for r in records if r.get("absent")]
        named, other, kind, flags = (list(c) for c in zip(*rows, strict=True)) if rows else ([], [], [], [])
        self._add(_prompt_specificity_accumulate(torch.tensor(named, dtype=torch.float32),
                                                 torch.tensor(other, dtype=torch.float32),
                                                 torch.tensor(kind, dtype=torch.long),
                                                 torch.tensor(flags, dtype=torch.bool)))  # fmt: skip

    def _add(self, sums: dict[str, Tensor]) -> None:
        for name, value in sums.items():
            setattr(self, name, getattr(self, name) + value.to(getattr(self, name).device))

    def compute(self) -> dict[str, Tensor]:
        return _prompt_specificity_compute({name: getattr(self, name) for name in STATES})
