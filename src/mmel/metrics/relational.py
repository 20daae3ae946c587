"""Metrics of the relational world (``data=shapes_relations``): does a map follow the *words* of an expression, the
context it mentions, and can it say "nothing here"?

* :class:`RelationalAccuracy` — each expression names one of two same-looking objects; the other (the
  *look-alike*) is what the swapped words name. The item is right (1) when the map's peak inside the referent's
  boxes is above its peak inside the look-alike's, wrong (0) when below, 0.5 on a tie; chance is 0.5, and a map
  that follows appearance alone cannot do better. Reported overall and split by whether **the CLIP itself knows
  the relation** on that item: on the counterfactual image (the same scene without the look-alike, where only the
  true expression holds) the model's cosine with the expression is above its cosine with the swapped one. An
  explanation cannot be faithful to knowledge the model lacks: accuracy well above chance on the items the model
  gets wrong means the explainer brings its own (a detector), not the model's. ``model_knows`` is the CLIP's own
  relational accuracy on the items scored.
* :class:`ContextCoverage` — the share of the map's mass on the context objects the expression mentions (the
  anchor of "left of the blue square"); items that mention none (row / single) are not scored.
* :class:`AbsentEvidence` — the explainer's *unnormalised* evidence (its raw map's positive mass on the patch grid,
  :meth:`mmel.explainers.base.Explainer.evidence`) for each item's prompt against the evidence for a prompt naming
  a category absent from the image (the same absent prompt per image as the specificity metrics). A normalised
  map always has a peak, so "nothing here" is only sayable before normalisation. ``auroc``: the probability that a
  present prompt's evidence exceeds an absent prompt's (pooled over the split: every item's present evidence
  against one absent prompt per image; ties count half); ``paired``: the same within each image.

Maps and boxes follow :mod:`mmel.metrics._common` (maps resized to the scored frame; the one box rule). Per-item
values are what the evaluate engine records; ``update(records=...)`` replays them (DDP: sums and concatenations).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from mmel.data.boxes import union_masks
from mmel.metrics._common import check_boxes, check_maps, check_sizes, resize_group, size_groups
from mmel.metrics.protocol import ItemContext, Output


def _peaks(maps: Tensor, boxes: Sequence[Tensor], sizes: Tensor | None, name: str, field: str) -> Tensor:
    """Per item the map's maximum inside the union of its ``boxes`` [N] (NaN where an item has no box)."""
    maps = check_maps(maps, name)
    size_list = check_sizes(sizes, maps, name)
    box_list = check_boxes(boxes, size_list, maps.device, name, field=field, allow_empty=True)
    out = torch.full((maps.shape[0],), float("nan"), device=maps.device)
    for size, idx in size_groups(size_list).items():
        m = resize_group(maps[idx], size)
        inside = union_masks([box_list[i] for i in idx], size, maps.device)
        vals = torch.where(inside, m, torch.full_like(m, -torch.inf)).flatten(1).amax(1)
        out[torch.tensor(idx, device=maps.device)] = torch.where(torch.isinf(vals), float("nan"), vals)
    return out


def relational_correct(maps: Tensor, boxes: Sequence[Tensor], lookalikes: Sequence[Tensor],
                       sizes: Tensor | None = None) -> Tensor:  # fmt: skip
    """Per item 1 / 0.5 / 0: the map's peak on the referent above / equal to / below its peak on the look-alike.

    Example:
        >>> maps = torch.zeros(1, 4, 4)
        >>> maps[0, 0, 0] = 1.0
        >>> relational_correct(maps, [torch.tensor([[0.0, 0, 1, 1]])], [torch.tensor([[3.0, 3, 4, 4]])])
        tensor([1.])
    """
    ref = _peaks(maps, boxes, sizes, "RelationalAccuracy", "boxes")
    look = _peaks(maps, lookalikes, sizes, "RelationalAccuracy", "lookalikes")
    if bool(torch.isnan(ref).any() | torch.isnan(look).any()):
        raise ValueError("RelationalAccuracy: every item needs referent boxes and look-alike boxes")
    return (ref > look).float() + 0.5 * (ref == look).float()


def model_knows(scorer, counterfactuals: Sequence[Tensor | None], prompts: Sequence[str],
                swapped: Sequence[str]) -> list[bool | None]:  # fmt: skip
    """Per item whether the CLIP's cosine with the expression beats its cosine with the swapped expression on the
    counterfactual image (None where the item has no counterfactual)."""
    have = [i for i, c in enumerate(counterfactuals) if c is not None]
    out: list[bool | None] = [None] * len(prompts)
    if not have:
        return out
    for p in {prompts[i] for i in have} | {swapped[i] for i in have}:
        scorer.index(p)  # a clear KeyError for a prompt the scorer was not built with
    cos = scorer.cosines(torch.stack([counterfactuals[i] for i in have]))
    for row, i in enumerate(have):
        out[i] = bool(cos[row, scorer.index(prompts[i])] > cos[row, scorer.index(swapped[i])])
    return out


class RelationalAccuracy(Metric):
    """Relational accuracy overall and by whether the model knows the relation (module docstring).

    ``update(maps, boxes, lookalikes, sizes=None, knows=None)`` or ``update(records=...)``; ``compute()`` ->
    {"accuracy", "accuracy_model_knows", "accuracy_model_wrong", "model_knows", "n_model_knows"} (NaN where
    nothing was counted)."""

    full_state_update = False
    needs = frozenset({"maps", "boxes", "sizes", "lookalikes", "prompts", "scorer"})
    outputs = (
        Output("accuracy", True, field="correct"),
        Output("accuracy_model_knows", True, field="correct", where="knows"),
        Output("accuracy_model_wrong", None, field="correct", where="wrong"),
        Output("model_knows", None, field="known"),
        Output("n_model_knows", None),
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for s in ("correct", "total", "known_correct", "known", "wrong_correct", "wrong"):
            self.add_state(s, torch.tensor(0.0), dist_reduce_fx="sum")

    def item_values(self, ctx: ItemContext) -> list[dict[str, Any]]:
        ctx.require(self.needs, "RelationalAccuracy")
        correct = relational_correct(ctx.maps, ctx.boxes, ctx.lookalikes, ctx.sizes).tolist()
        knows: list[bool | None] = [None] * len(correct)
        if ctx.counterfactuals is not None and ctx.scorer is not None and ctx.swapped is not None:
            knows = model_knows(ctx.scorer, ctx.counterfactuals, ctx.prompts, ctx.swapped)
        out = []
        for c, k in zip(correct, knows, strict=True):
            rec: dict[str, Any] = {"correct": c}
            if k is not None:
                rec.update(knows=k, wrong=not k, known=float(k))
            out.append(rec)
        return out

    def update(self, maps: Tensor | None = None, boxes: Sequence[Tensor] | None = None,
               lookalikes: Sequence[Tensor] | None = None, sizes: Tensor | None = None,
               knows: Sequence[bool | None] | None = None, *,
               records: Sequence[dict[str, Any]] | None = None) -> None:  # fmt: skip
        if records is None:
            correct = relational_correct(maps, boxes, lookalikes, sizes).tolist()
            knows = list(knows) if knows is not None else [None] * len(correct)
            records = [{"correct": c, **({"knows": k} if k is not None else {})}
                       for c, k in zip(correct, knows, strict=True)]  # fmt: skip
        for r in records:
            c = float(r["correct"])
            self.correct += c
            self.total += 1
            if r.get("knows") is True:
                self.known_correct += c
                self.known += 1
            elif r.get("knows") is False:
                self.wrong_correct += c
                self.wrong += 1

    def compute(self) -> dict[str, Tensor]:
        nan = torch.tensor(float("nan"))
        ratio = lambda a, b: a / b if b > 0 else nan  # noqa: E731
        return {
            "accuracy": ratio(self.correct, self.total),
            "accuracy_model_knows": ratio(self.known_correct, self.known),
            "accuracy_model_wrong": ratio(self.wrong_correct, self.wrong),
            "model_knows": ratio(self.known, self.known + self.wrong),
            "n_model_knows": self.known.clone(),
        }


def context_coverage(maps: Tensor, mentioned: Sequence[Tensor], sizes: Tensor | None = None) -> Tensor:
    """Per item the map's mass share on its mentioned objects [N] (NaN for an item that mentions none; an
    all-zero map has no mass anywhere: 0)."""
    maps = check_maps(maps, "ContextCoverage")
    size_list = check_sizes(sizes, maps, "ContextCoverage")
    box_list = check_boxes(mentioned, size_list, maps.device, "ContextCoverage", field="mentioned", allow_empty=True)
    out = torch.full((maps.shape[0],), float("nan"), device=maps.device)
    for size, idx in size_groups(size_list).items():
        m = resize_group(maps[idx], size).clamp(min=0)
        inside = union_masks([box_list[i] for i in idx], size, maps.device)
        share = (m * inside).flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1e-12)
        has = torch.tensor([len(box_list[i]) > 0 for i in idx], device=maps.device)
        out[torch.tensor(idx, device=maps.device)] = torch.where(has, share, float("nan"))
    return out


class ContextCoverage(Metric):
    """Mean mass share on the mentioned context objects (module docstring); ``compute()`` -> scalar."""

    full_state_update = False
    needs = frozenset({"maps", "sizes", "mentioned"})
    outputs = (Output("", True, field="coverage"),)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("coverage", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")

    def item_values(self, ctx: ItemContext) -> list[dict[str, Any] | None]:
        ctx.require(self.needs, "ContextCoverage")
        vals = context_coverage(ctx.maps, ctx.mentioned, ctx.sizes).tolist()
        return [None if v != v else {"coverage": v} for v in vals]

    def update(self, maps: Tensor | None = None, mentioned: Sequence[Tensor] | None = None,
               sizes: Tensor | None = None, *,
               records: Sequence[dict[str, Any] | None] | None = None) -> None:  # fmt: skip
        if records is None:
            records = [None if v != v else {"coverage": v} for v in context_coverage(maps, mentioned, sizes).tolist()]
        for r in records:
            if r:
                self.coverage += float(r["coverage"])
                self.total += 1

    def compute(self) -> Tensor:
        return self.coverage / self.total if self.total > 0 else torch.tensor(float("nan"))


def auroc(pos: Tensor, neg: Tensor) -> Tensor:
    """P(a positive's score > a negative's) + ½ P(equal): the Mann-Whitney form of the ROC area (NaN when a side
    is empty).

    Example:
        >>> auroc(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 2.0]))
        tensor(0.8750)
    """
    if pos.numel() == 0 or neg.numel() == 0:
        return torch.tensor(float("nan"))
    allv = torch.cat([pos.double(), neg.double()])
    # mid-ranks: a group of c tied values ending at rank e (1-based) all get e - (c - 1) / 2
    _, group, counts = torch.unique(allv, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[group]
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return (u / (len(pos) * len(neg))).float()


class AbsentEvidence(Metric):
    """Unnormalised evidence for present vs absent prompts (module docstring); ``compute()`` -> {"auroc",
    "paired"}. ``seed``: the absent prompts' draw (as the other trust metrics')."""

    full_state_update = False
    needs = frozenset({"evidence"})
    outputs = (Output("auroc", True), Output("paired", True, field="paired"))

    def __init__(self, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed = int(seed)
        self.add_state("present", [], dist_reduce_fx="cat")
        self.add_state("absent", [], dist_reduce_fx="cat")
        self.add_state("paired_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("paired_total", torch.tensor(0.0), dist_reduce_fx="sum")

    def item_values(self, ctx: ItemContext) -> list[dict[str, Any]]:
        ctx.require(self.needs, "AbsentEvidence")
        out = []
        for present, absent, first in ctx.evidence(self.seed):
            rec: dict[str, Any] = {"present": present, "absent": absent, "first": first}
            if absent is not None:
                rec["paired"] = 1.0 if present > absent else 0.5 if present == absent else 0.0
            out.append(rec)
        return out

    def update(self, *, records: Sequence[dict[str, Any]]) -> None:
        for r in records:
            self.present.append(torch.tensor([float(r["present"])]))
            if r.get("absent") is not None:
                if r.get("first"):
                    self.absent.append(torch.tensor([float(r["absent"])]))
                self.paired_sum += float(r["paired"])
                self.paired_total += 1

    def compute(self) -> dict[str, Tensor]:
        pos = dim_zero_cat(self.present) if self.present else torch.zeros(0)
        neg = dim_zero_cat(self.absent) if self.absent else torch.zeros(0)
        paired = self.paired_sum / self.paired_total if self.paired_total > 0 else torch.tensor(float("nan"))
        return {"auroc": auroc(pos, neg), "paired": paired}
