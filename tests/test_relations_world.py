"""The relational shapes world: every referring expression names exactly one of two look-alikes, by a relation
that holds on the rendered boxes for the referent and fails for the look-alike (and the swapped words name the
look-alike); scenes depend only on (seed, split, index)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mmel.data.shapes.relations import KINDS, SWAP, holds, relational_scene, sample_relational_scene

N_PER_KIND = 40
SCENES = [relational_scene(3, "test", i) for i in range(N_PER_KIND * len(KINDS))]


def test_scenes_depend_only_on_seed_split_and_index():
    a, b = relational_scene(3, "test", 7), relational_scene(3, "test", 7)
    assert np.array_equal(a.scene.pixels, b.scene.pixels) and a.referrals == b.referrals
    assert not np.array_equal(relational_scene(4, "test", 7).scene.pixels, a.scene.pixels)
    assert not np.array_equal(relational_scene(3, "val", 7).scene.pixels, a.scene.pixels)
    assert Counter(s.kind for s in SCENES) == {k: N_PER_KIND for k in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_the_relation_and_only_the_relation_tells_the_look_alikes_apart(kind):
    for rs in (s for s in SCENES if s.kind == kind):
        objs = rs.scene.objects
        first, second = rs.referrals
        assert first.expression == second.swapped and second.expression == first.swapped
        assert first.referent == second.distractor and second.referent == first.distractor
        for r in rs.referrals:
            ref, dis = objs[r.referent], objs[r.distractor]
            assert (ref.colour, ref.shape) == (dis.colour, dis.shape)  # look-alikes: appearance cannot decide
            assert rs.referent_box(r) != rs.distractor_box(r)
            if r.relation in ("row", "single"):
                group = r if r.relation == "row" else next(x for x in rs.referrals if x.relation == "row")
                assert len(group.members) == 3 and all(objs[m].name == ref.name for m in group.members)
                x0, y0, x1, y1 = group.box
                assert all(x0 <= objs[m].box[0] and objs[m].box[2] <= x1 for m in group.members)
                continue
            (c,) = r.context
            anchor = objs[c].box
            # the words name the referent and not its look-alike; the swapped words name the look-alike
            assert holds(r.relation, ref.box, anchor) and not holds(r.relation, dis.box, anchor), (rs.kind, r)
            assert holds(SWAP[r.relation], dis.box, anchor) and not holds(SWAP[r.relation], ref.box, anchor)
            # the context object is the only one of its category, and named in the expression
            assert sum(o.name == objs[c].name for o in objs) == 1 and r.expression.endswith(objs[c].name)


def test_names_and_masks_are_consistent():
    for rs in SCENES:
        objs, masks = rs.scene.objects, rs.scene.masks
        names = Counter(o.name for o in objs)
        pair = objs[rs.referrals[0].referent].name
        assert names[pair] == (4 if rs.kind == "row" else 2)
        assert all(n == 1 for name, n in names.items() if name != pair)  # clutter and anchors are unique
        assert masks.shape == (len(objs), *rs.scene.pixels.shape[:2]) and (masks.sum(0) <= 1 + 1e-5).all()
        for o, m in zip(objs, masks, strict=True):
            ys, xs = np.nonzero(m >= 0.5)
            assert len(xs) and o.box[0] <= xs.min() and xs.max() < o.box[2] and o.box[1] <= ys.min()


def test_objects_span_several_patches_and_unknown_kinds_are_refused():
    sides = [o.box[2] - o.box[0] for rs in SCENES for o in rs.scene.objects]
    assert np.median(sides) >= 2 * 8  # a 96 px image, 8 px patches: the median object spans ≥ 2 patches a side
    rows = [rs.referrals[0].box for rs in SCENES if rs.kind == "row"]
    assert min(b[2] - b[0] for b in rows) >= 5 * 8
    with pytest.raises(ValueError, match="unknown relation kind 'under'"):
        sample_relational_scene(np.random.default_rng(0), kind="under")


@pytest.mark.parametrize("index", range(4 * len(KINDS)))
def test_the_counterfactual_image_lacks_only_the_look_alike(index):
    """hide_for=k: the same scene with referral k's look-alike unpainted — every other pixel identical (noise
    included), so its words are true of the image and the swapped words are not."""
    from mmel.data.shapes.relations import describes, look_alikes

    i, kind = index, KINDS[index % len(KINDS)]
    full = relational_scene(3, "test", i)
    for k, r in enumerate(full.referrals):
        cf = relational_scene(3, "test", i, hide_for=k)
        # on the full image both expressions are true; without the look-alike only referral k's words are
        assert describes(full, r) and describes(full, full.referrals[1 - k])
        assert describes(cf, r) and not describes(cf, full.referrals[1 - k]), (kind, r.expression)
        hidden = look_alikes(full.referrals, r)
        assert cf.hidden == frozenset(hidden) and cf.referrals == full.referrals and r.referent not in hidden
        covered = full.scene.masks[list(hidden)].sum(0) > 0
        same = np.all(cf.scene.pixels == full.scene.pixels, axis=-1)
        assert same[~covered].all() and not same[covered].all()
        assert (cf.scene.masks[list(hidden)] == 0).all()
        assert np.array_equal(cf.scene.masks[r.referent], full.scene.masks[r.referent])
