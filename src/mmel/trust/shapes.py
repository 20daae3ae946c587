"""Items for the trust checks on the shapes world: multi-object images, their objects, and seeded prompt choices.

Reads the COCO-format copy of the world (``<root>/coco``) directly: the checks need every object of an image at
once (the named one, the others, which share its colour), which the per-(image, category) datasets split apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmel.data.base import load_image
from mmel.data.coco import DEFAULT_TEMPLATE, load_coco


@dataclass
class ShapesItems:
    """N multi-object images of one split, ready for an explainer.

    images: [N, 3, S, S] preprocessed;  sizes: [N, 2] original (H, W);  objects[i]: list of (category, box [4]
    xyxy original pixels);  categories: every category name of the world (prompt order);  template: prompt text.
    """

    images: Tensor
    sizes: Tensor
    objects: list[list[tuple[str, Tensor]]]
    categories: list[str]
    template: str = DEFAULT_TEMPLATE

    def prompt(self, category: str) -> str:
        return self.template.format(category)

    @property
    def prompt_set(self) -> list[str]:
        """The prompt of every category, in category order."""
        return [self.prompt(c) for c in self.categories]

    def sanity_pairs(self, seed: int = 0) -> tuple[list[str], list[str]]:
        """One (true prompt, different-category prompt) per image: the first object's category and a seeded
        random category absent from the image."""
        rng = np.random.default_rng(seed)
        true, other = [], []
        for objs in self.objects:
            present = {c for c, _ in objs}
            absent = [c for c in self.categories if c not in present]
            true.append(self.prompt(objs[0][0]))
            other.append(self.prompt(absent[int(rng.integers(len(absent)))]))
        return true, other

    def specificity_pairs(self, seed: int = 0) -> dict:
        """Pairs for :class:`mmel.metrics.PromptSpecificity`: every object of every image as the named one
        (hard when another object shares its colour, the first word of the category), plus one seeded absent
        category per image. Returns {"image": [P] image index, "prompt": [P] prompt index into prompt_set,
        "boxes", "other_boxes": P tensors [M, 4], "hard": [P] bool}."""
        rng = np.random.default_rng(seed)
        out: dict = {"image": [], "prompt": [], "boxes": [], "other_boxes": [], "hard": []}
        for i, objs in enumerate(self.objects):
            for j, (cat, box) in enumerate(objs):
                rest = [o for k, o in enumerate(objs) if k != j]
                out["image"].append(i)
                out["prompt"].append(self.categories.index(cat))
                out["boxes"].append(box[None])
                out["other_boxes"].append(torch.stack([b for _, b in rest]))
                out["hard"].append(any(c.split()[0] == cat.split()[0] for c, _ in rest))
            present = {c for c, _ in objs}
            absent = [c for c in self.categories if c not in present]
            out["image"].append(i)
            out["prompt"].append(self.categories.index(absent[int(rng.integers(len(absent)))]))
            out["boxes"].append(torch.zeros(0, 4))
            out["other_boxes"].append(torch.stack([b for _, b in objs]))
            out["hard"].append(False)
        out["image"] = torch.tensor(out["image"])
        out["prompt"] = torch.tensor(out["prompt"])
        out["hard"] = torch.tensor(out["hard"])
        return out


def load_shapes_items(root: str | Path, split: str, n: int, preprocess, min_objects: int = 2) -> ShapesItems:
    """The first ``n`` images (by id) of ``<root>/coco/<split>`` with at least ``min_objects`` objects."""
    root = Path(root)
    coco = load_coco(root / "coco" / "annotations" / f"instances_{split}.json")
    cats = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    images, sizes, objects = [], [], []
    for iid in sorted(coco.imgs):
        anns = coco.imgToAnns.get(iid, [])
        if len(anns) < min_objects:
            continue
        info = coco.imgs[iid]
        img = load_image(root / "coco" / split / info["file_name"])
        images.append(preprocess(img))
        sizes.append((info["height"], info["width"]))
        objs = []
        for a in anns:
            x, y, w, h = a["bbox"]
            objs.append((cats[a["category_id"]], torch.tensor([x, y, x + w, y + h], dtype=torch.float32)))
        objects.append(objs)
        if len(images) == n:
            break
    if len(images) < n:
        raise ValueError(f"{root}/coco/{split}: only {len(images)} images with >= {min_objects} objects, asked {n}")
    categories = [cats[k] for k in sorted(cats)]
    return ShapesItems(torch.stack(images), torch.tensor(sizes), objects, categories)


def specificity_on_items(explainer, items: ShapesItems, seed: int = 0, batch_size: int = 16) -> dict[str, float]:
    """:class:`mmel.metrics.PromptSpecificity` of an explainer on the items' pairs (every category prompt of the
    world explained at once per image batch, so set-dependent explainers see the same set everywhere)."""
    from mmel.metrics import PromptSpecificity

    pairs = items.specificity_pairs(seed)
    metric = PromptSpecificity()
    prompts = items.prompt_set
    for lo in range(0, items.images.shape[0], batch_size):
        hi = min(lo + batch_size, items.images.shape[0])
        maps = explainer(items.images[lo:hi], prompts).detach().float().cpu()  # [b, C, H, W]
        sel = ((pairs["image"] >= lo) & (pairs["image"] < hi)).nonzero()[:, 0].tolist()
        metric.update(
            maps[pairs["image"][sel] - lo, pairs["prompt"][sel]],
            [pairs["boxes"][p] for p in sel],
            [pairs["other_boxes"][p] for p in sel],
            sizes=items.sizes[pairs["image"][sel]],
            hard=pairs["hard"][sel],
        )
    return {k: float(v) for k, v in metric.compute().items()}
