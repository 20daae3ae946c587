"""Quality of the tiny CLIP on held-out shapes: zero-shot naming, and where Grad-ECLIP says it looks.

Used during pretraining (zero-shot check on the val stream) and by the quality gates (tests/test_tiny_quality.py).
Pointing uses tolerance 0 px (the peak must lie inside the box): the usual 15 px of 224-px benchmarks would be a
quarter of a 64-px image and let random maps score about half the time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from mmel.data.shapes.world import CATEGORIES, category_phrase
from mmel.explainers.base import to_image_maps
from mmel.metrics import energy_pointing_game, pointing_game
from mmel.pretrain.data import to_tensor


def category_prompts() -> list[str]:
    """One prompt per category, worded as the captions word it ("a red circle"); index = category_id - 1."""
    return [category_phrase(c, s) for c, s in CATEGORIES]


@torch.no_grad()
def zero_shot_scores(model: nn.Module, tokens: torch.Tensor, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Cosine similarities [N, K] of images [N, 3, S, S] against the K tokenised prompts [K, L]."""
    text = nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)
    out = []
    for chunk in images.split(batch):
        out.append(nn.functional.normalize(model.encode_image(chunk).float(), dim=-1) @ text.T)
    return torch.cat(out)


def top1_present(scores: torch.Tensor, image_objects: torch.Tensor) -> float:
    """Fraction of images whose best prompt (scores [N, C]) names a present object (image_objects [N, C])."""
    best = scores.argmax(1)
    return image_objects.gather(1, best[:, None]).squeeze(1).float().mean().item()


@dataclass
class HeldOut:
    """Held-out images of a shapes world split with their objects.

    images [N, 3, S, S] normalised; objects: per image a list of (category index, box xyxy [4]).
    """

    images: torch.Tensor
    objects: list[list[tuple[int, torch.Tensor]]]

    @property
    def object_hot(self) -> torch.Tensor:
        """Multi-hot [N, C] of the categories present in each image."""
        hot = torch.zeros(len(self.objects), len(CATEGORIES))
        for i, objs in enumerate(self.objects):
            for c, _ in objs:
                hot[i, c] = 1.0
        return hot


def load_held_out(clip, world_root: str | Path, split: str = "test", limit: int | None = None) -> HeldOut:
    """The first ``limit`` images of ``split`` of a shapes world on disk (COCO format), as the CLIP sees them."""
    coco_dir = Path(world_root) / "coco"
    data = json.loads((coco_dir / "annotations" / f"instances_{split}.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    index = {f"{c} {s}": i for i, (c, s) in enumerate(CATEGORIES)}
    by_image: dict[int, list] = {img["id"]: [] for img in data["images"]}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        by_image[a["image_id"]].append((index[names[a["category_id"]]], torch.tensor([x, y, x + w, y + h]).float()))
    images, objects = [], []
    for img in data["images"][:limit]:
        pil = Image.open(coco_dir / split / img["file_name"]).convert("RGB")
        if pil.size != tuple(clip.image_size):
            raise ValueError(f"{img['file_name']}: {pil.size} px, but {clip.name} takes {clip.image_size}.")
        images.append(to_tensor(pil, clip.mean, clip.std))
        objects.append(by_image[img["id"]])
    return HeldOut(torch.stack(images), objects)


def _box_mass(maps: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Share of each map's mass (maps [..., H, W]) inside the box (pixels with positive overlap)."""
    x0, y0 = int(box[0].floor()), int(box[1].floor())
    x1, y1 = int(box[2].ceil()), int(box[3].ceil())
    return maps[..., y0:y1, x0:x1].sum((-1, -2)) / maps.sum((-1, -2)).clamp(min=1e-12)


def grounding_report(clip, held: HeldOut, explainer, batch: int = 50, seed: int = 0) -> dict[str, float]:
    """Zero-shot and localisation numbers of ``clip`` on ``held`` (maps for every present object's prompt).

    * top1_present: zero-shot top-1 over the category prompts names a present object.
    * pointing_game / random_pointing_game: peak inside the named object's box (tolerance 0 px), for the
      explainer and for uniform random maps on the patch grid, upsampled like the explainer's.
    * energy / box_share: mean mass inside the named box and mean share of the image the box covers.
    * beats_other_colour / beats_same_colour: over (named object, other object) pairs in one image, how often the
      named box holds more mass than the other box, when the other has a different colour / the same colour
      (then necessarily a different shape).
    """
    prompts = category_prompts()
    scores = zero_shot_scores(clip.model, clip.tokenize(prompts), held.images)
    gen = torch.Generator().manual_seed(seed)
    maps, rand, boxes, shares = [], [], [], []
    wins: dict[str, list[bool]] = {"other_colour": [], "same_colour": []}
    size = held.images.shape[-2:]
    for start in range(0, len(held.objects), batch):
        chunk = held.images[start : start + batch]
        m = explainer(chunk, prompts)  # [b, C, H, W]
        grid = (size[0] // clip.patch_size, size[1] // clip.patch_size)
        r = to_image_maps(torch.rand(len(chunk), len(prompts), *grid, generator=gen), size)
        for j, objs in enumerate(held.objects[start : start + batch]):
            for c, box in objs:
                maps.append(m[j, c])
                rand.append(r[j, c])
                boxes.append(box[None])
                shares.append(float((box[2] - box[0]) * (box[3] - box[1])) / (size[0] * size[1]))
                for c2, box2 in objs:
                    if c2 != c:
                        same = CATEGORIES[c2][0] == CATEGORIES[c][0]
                        won = bool(_box_mass(m[j, c], box) > _box_mass(m[j, c], box2))
                        wins["same_colour" if same else "other_colour"].append(won)
    maps_t, rand_t = torch.stack(maps), torch.stack(rand)
    return {
        "images": float(len(held.objects)),
        "pairs": float(len(maps)),
        "top1_present": top1_present(scores, held.object_hot),
        "pointing_game": pointing_game(maps_t, boxes, tolerance=0)["accuracy"].item(),
        "random_pointing_game": pointing_game(rand_t, boxes, tolerance=0)["accuracy"].item(),
        "energy": energy_pointing_game(maps_t, boxes).item(),
        "random_energy": energy_pointing_game(rand_t, boxes).item(),
        "box_share": sum(shares) / len(shares),
        "beats_other_colour": sum(wins["other_colour"]) / max(1, len(wins["other_colour"])),
        "other_colour_pairs": float(len(wins["other_colour"])),
        "beats_same_colour": sum(wins["same_colour"]) / max(1, len(wins["same_colour"])),
        "same_colour_pairs": float(len(wins["same_colour"])),
    }
