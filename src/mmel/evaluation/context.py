"""What a batch of the evaluate engine offers its metrics (:class:`mmel.metrics.protocol.ItemContext`), including
the trust entries that need more than an item's own map and boxes.

* ``others()`` — the image's other objects (every record of the same image in the split, whatever chunk it is
  in), boxes mapped into the scored frame like the item's own, with their categories;
* ``absent(seed)`` — per image, the prompt of a category absent from it and that prompt's map: drawn from the
  split's categories the image does not have by a generator seeded with (``seed``, a CRC of the image id), so the
  same image gets the same absent prompt in every chunk, process and resume. Set-dependent explainers
  (:attr:`Explainer.set_dependent`) explain it among the image's own prompts. Each item also says whether it is
  its image's first record of the split (what is recorded once per image is recorded there);
* ``evidence(seed)`` — per item, the explainer's unnormalised evidence (:meth:`Explainer.evidence`) for its own
  prompt and for its image's absent prompt (the one ``absent(seed)`` draws; None when the image has every
  category), explained together per image, and whether the item is its image's first;
* ``randomised(mode, seed)`` — the batch re-explained with each randomised copy of the model
  (:func:`mmel.metrics.sanity.randomised_copies`; the explainer is rebuilt on each copy by the program's factory,
  so MMEL applies its trained HSRM to the randomised CLIP's evidence, as in use). The loaded model is never
  modified.

Each entry is computed once per batch, when a metric first asks for it, and only then.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmel.metrics.protocol import ItemContext
from mmel.metrics.sanity import randomised_copies

TRUST_NEEDS = frozenset({"others", "absent", "randomised", "evidence"})
Explain = Callable[[Any, list[Tensor], list[list[str]]], list[Tensor]]  # (explainer, images, prompts) -> maps


class SplitObjects:
    """The split's objects per image, for the trust entries (built once per run, only when a metric needs them).

    Args:
        records: the split's records (all of them: an image's objects may be spread over chunks).
        transform: the data module's BoxTransform (other objects' boxes go into the scored frame like the item's).
        keep: keep-size mode (scored in original pixels).
        factory: ``factory(clip=...) -> explainer`` (``randomised`` rebuilds the explainer on each copy).
        clip: the loaded ClipBundle (never modified: copies are randomised).
    """

    def __init__(self, records: Sequence[Any], transform, keep: bool, factory: Callable | None = None,
                 clip=None) -> None:  # fmt: skip
        self.transform, self.keep, self.factory, self.clip = transform, keep, factory, clip
        self.objects: dict[str, list[tuple[str, str, np.ndarray]]] = {}
        self.first: dict[str, int] = {}
        self.prompt_of: dict[str, str] = {}
        for index, r in enumerate(records):
            iid = str(r.image_id)
            self.objects.setdefault(iid, []).append((str(r.category), r.prompt, np.asarray(r.boxes, np.float32)))
            self.first.setdefault(iid, index)
            self.prompt_of.setdefault(str(r.category), r.prompt)

    def absent_prompt(self, image_id: str, seed: int) -> str | None:
        """The seeded prompt of a category the image does not have (None when it has every category)."""
        present = {c for c, _, _ in self.objects.get(str(image_id), [])}
        pool = sorted(c for c in self.prompt_of if c not in present)
        if not pool:
            return None
        rng = np.random.default_rng([seed, zlib.crc32(str(image_id).encode())])
        return self.prompt_of[pool[int(rng.integers(len(pool)))]]

    def frame(self, boxes: np.ndarray, size: tuple[int, int]) -> Tensor:
        b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        return b if self.keep else self.transform.boxes(b, size, count=False)


class BatchTrust:
    """The trust entries of one batch (see the module docstring), each computed on first use and kept.

    Args:
        split: the run's :class:`SplitObjects`.
        batch: the collated batch; groups: batch indices per image (one explainer row each); images: one per group.
        explainer: the run's; explain: the engine's batched explain.
    """

    def __init__(self, split: SplitObjects, batch: dict[str, Any], groups: list[list[int]], images: list[Tensor],
                 explainer, explain: Explain) -> None:  # fmt: skip
        self.split, self.batch, self.groups, self.images = split, batch, groups, images
        self.explainer, self.explain = explainer, explain
        self.order = [i for idx in groups for i in idx]
        self.group_of = [g for g, idx in enumerate(groups) for _ in idx]
        self._cache: dict[Any, Any] = {}

    def _once(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def others(self) -> list[tuple[Tensor, list[str], Tensor]]:
        return self._once("others", self._others)

    def absent(self, seed: int) -> list[tuple[str | None, Tensor | None, bool]]:
        return self._once(("absent", seed), lambda: self._absent(seed))

    def randomised(self, mode: str, seed: int) -> tuple[list[str], list[list[Tensor]]]:
        return self._once(("randomised", mode, seed), lambda: self._randomised(mode, seed))

    def evidence(self, seed: int) -> list[tuple[float, float | None, bool]]:
        return self._once(("evidence", seed), lambda: self._evidence(seed))

    def context(self, ctx: ItemContext, js: Sequence[int]) -> ItemContext:
        """``ctx`` (the items ``js`` of the batch, in group order) with the trust entries restricted to them."""
        ctx.others = lambda: [self.others()[j] for j in js]
        ctx.absent = lambda seed: [self.absent(seed)[j] for j in js]
        ctx.evidence = lambda seed: [self.evidence(seed)[j] for j in js]

        def randomised(mode: str, seed: int) -> tuple[list[str], list[list[Tensor]]]:
            steps, per_step = self.randomised(mode, seed)
            return steps, [[maps[j] for j in js] for maps in per_step]

        ctx.randomised = randomised
        return ctx

    # ------------------------------------------------------------------------------------------------ makers
    def _others(self) -> list[tuple[Tensor, list[str], Tensor]]:
        out = []
        for i in self.order:
            iid, cat = str(self.batch["image_id"][i]), str(self.batch["category"][i])
            size = tuple(int(v) for v in self.batch["size"][i])
            objs = self.split.objects[iid]
            rest = [(c, b) for c, _, b in objs if c != cat]
            other = self.split.frame(np.concatenate([b for _, b in rest]), size) if rest else torch.zeros(0, 4)
            every = self.split.frame(np.concatenate([b for _, _, b in objs]), size)
            out.append((other, [c for c, _ in rest], every))
        return out

    def _absent(self, seed: int) -> list[tuple[str | None, Tensor | None, bool]]:
        prompts = [self.split.absent_prompt(str(self.batch["image_id"][idx[0]]), seed) for idx in self.groups]
        todo = [g for g, p in enumerate(prompts) if p is not None]
        maps: list[Tensor | None] = [None] * len(self.groups)
        if todo:
            asked = []
            for g in todo:
                own = [p for _, p, _ in self.split.objects[str(self.batch["image_id"][self.groups[g][0]])]]
                asked.append([*own, prompts[g]] if self.explainer.set_dependent else [prompts[g]])
            for g, m in zip(todo, self.explain(self.explainer, [self.images[g] for g in todo], asked), strict=True):
                maps[g] = m[-1].float().cpu()
        out = []
        for j, i in enumerate(self.order):
            g = self.group_of[j]
            first = int(self.batch["index"][i]) == self.split.first[str(self.batch["image_id"][i])]
            out.append((prompts[g], maps[g], first))
        return out

    def _evidence(self, seed: int) -> list[tuple[float, float | None, bool]]:
        per_group = []
        for g, idx in enumerate(self.groups):
            iid = str(self.batch["image_id"][idx[0]])
            own = [self.batch["prompt"][i] for i in idx]
            absent = self.split.absent_prompt(iid, seed)
            asked = [*own, absent] if absent is not None else own
            with torch.enable_grad() if self.explainer.needs_grad else torch.no_grad():
                ev = self.explainer.evidence(self.images[g][None], asked)[0].tolist()
            per_group.append((ev[: len(own)], ev[len(own)] if absent is not None else None))
        out = []
        for g, idx in enumerate(self.groups):
            own, absent = per_group[g]
            for k, i in enumerate(idx):
                first = int(self.batch["index"][i]) == self.split.first[str(self.batch["image_id"][i])]
                out.append((float(own[k]), absent, first))
        return out

    def _randomised(self, mode: str, seed: int) -> tuple[list[str], list[list[Tensor]]]:
        if self.split.factory is None or self.split.clip is None:
            raise ValueError("evaluate: model randomisation needs the explainer factory and the model")
        prompts = [[self.batch["prompt"][i] for i in idx] for idx in self.groups]
        steps, per_step = [], []
        for step, rclip in randomised_copies(self.split.clip, mode, seed):
            rmaps = self.explain(self.split.factory(clip=rclip), self.images, prompts)
            per_step.append([m.float().cpu()[k] for idx, m in zip(self.groups, rmaps, strict=True)
                             for k in range(len(idx))])  # fmt: skip
            steps.append(step)
        return steps, per_step
