"""Per-item values of the trust metrics, which need more than an item's own map and boxes.

* :class:`~mmel.metrics.PromptSpecificity` needs the image's *other* objects (every other record of the same
  image in the split, whatever chunk it is in) and, with ``absent=True``, the map of a prompt naming a category
  absent from the image;
* :class:`~mmel.metrics.PromptRandomisation` compares each item's map with that absent prompt's map;
* :class:`~mmel.metrics.ModelRandomisation` re-explains the batch with randomised copies of the model
  (:func:`mmel.metrics.sanity.randomised_copies`; the explainer is rebuilt on each copy by the program's factory,
  so MMEL applies its trained HSRM to the randomised CLIP's evidence, as in use).

The absent category of an image is drawn from the split's categories the image does not have, by a generator
seeded with (the metric's ``seed``, a CRC of the image id): the same image gets the same absent prompt in every
chunk, process and resume. Its specificity value is recorded once, on the image's first record of the split.
Set-dependent explainers (:attr:`Explainer.set_dependent`) explain the absent prompt among the image's own prompts.

Record fields (``items.jsonl``, under ``metrics.<name>``): prompt_specificity ``{"named", "other", "kind", "hard",
"absent"}`` (kind 0: the image has no other object, 1: counted; ``absent``: ``{"prompt", "on_object"}`` or null);
prompt_randomisation ``{"prompt", <measure>...}`` (null when the image has every category); model_randomisation
``{"steps": [...], <mode>: {<measure>: [one value per step]}}``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmel.metrics import ModelRandomisation, PromptRandomisation, PromptSpecificity
from mmel.metrics.sanity import randomised_copies
from mmel.metrics.similarity import MEASURES, similarities
from mmel.metrics.specificity import _prompt_specificity_items, shares_attribute

TRUST_METRICS = (PromptSpecificity, PromptRandomisation, ModelRandomisation)
Explain = Callable[[Any, list[Tensor], list[list[str]]], list[Tensor]]  # (explainer, images, prompts) -> maps


class TrustScoring:
    """The trust metrics' per-item values for the evaluate engine (see the module docstring).

    Args:
        metrics: every metric of the run (the trust ones are picked out).
        records: the split's records (all of them: an image's objects may be spread over chunks).
        transform: the data module's BoxTransform (other objects' boxes go into the scored frame like the item's).
        keep: keep-size mode (scored in original pixels).
        factory: ``factory(clip=...) -> explainer`` (model randomisation rebuilds the explainer on each copy).
        clip: the loaded ClipBundle (never modified: copies are randomised).
    """

    def __init__(self, metrics: dict[str, Any], records: Sequence[Any], transform, keep: bool,
                 factory: Callable | None = None, clip=None) -> None:  # fmt: skip
        self.metrics = {n: m for n, m in metrics.items() if isinstance(m, TRUST_METRICS)}
        self.transform, self.keep, self.factory, self.clip = transform, keep, factory, clip
        self.objects: dict[str, list[tuple[str, str, np.ndarray]]] = {}
        self.first: dict[str, int] = {}
        self.prompt_of: dict[str, str] = {}
        for index, r in enumerate(records if self.metrics else ()):  # an index only when a trust metric is on
            iid = str(r.image_id)
            self.objects.setdefault(iid, []).append((str(r.category), r.prompt, np.asarray(r.boxes, np.float32)))
            self.first.setdefault(iid, index)
            self.prompt_of.setdefault(str(r.category), r.prompt)
        self.spec = self._one(PromptSpecificity)
        self.prand = self._one(PromptRandomisation)
        self.mrand = self._one(ModelRandomisation)
        if self.mrand is not None and (factory is None or clip is None):
            raise ValueError("evaluate: model_randomisation needs the explainer factory and the model")
        seeds = [m.seed for m in (self.spec, self.prand) if m is not None]
        self.seed = seeds[0] if seeds else 0

    def _one(self, cls) -> Any:
        found = [m for m in self.metrics.values() if isinstance(m, cls)]
        if len(found) > 1:
            raise ValueError(f"evaluate: the metrics config enables {cls.__name__} twice")
        return found[0] if found else None

    def __bool__(self) -> bool:
        return bool(self.metrics)

    def absent_prompt(self, image_id: str) -> str | None:
        """The seeded prompt of a category the image does not have (None when it has every category)."""
        present = {c for c, _, _ in self.objects.get(str(image_id), [])}
        pool = sorted(c for c in self.prompt_of if c not in present)
        if not pool:
            return None
        rng = np.random.default_rng([self.seed, zlib.crc32(str(image_id).encode())])
        return self.prompt_of[pool[int(rng.integers(len(pool)))]]

    def _frame(self, boxes: np.ndarray, size: tuple[int, int]) -> Tensor:
        b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        return b if self.keep else self.transform.boxes(b, size, count=False)

    def item_values(
        self,
        batch: dict[str, Any],
        groups: list[list[int]],
        images: list[Tensor],
        maps: list[Tensor],
        boxes: list[Tensor],
        sizes: Tensor,
        explainer,
        explain: Explain,
    ) -> list[dict[str, dict[str, Any] | None]]:
        """Per item (in group order, as ``boxes`` / ``sizes``): {trust metric name: its record fields}."""
        order = [i for idx in groups for i in idx]
        item_maps = [m.float().cpu()[k] for idx, m in zip(groups, maps, strict=True) for k in range(len(idx))]
        group_of = [g for g, idx in enumerate(groups) for _ in idx]
        out: list[dict[str, Any]] = [{} for _ in order]
        absent_maps: list[Tensor | None] = [None] * len(groups)
        absent = [None] * len(groups)
        if self.prand is not None or (self.spec is not None and self.spec.absent):
            absent, absent_maps = self._absent_maps(batch, groups, images, explainer, explain)
        if self.spec is not None:
            name = self._name(self.spec)
            for j, rec in enumerate(self._specificity(batch, order, group_of, item_maps, boxes, sizes, absent,
                                                      absent_maps)):  # fmt: skip
                out[j][name] = rec
        if self.prand is not None:
            has = [j for j in range(len(order)) if absent_maps[group_of[j]] is not None]
            sims = pairwise([item_maps[j] for j in has], [absent_maps[group_of[j]] for j in has])
            for j in range(len(order)):
                out[j][self._name(self.prand)] = None
            for j, sim in zip(has, sims, strict=True):
                out[j][self._name(self.prand)] = {"prompt": absent[group_of[j]], **sim}
        if self.mrand is not None:
            for j, rec in enumerate(self._randomised(groups, images, item_maps, batch, explain)):
                out[j][self._name(self.mrand)] = rec
        return out

    def _name(self, metric) -> str:
        return next(n for n, m in self.metrics.items() if m is metric)

    def _absent_maps(self, batch, groups, images, explainer, explain) -> tuple[list, list]:
        """Each group's absent prompt and its map [h, w] (None where the image has every category)."""
        prompts = [self.absent_prompt(str(batch["image_id"][idx[0]])) for idx in groups]
        todo = [g for g, p in enumerate(prompts) if p is not None]
        maps: list[Tensor | None] = [None] * len(groups)
        if todo:
            asked = []
            for g in todo:
                own = [p for _, p, _ in self.objects[str(batch["image_id"][groups[g][0]])]]
                asked.append([*own, prompts[g]] if explainer.set_dependent else [prompts[g]])
            for g, m in zip(todo, explain(explainer, [images[g] for g in todo], asked), strict=True):
                maps[g] = m[-1].float().cpu()
        return prompts, maps

    def _specificity(self, batch, order, group_of, item_maps, boxes, sizes, absent, absent_maps) -> list[dict]:
        """Per item: its specificity record; the batch's pairs (and its images' absent-prompt maps) scored at once,
        one pass per map shape."""
        recs: list[dict[str, Any]] = []
        other, every, first = [], [], []
        for j, i in enumerate(order):
            iid, cat = str(batch["image_id"][i]), str(batch["category"][i])
            size = tuple(int(v) for v in batch["size"][i])
            objs = self.objects[iid]
            others = [(c, b) for c, _, b in objs if c != cat]
            other.append(self._frame(np.concatenate([b for _, b in others]), size) if others else torch.zeros(0, 4))
            hard = shares_attribute(cat, [c for c, _ in others], self.spec.hard)
            recs.append({"named": None, "other": None, "kind": None, "hard": hard, "absent": None})
            if absent_maps[group_of[j]] is not None and int(batch["index"][i]) == self.first[iid]:  # once per image
                first.append(j)
                every.append(self._frame(np.concatenate([b for _, _, b in objs]), size))
        for js in _same_shape(item_maps, range(len(order))):
            maps = torch.stack([item_maps[j] for j in js])
            v = _prompt_specificity_items(maps, [boxes[j] for j in js], [other[j] for j in js], sizes[js])
            for k, j in enumerate(js):
                recs[j].update(named=float(v["named"][k]), other=float(v["other"][k]), kind=int(v["kind"][k]))
        absent_of = [absent_maps[group_of[j]] for j in first]
        for ks in _same_shape(absent_of, range(len(first))):
            maps, js = torch.stack([absent_of[k] for k in ks]), [first[k] for k in ks]
            a = _prompt_specificity_items(maps, [torch.zeros(0, 4)] * len(ks), [every[k] for k in ks], sizes[js])
            for k, j in enumerate(js):
                if int(a["kind"][k]) == 2:
                    recs[j]["absent"] = {"prompt": absent[group_of[j]], "on_object": float(a["other"][k])}
        return recs

    def _randomised(self, groups, images, item_maps, batch, explain) -> list[dict[str, Any]]:
        """Per item: {"steps": [...], mode: {measure: [similarity after each step]}}."""
        prompts = [[batch["prompt"][i] for i in idx] for idx in groups]
        recs: list[dict[str, Any]] = [{"steps": []} for _ in item_maps]
        for mode in self.mrand.modes:
            steps, per_step = [], []
            for step, rclip in randomised_copies(self.clip, mode, self.mrand.seed):
                rmaps = explain(self.factory(clip=rclip), images, prompts)
                flat = [m.float().cpu()[k] for idx, m in zip(groups, rmaps, strict=True) for k in range(len(idx))]
                steps.append(step)
                per_step.append(pairwise(item_maps, flat))
            for j, rec in enumerate(recs):
                rec["steps"] = steps
                rec[mode] = {m: [s[j][m] for s in per_step] for m in MEASURES}
        return recs


def _same_shape(maps: Sequence[Tensor], which: Sequence[int]) -> list[list[int]]:
    """The ``which`` entries grouped by their map's shape (first-seen order)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for j in which:
        groups.setdefault(tuple(maps[j].shape), []).append(j)
    return list(groups.values())


def pairwise(a: Sequence[Tensor], b: Sequence[Tensor]) -> list[dict[str, float]]:
    """Every measure for map pairs (a[j], b[j]) of possibly different shapes (one batched call per shape)."""
    out: list[dict[str, float]] = [{} for _ in a]
    for js in _same_shape(a, range(len(a))):
        sims = similarities(torch.stack([a[j] for j in js]), torch.stack([b[j] for j in js]))
        for k, j in enumerate(js):
            out[j] = {m: float(v[k]) for m, v in sims.items()}
    return out


def replay_trust(metric, vals: list[dict[str, Any] | None]) -> None:
    """Update a fresh trust ``metric`` with its per-item record fields (``vals``, one per scored record)."""
    if isinstance(metric, PromptSpecificity):
        rows = [(v["named"], v["other"], v["kind"], v["hard"]) for v in vals]
        rows += [(0.0, v["absent"]["on_object"], 2, False) for v in vals if v.get("absent")]
        named, other, kind, hard = (list(c) for c in zip(*rows, strict=True)) if rows else ([], [], [], [])
        metric.update_values(torch.tensor(named, dtype=torch.float32), torch.tensor(other, dtype=torch.float32),
                             torch.tensor(kind, dtype=torch.long), torch.tensor(hard, dtype=torch.bool))  # fmt: skip
    elif isinstance(metric, PromptRandomisation):
        rows = [[v[m] for m in MEASURES] for v in vals if v is not None]
        metric.update_values(torch.tensor(rows, dtype=torch.float32).reshape(-1, len(MEASURES)))
    elif isinstance(metric, ModelRandomisation):
        vals = [v for v in vals if v is not None and v.get("steps")]
        for mode in metric.modes:
            if vals:
                values = torch.tensor([[[v[mode][m][s] for m in MEASURES] for s in range(len(v["steps"]))]
                                       for v in vals], dtype=torch.float32)  # fmt: skip
                metric.update_values(mode, values, vals[0]["steps"])
