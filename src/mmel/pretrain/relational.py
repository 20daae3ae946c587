"""Pretraining on the relational shapes world: captions that name objects by relations, with hard negatives.

Each item is a relational scene (:mod:`mmel.data.shapes.relations`) from the ``pretrain`` stream — as a full image
(both look-alikes) or, half the time, as the counterfactual without one referral's look-alike. Its caption is, half
the time, a referring expression true of the image, else a plain caption naming one or two visible objects; its
*hard negative* is the same expression with the relation swapped (false on a counterfactual image, true on a full
one), or a plain caption naming an absent category. Which caption is true of which image of the batch is decided
exactly, from the scenes (:func:`mmel.data.shapes.relations.true_of` for expressions, the visible categories for
plain captions), and given to the multi-positive loss as the match matrix — a swapped expression is a negative
only where it is false. That is what should teach word order: "left of" and "right of" differ by one word and
the loss cares only on the images where exactly one of them holds.

:func:`relational_knowledge` measures what the model learnt: on each counterfactual image, does it score the true
expression above the swapped one (chance 0.5) — the "model knows" test that relational explanations are read
against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from mmel.data.shapes.relations import SWAP, RelationalScene, relational_scene, true_of
from mmel.data.shapes.world import CATEGORIES, category_phrase, decode_jpeg, encode_jpeg, image_rng, join_phrases
from mmel.pretrain.data import object_hot, to_tensor

Visible = list[tuple[tuple[str, str], tuple[int, ...]]]  # an image's visible ((colour, shape), box)


@dataclass(frozen=True)
class Caption:
    """A caption and what makes it true: ``relation`` (target, anchor) for an expression, else the named
    categories (all must be visible)."""

    text: str
    relation: str | None = None
    target: tuple[str, str] | None = None
    anchor: tuple[str, str] | None = None
    named: tuple[tuple[str, str], ...] = ()

    def true_of(self, visible: Visible) -> bool:
        if self.relation is not None:
            return true_of(visible, self.relation, self.target, self.anchor)
        present = {tuple(c) for c, _ in visible}
        return all(tuple(c) in present for c in self.named)


def visible_objects(rs: RelationalScene) -> Visible:
    return [((o.colour, o.shape), o.box) for i, o in enumerate(rs.scene.objects) if i not in rs.hidden]


def item_scene(seed: int, stream: str, index: int, image_size: int, counterfactual: float = 0.5
               ) -> tuple[RelationalScene, np.random.Generator]:  # fmt: skip
    """Scene ``index`` of ``stream``: full or (with probability ``counterfactual``) counterfactual, JPEG round trip
    as stored; the generator (its own stream of draws) chooses the captions."""
    rng = image_rng(seed, stream, 1_000_000 + index)  # never the scene's own generator
    hide = int(rng.integers(2)) if rng.random() < counterfactual else None
    rs = relational_scene(seed, stream, index, size=image_size, hide_for=hide)
    pixels = np.asarray(decode_jpeg(encode_jpeg(rs.scene.pixels)))
    scene = type(rs.scene)(pixels=pixels, objects=rs.scene.objects, masks=rs.scene.masks)
    return RelationalScene(scene, rs.kind, rs.referrals, rs.hidden), rng


def captions(rs: RelationalScene, rng: np.random.Generator, relational: float = 0.5) -> tuple[Caption, Caption]:
    """The item's caption (true of its image) and its hard negative; an expression with probability
    ``relational``, else a plain caption."""
    if rs.hidden:  # the counterfactual: the referral whose look-alike is hidden is the true one
        k = next(i for i, r in enumerate(rs.referrals) if r.referent not in rs.hidden)
    else:
        k = int(rng.integers(2))
    if rng.random() < relational:
        r = rs.referrals[k]
        true = Caption(r.expression, r.relation, r.target, r.anchor)
        neg = Caption(r.swapped, SWAP[r.relation], r.target, r.anchor)
        return true, neg
    present = sorted({c for c, _ in visible_objects(rs)})
    n = int(rng.integers(1, min(2, len(present)) + 1))
    named = [present[int(i)] for i in rng.permutation(len(present))[:n]]
    absent = [c for c in CATEGORIES if c not in present]
    other = absent[int(rng.integers(len(absent)))]
    true = Caption(join_phrases([category_phrase(*c) for c in named]), named=tuple(named))
    neg_named = [*named[:-1], other]
    return true, Caption(join_phrases([category_phrase(*c) for c in neg_named]), named=tuple(neg_named))


class RelationalCaptionStream(Dataset):
    """Items: {image [3,S,S], caption, negative (Caption), visible objects, image_objects [C]}; deterministic."""

    def __init__(self, seed: int, length: int, mean: Sequence[float], std: Sequence[float], image_size: int = 64,
                 stream: str = "pretrain", counterfactual: float = 0.5, relational: float = 0.5) -> None:  # fmt: skip
        self.seed, self.length, self.mean, self.std = seed, length, tuple(mean), tuple(std)
        self.image_size, self.stream = image_size, stream
        self.counterfactual, self.relational = counterfactual, relational

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        rs, rng = item_scene(self.seed, self.stream, index, self.image_size, self.counterfactual)
        caption, negative = captions(rs, rng, self.relational)
        visible = visible_objects(rs)
        return {
            "image": to_tensor(rs.scene.pixels, self.mean, self.std),
            "caption": caption,
            "negative": negative,
            "visible": visible,
            "image_objects": object_hot([o for i, o in enumerate(rs.scene.objects) if i not in rs.hidden]),
        }


def collate(tokenizer: Callable[[list[str]], torch.Tensor]) -> Callable[[list[dict]], dict]:
    """Batches of B items -> images [B,3,S,S], tokens [2B, L] (captions, then negatives), matches [B, 2B] (exact:
    caption t is true of image i), image_objects [B, C], pairs [B] (item i's negative is a relation swap false of
    its own image: the items the pair term of :class:`mmel.pretrain.module.TinyClipPretrainer` contrasts)."""

    def make(items: list[dict]) -> dict:
        texts = [it["caption"] for it in items] + [it["negative"] for it in items]
        matches = torch.tensor([[t.true_of(it["visible"]) for t in texts] for it in items])
        return {
            "images": torch.stack([it["image"] for it in items]),
            "tokens": tokenizer([t.text for t in texts]),
            "matches": matches,
            "image_objects": torch.stack([it["image_objects"] for it in items]),
            "pairs": torch.tensor(
                [
                    it["negative"].relation is not None and not bool(matches[i, len(items) + i])
                    for i, it in enumerate(items)
                ]
            ),  # fmt: skip
        }

    return make


@torch.no_grad()
def relational_knowledge(model, tokenizer, mean, std, seed: int, split: str = "val", n: int = 120,
                         image_size: int = 64) -> dict:  # fmt: skip
    """On each counterfactual image (one look-alike hidden), whether ``model`` scores the true expression above
    the swapped one. Returns {"accuracy", "by_kind": {kind: accuracy}, "items": [(index, k, known)]}."""
    from collections import defaultdict

    images, texts, meta = [], [], []
    for index in range(n):
        for k in (0, 1):
            rs = relational_scene(seed, split, index, size=image_size, hide_for=k)
            r = rs.referrals[k]
            images.append(to_tensor(np.asarray(decode_jpeg(encode_jpeg(rs.scene.pixels))), mean, std))
            texts += [r.expression, r.swapped]
            meta.append((index, k, rs.kind))
    device = next(model.parameters()).device
    img = torch.nn.functional.normalize(model.encode_image(torch.stack(images).to(device)).float(), dim=-1)
    txt = torch.nn.functional.normalize(model.encode_text(tokenizer(texts).to(device)).float(), dim=-1)
    txt = txt.view(len(images), 2, -1)
    scores = (img[:, None] * txt).sum(-1)  # [N, 2]: true, swapped
    known = (scores[:, 0] > scores[:, 1]).tolist()
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for (_, _, kind), ok in zip(meta, known, strict=True):
        by_kind[kind].append(ok)
    return {
        "accuracy": float(np.mean(known)),
        "by_kind": {kind: float(np.mean(v)) for kind, v in sorted(by_kind.items())},
        "items": [(i, k, bool(ok)) for (i, k, _), ok in zip(meta, known, strict=True)],
    }
