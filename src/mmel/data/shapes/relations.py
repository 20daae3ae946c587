"""The shapes world, relational edition: scenes whose referring expressions only a relation disambiguates.

Every scene holds a *look-alike pair*: two objects of the same colour and shape. An expression names one of them by
a relation to the rest of the scene, and the same words with the relation swapped name the other, so a map that
follows only the object's appearance cannot tell them apart (chance 0.5), while one that follows the words can:

============  ========================================================  ===========================================
kind          the referent                                              swapped (names the look-alike)
============  ========================================================  ===========================================
left / right  "the red circle left of the blue square" (anchor mentioned)  "... right of the blue square"
above / below "the red circle above the blue square"                    "... below the blue square"
size          "the red circle bigger than the blue square" (≥ 1.5 × its   "... smaller than the blue square"
              side; the look-alike ≤ 1 / 1.5 ×)
inside        "the red circle inside the green square" (a large anchor,  "the red circle outside the green square"
              the referent drawn within it)
next to       "the red circle next to the blue square" (gap ≤ 3 px)     "the red circle far from the blue square"
row           "the row of red circles" (three in a row: the group box)  "the single red circle"
============  ========================================================  ===========================================

Both members of the pair are referents of one expression each (two referrals per scene, each the other's
distractor). The anchor an expression mentions is its *context* object (context coverage is measured on it); other
objects of unrelated categories are clutter. Objects are larger than in the plain world (default sides 0.16-0.30 of
a 96 px image: 2-4 patches of 8 px a side) and a row spans most of the image, so granularity matters.

Geometry is exact and checked: ``holds(relation, a, b)`` on the rendered tight boxes is true for every referral's
(referent, anchor) and false for (distractor, anchor) — the generator rejects any scene where it is not
(``tests/test_relations_world.py``). Randomness: one generator per image, seeded by (seed, stream, index), as in the
plain world.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmel.data.shapes.world import (
    CATEGORIES,
    COLOUR_JITTER,
    COLOURS,
    GAP,
    SUPERSAMPLE,
    Scene,
    ShapeObject,
    _background,
    _object_mask,
    _tight_box,
    image_rng,
)

KINDS = ("left", "above", "size", "inside", "next to", "row")
# the words of each relation and of its swap (the swap of "left of" is "right of", ...)
SWAP = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
    "bigger than": "smaller than",
    "smaller than": "bigger than",
    "inside": "outside",
    "outside": "inside",
    "next to": "far from",
    "far from": "next to",
    "row": "single",
    "single": "row",
}
NEAR, FAR = 3, 10  # "next to": box gap ≤ NEAR px; "far from": box gap ≥ FAR px
SIZE_RATIO = 1.5  # "bigger than": the side of the drawing square ≥ 1.5 × the anchor's ("smaller than": ≤ 1 / 1.5 ×)
CONTAINERS = ("square", "circle", "diamond")  # anchors that can hold an object inside


@dataclass(frozen=True)
class Referral:
    """One referring expression: it names ``referent`` (an object index, or the group ``members`` for a row) by
    ``relation``; ``swapped`` is the same words with the relation swapped, naming ``distractor``, the look-alike.
    ``context``: the objects the expression mentions besides its referent (the anchor)."""

    expression: str
    swapped: str
    relation: str
    referent: int
    distractor: int
    target: tuple[str, str]  # (colour, shape) of the referent
    anchor: tuple[str, str] | None = None  # (colour, shape) of the mentioned context object
    context: tuple[int, ...] = ()
    members: tuple[int, ...] = ()  # a row: the objects of the group (referent is the first)
    box: tuple[int, int, int, int] | None = None  # a row: the union box of the group


@dataclass(frozen=True)
class RelationalScene:
    """A scene, its kind and its two referrals; ``hidden``: objects left unpainted (a counterfactual image)."""

    scene: Scene
    kind: str
    referrals: tuple[Referral, ...]
    hidden: frozenset[int] = frozenset()

    def referent_box(self, r: Referral) -> tuple[int, int, int, int]:
        return r.box if r.box is not None else self.scene.objects[r.referent].box

    def distractor_box(self, r: Referral) -> tuple[int, int, int, int]:
        other = next((x for x in self.referrals if x.referent == r.distractor), None)
        if other is not None and other.box is not None:
            return other.box
        return self.scene.objects[r.distractor].box


def look_alikes(referrals: tuple[Referral, ...], r: Referral) -> tuple[int, ...]:
    """The objects of ``r``'s look-alike: one object, or a whole row when the look-alike is the row."""
    other = next((x for x in referrals if x.referent == r.distractor and x is not r), None)
    return other.members if other is not None and other.members else (r.distractor,)


# ------------------------------------------------------------------------------------------------ geometry
def gap(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Chebyshev gap between two xyxy boxes (0 when they touch or overlap)."""
    dx = max(b[0] - a[2], a[0] - b[2], 0)
    dy = max(b[1] - a[3], a[1] - b[3], 0)
    return float(max(dx, dy))


def holds(relation: str, a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether ``a relation b`` holds for the tight boxes a, b (xyxy, x1/y1 exclusive); sizes compare the boxes'
    longer sides. (row / single are properties of a group, see :func:`describes`.)"""
    if relation in ("bigger than", "smaller than"):
        sa, sb = max(a[2] - a[0], a[3] - a[1]), max(b[2] - b[0], b[3] - b[1])
        return sa >= SIZE_RATIO * sb if relation == "bigger than" else sb >= SIZE_RATIO * sa
    if relation == "left of":
        return a[2] <= b[0]
    if relation == "right of":
        return a[0] >= b[2]
    if relation == "above":
        return a[3] <= b[1]
    if relation == "below":
        return a[1] >= b[3]
    if relation == "inside":
        return a[0] >= b[0] and a[1] >= b[1] and a[2] <= b[2] and a[3] <= b[3]
    if relation == "outside":
        return gap(a, b) > 0
    if relation == "next to":
        return gap(a, b) <= NEAR
    if relation == "far from":
        return gap(a, b) >= FAR
    raise ValueError(f"unknown relation {relation!r}; expected one of {sorted(SWAP)}")


# ------------------------------------------------------------------------------------------------ placement
Square = tuple[float, float, float]  # (x0, y0, side) of a drawing square


def _q(v: float) -> float:
    return float(round(v * SUPERSAMPLE) / SUPERSAMPLE)


def _free(sq: Square, others: list[Square], margin: float = GAP) -> bool:
    x0, y0, s = sq
    return all(x0 + s + margin <= a or a + t + margin <= x0 or y0 + s + margin <= b or b + t + margin <= y0
               for a, b, t in others)  # fmt: skip


def _random_square(rng: np.random.Generator, size: int, side: float, others: list[Square]) -> Square | None:
    for _ in range(80):
        sq = (_q(rng.uniform(1, size - 1 - side)), _q(rng.uniform(1, size - 1 - side)), side)
        if _free(sq, others):
            return sq
    return None


def _side(rng: np.random.Generator, size: int, lo: float, hi: float) -> float:
    return _q(rng.uniform(lo, hi) * size)


def _layout(rng: np.random.Generator, kind: str, size: int, lo: float, hi: float) -> dict | None:
    """Drawing squares of the pair (a, b), the anchor and, for a row, the group; None when it did not fit."""
    s = _side(rng, size, lo, hi)
    if kind in ("left", "above"):
        anchor = _random_square(rng, size, _side(rng, size, lo, hi), [])
        if anchor is None:
            return None
        ax, ay, at = anchor
        axis = 0 if kind == "left" else 1
        lo_room, hi_room = (ax, size - (ax + at)) if axis == 0 else (ay, size - (ay + at))
        if min(lo_room, hi_room) < s + GAP + 2:
            return None
        start = ax if axis == 0 else ay  # where the anchor begins along the axis
        spans = ((1, start - s - GAP), (start + at + GAP, size - 1 - s))  # before the anchor, after it
        pair = []
        for low, high in spans:
            along, across = _q(rng.uniform(low, high)), _q(rng.uniform(1, size - 1 - s))
            pair.append((along, across, s) if axis == 0 else (across, along, s))
        if not _free(pair[0], [anchor, pair[1]]) or not _free(pair[1], [anchor]):
            return None
        return {"pair": pair, "anchor": anchor}
    if kind == "size":  # the anchor between the two: one look-alike ≥ 1.6 × its side, the other ≤ 1 / 1.6 ×
        mid = _q(size * rng.uniform(0.15, 0.19))
        big, small = _q(mid * rng.uniform(1.65, 1.95)), _q(mid / rng.uniform(1.65, 1.95))
        anchor = _random_square(rng, size, mid, [])
        a = _random_square(rng, size, big, [anchor]) if anchor else None
        b = _random_square(rng, size, small, [anchor, a]) if a else None
        return {"pair": [a, b], "anchor": anchor} if b else None
    if kind == "inside":
        outer = _q(rng.uniform(0.50, 0.62) * size)
        inner = _q(outer * rng.uniform(0.30, 0.38))
        anchor = _random_square(rng, size, outer, [])
        if anchor is None:
            return None
        ax, ay, at = anchor  # the inner object's square sits in the anchor's central region (fits every container)
        c = at / 2 - inner / 2
        a = (_q(ax + c + rng.uniform(-0.08, 0.08) * at), _q(ay + c + rng.uniform(-0.08, 0.08) * at), inner)
        b = _random_square(rng, size, inner, [anchor])
        return {"pair": [a, b], "anchor": anchor} if b else None
    if kind == "next to":
        anchor = _random_square(rng, size, _side(rng, size, lo, hi), [])
        if anchor is None:
            return None
        ax, ay, at = anchor
        for _ in range(40):
            g = rng.uniform(GAP, NEAR - 0.5)
            side = rng.integers(4)
            off = rng.uniform(-0.5 * s, at - 0.5 * s)
            sides = [(ax - s - g, ay + off), (ax + at + g, ay + off), (ax + off, ay - s - g), (ax + off, ay + at + g)]
            x, y = sides[side]
            a = (_q(x), _q(y), s)
            if 1 <= a[0] <= size - 1 - s and 1 <= a[1] <= size - 1 - s:
                break
        else:
            return None
        for _ in range(80):
            b = _random_square(rng, size, s, [anchor, a])
            if b is not None and gap(_box_of(b), _box_of(anchor)) >= FAR + 2:
                return {"pair": [a, b], "anchor": anchor}
        return None
    if kind == "row":
        s = _q(min(s, (size - 2 - 4 * GAP) / 4.2))
        step = s + rng.uniform(GAP + 1, GAP + 3)
        x0 = rng.uniform(1, size - 1 - (2 * step + s))
        y0 = rng.uniform(1, size - 1 - s)
        group = [(_q(x0 + k * step), _q(y0), s) for k in range(3)]
        for _ in range(80):
            lone = _random_square(rng, size, s, group)
            if lone is not None and all(gap(_box_of(lone), _box_of(g)) >= FAR for g in group):
                return {"pair": [group[0], lone], "anchor": None, "group": group}
        return None
    raise ValueError(f"unknown relation kind {kind!r}; expected one of {KINDS}")


def _box_of(sq: Square) -> tuple[int, int, int, int]:
    x0, y0, s = sq
    return int(x0), int(y0), int(np.ceil(x0 + s)), int(np.ceil(y0 + s))


# ------------------------------------------------------------------------------------------------ rendering
def _shapes(size: int, drawn: list[tuple[str, str, Square]]) -> tuple[tuple[ShapeObject, ...], np.ndarray]:
    """The objects (tight boxes of their own outlines: an inside-anchor's box includes what it holds) and each
    one's visible coverage [n, H, W] (what later objects cover is not its own); no randomness involved."""
    covs = [_object_mask(shape, sq, size) for _, shape, sq in drawn]
    visible = []
    for i, m in enumerate(covs):
        v = m.copy()
        for later in covs[i + 1 :]:
            v = v * (1.0 - later)
        visible.append(v)
    objects = tuple(ShapeObject(c, sh, sq, _tight_box(m)) for (c, sh, sq), m in zip(drawn, covs, strict=True))
    return objects, np.stack(visible)


def _paint(rng: np.random.Generator, size: int, drawn: list[tuple[str, str, Square]], noise: float,
           hidden: frozenset[int] = frozenset()) -> np.ndarray:  # fmt: skip
    """The pixels: background, the objects in drawing order, pixel noise. A ``hidden`` object is not painted but
    its random draws are made, so the rest of the image is the same, pixel for pixel, with or without it."""
    img = _background(rng, size)
    for i, (colour, shape, sq) in enumerate(drawn):
        rgb = np.asarray(COLOURS[colour], dtype=np.float32) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3)
        if i not in hidden:
            m = _object_mask(shape, sq, size)
            img = img * (1.0 - m[..., None]) + rgb * m[..., None]
    img = img + rng.normal(0.0, noise, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _words(colour: str, shape: str) -> str:
    return f"{colour} {shape}"


def sample_relational_scene(
    rng: np.random.Generator,
    kind: str | None = None,
    size: int = 96,
    size_range: tuple[float, float] = (0.16, 0.30),
    clutter: int = 2,
    noise: float = 6.0,
    hide_for: int | None = None,
) -> RelationalScene:
    """One scene of ``kind`` (drawn uniformly from :data:`KINDS` when None) with its two referrals and up to
    ``clutter`` objects of other categories; retried until its geometry is exact.

    ``hide_for=k``: the counterfactual image in which referral k's look-alike is not painted (everything else,
    noise included, identical): its words are then true of the image and the swapped words false — what
    :func:`model_knows`-style checks score the CLIP on."""
    kind = kind if kind is not None else str(rng.choice(KINDS))
    lo, hi = size_range
    for _ in range(200):
        lay = _layout(rng, kind, size, lo, hi)
        if lay is None:
            continue
        cats = rng.permutation(len(CATEGORIES))
        pc, ps = CATEGORIES[int(cats[0])]
        # the anchor differs from the pair in colour and shape (an inside-anchor must be able to hold something)
        anchor_cats = [
            CATEGORIES[int(c)]
            for c in cats[1:]
            if CATEGORIES[int(c)][0] != pc
            and CATEGORIES[int(c)][1] != ps
            and (kind != "inside" or CATEGORIES[int(c)][1] in CONTAINERS)
        ]
        ac, ash = anchor_cats[0]
        drawn: list[tuple[str, str, Square]] = []
        if lay["anchor"] is not None:
            drawn.append((ac, ash, lay["anchor"]))
        first = len(drawn)
        squares = lay.get("group", [lay["pair"][0]]) + [lay["pair"][1]]
        drawn += [(pc, ps, sq) for sq in squares]
        taken = [sq for _, _, sq in drawn]
        used = {(pc, ps), (ac, ash)}
        n_clutter = int(rng.integers(0, clutter + 1))
        for c in cats[1:]:
            if len(drawn) - first - len(squares) >= n_clutter:
                break
            colour, shape = CATEGORIES[int(c)]
            if (colour, shape) in used or colour == pc and shape == ps:
                continue
            sq = _random_square(rng, size, _side(rng, size, lo, hi), taken)
            if sq is not None and all(gap(_box_of(sq), _box_of(t)) >= 2 for t in taken):
                drawn.append((colour, shape, sq))
                taken.append(sq)
                used.add((colour, shape))
        objects, masks = _shapes(size, drawn)
        refs = _referrals(kind, objects, first, len(squares), pc, ps, ac, ash, lay)
        if refs is None:
            continue
        hide = frozenset(look_alikes(refs, refs[hide_for])) if hide_for is not None else frozenset()
        pixels = _paint(rng, size, drawn, noise, hide)
        masks = masks.copy()
        masks[list(hide)] = 0.0
        return RelationalScene(Scene(pixels=pixels, objects=objects, masks=masks), kind, refs, hide)
    raise RuntimeError(f"relational world: could not place a {kind!r} scene at {size} px in 200 tries")


def _referrals(kind, objs, first: int, n_pair: int, pc, ps, ac, ash, lay) -> tuple[Referral, ...] | None:
    """The two referrals of a scene, or None when the rendered boxes break the relation (the scene is redrawn)."""
    a, b = first, first + n_pair - 1  # the referent side (a row: its first member) and the look-alike
    anchor = objs[0].box if first == 1 else None
    target = _words(pc, ps)
    if kind == "row":
        members = tuple(range(first, first + n_pair - 1))
        boxes = [objs[i].box for i in members]
        union = (min(x[0] for x in boxes), min(x[1] for x in boxes), max(x[2] for x in boxes), max(x[3] for x in boxes))
        if gap(union, objs[b].box) < FAR:
            return None
        plural = f"{ps}es" if ps == "cross" else f"{ps}s"
        row = Referral(f"the row of {pc} {plural}", f"the single {target}", "row", a, b, (pc, ps), None, (), members,
                       union)  # fmt: skip
        single = Referral(f"the single {target}", f"the row of {pc} {plural}", "single", b, a, (pc, ps))
        return row, single
    rel = {"left": ("left of", "right of"), "above": ("above", "below"), "inside": ("inside", "outside"),
           "next to": ("next to", "far from"), "size": ("bigger than", "smaller than")}[kind]  # fmt: skip
    out = []
    for ref, dis, r in ((a, b, rel[0]), (b, a, rel[1])):
        if not holds(r, objs[ref].box, anchor) or holds(r, objs[dis].box, anchor):
            return None
        out.append(Referral(f"the {target} {r} the {_words(ac, ash)}", f"the {target} {SWAP[r]} the {_words(ac, ash)}",
                            r, ref, dis, (pc, ps), (ac, ash), (0,)))  # fmt: skip
    return tuple(out)


def _rows(boxes: list[tuple[int, int, int, int]]) -> list[tuple[int, ...]]:
    """Groups of ≥ 3 boxes in a horizontal row: linked when two overlap vertically and lie within FAR px."""
    group = list(range(len(boxes)))

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for i, a in enumerate(boxes):
        for j in range(i + 1, len(boxes)):
            b = boxes[j]
            if min(a[3], b[3]) > max(a[1], b[1]) and gap(a, b) < FAR:
                group[root(j)] = root(i)
    members: dict[int, list[int]] = {}
    for i in range(len(boxes)):
        members.setdefault(root(i), []).append(i)
    return [tuple(m) for m in members.values() if len(m) >= 3]


def describes(rs: RelationalScene, r: Referral) -> bool:
    """Whether ``r``'s words are true of the image ``rs`` shows (hidden objects are not in it): some visible object
    of its target category stands in its relation to the visible object of its anchor category (a row: three
    of them in a row; single: one in no row). Used for exact matches between images and expressions."""
    visible = [o for i, o in enumerate(rs.scene.objects) if i not in rs.hidden]
    return true_of([((o.colour, o.shape), o.box) for o in visible], r.relation, r.target, r.anchor)


def true_of(objects: list[tuple[tuple[str, str], tuple[int, ...]]], relation: str, target: tuple[str, str],
            anchor: tuple[str, str] | None = None) -> bool:  # fmt: skip
    """:func:`describes` on plain data: ``objects`` the image's visible ((colour, shape), box) pairs."""
    targets = [tuple(box) for cat, box in objects if tuple(cat) == tuple(target)]
    if relation in ("row", "single"):
        rows = _rows(targets)
        if relation == "row":
            return bool(rows)
        in_rows = {j for g in rows for j in g}
        return any(j not in in_rows and all(gap(b, o) >= FAR for k, o in enumerate(targets) if k != j)
                   for j, b in enumerate(targets))  # fmt: skip
    anchors = [tuple(box) for cat, box in objects if anchor is not None and tuple(cat) == tuple(anchor)]
    return any(holds(relation, t, a) for t in targets for a in anchors)


def relational_scene(seed: int, split: str, index: int, **kwargs) -> RelationalScene:
    """The scene of one image of a relational world: depends only on (seed, split, index) and the settings; the
    kinds cycle with the index so every split holds each kind equally often. ``hide_for=k``: the same scene
    without referral k's look-alike (see :func:`sample_relational_scene`)."""
    return sample_relational_scene(image_rng(seed, split, index), kind=KINDS[index % len(KINDS)], **kwargs)
