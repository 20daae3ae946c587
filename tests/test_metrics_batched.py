"""The batched metric kernels equal the straightforward per-item computation they replaced.

The references below are the one-map-at-a-time loops the metrics used before they were batched over maps of one
size (pointing game, energy, saliency IoU and its sweep, difficult flags, box checks, the engine's peaks). The data
mixes several original sizes, 1-4 boxes (fractional, degenerate, clipped), quantised maps with plateaus, all-zero
and constant maps, so every branch of the batched code meets its per-item counterpart.
"""

from __future__ import annotations

import math

import pytest
import torch

from mmel.evaluation.engine import peaks
from mmel.metrics import binarise, difficult_flags
from mmel.metrics._common import (
    box_pixel_ranges,
    box_union_mask,
    box_union_masks,
    check_boxes,
    pad_boxes,
    prepare,
    resize_maps,
)
from mmel.metrics.iou import _saliency_iou_update, sweep_thresholds
from mmel.metrics.pointing import _energy_pointing_game_update, _pointing_game_update
from mmel.utils.maps import minmax


# ---- the per-item references ----------------------------------------------------------------------------------------
def ref_hits(maps, boxes, sizes, tolerance, ties):
    resized, box_list, size_list = prepare(maps, boxes, sizes, "ref")
    hits = torch.zeros(len(resized))
    for i, (m, b, size) in enumerate(zip(resized, box_list, size_list, strict=True)):
        top = m.max()
        if bool((top == 0) & (m.min() == 0)):
            continue
        points = (m == top).nonzero()
        if ties == "first":
            points = points[:1]
        c0, r0, c1, r1 = box_pixel_ranges(b, size).unbind(-1)
        r, c = points[:, :1], points[:, 1:]
        dy = (r0 - r).clamp(min=0) + (r - r1).clamp(min=0)
        dx = (c0 - c).clamp(min=0) + (c - c1).clamp(min=0)
        d2 = (dx * dx + dy * dy).float()
        near = ((d2 < tolerance**2) | (d2 == 0)).any(-1)
        hits[i] = near.any() if ties == "any" else near.all()
    return hits


def ref_energy(maps, boxes, sizes):
    resized, box_list, size_list = prepare(maps, boxes, sizes, "ref")
    out = []
    for m, b, size in zip(resized, box_list, size_list, strict=True):
        total = m.sum()
        inside = (m * box_union_mask(b, size)).sum()
        out.append(torch.where(total > 0, inside / total.clamp(min=torch.finfo(m.dtype).tiny), 0.0))
    return torch.stack(out)


def ref_otsu(n, bins=256):
    b = (n * bins).floor().long().clamp(0, bins - 1).flatten()
    hist = torch.bincount(b, minlength=bins).to(n.dtype)
    centres = (torch.arange(bins, dtype=n.dtype) + 0.5) / bins
    w0 = hist.cumsum(0)
    w1 = hist.sum() - w0
    m0 = (hist * centres).cumsum(0)
    m1 = (hist * centres).sum() - m0
    valid = (w0 > 0) & (w1 > 0)
    between = torch.where(valid, w0 * w1 * (m0 / w0.clamp(min=1) - m1 / w1.clamp(min=1)) ** 2, -1.0)
    if not bool(valid.any()):
        return torch.zeros_like(n, dtype=torch.bool)
    return (b > int(between.argmax())).view_as(n)


def ref_binarise(m, rule, fraction, top_k):
    n = minmax(m)
    if rule == "mean":
        return n > n.mean()
    if rule == "fraction":
        return n > fraction
    if rule == "otsu":
        return ref_otsu(n)
    k = max(1, math.ceil(top_k * n.numel()))
    return (n >= n.flatten().topk(k).values[-1]) & (n > 0)


def ref_iou(maps, boxes, sizes, rule, fraction, top_k, steps):
    resized, box_list, size_list = prepare(maps, boxes, sizes, "ref")
    ts = sweep_thresholds(steps)
    ious, sweep = [], []
    for m, b, size in zip(resized, box_list, size_list, strict=True):
        gt = box_union_mask(b, size)
        pred = ref_binarise(m, rule, fraction, top_k)
        ious.append((pred & gt).sum() / (pred | gt).sum())
        n = minmax(m).flatten()
        n_gt = n[gt.flatten()]
        area = n.numel() - torch.searchsorted(n.sort().values, ts, right=True)
        inter = n_gt.numel() - torch.searchsorted(n_gt.sort().values, ts, right=True)
        sweep.append(inter / (area + n_gt.numel() - inter))
    return torch.stack(ious).float(), torch.stack(sweep).float()


def ref_difficult(boxes, sizes, distractor):
    sizes = [tuple(s) for s in torch.as_tensor(sizes).tolist()]
    share = [box_union_mask(b.reshape(-1, 4), s).float().mean() for b, s in zip(boxes, sizes, strict=True)]
    return (torch.stack(share) < 0.25) & torch.as_tensor(distractor, dtype=torch.bool).expand(len(boxes))


def ref_peaks(maps, sizes):
    out = []
    for m in resize_maps(maps, [tuple(s) for s in sizes.tolist()]):
        flat = int(m.flatten().argmax())
        out.append([flat // m.shape[-1], flat % m.shape[-1]])
    return out


# ---- data -----------------------------------------------------------------------------------------------------------
def mixed_batch(n: int, seed: int, h: int = 14, w: int = 14):
    """maps [n, h, w] on a coarse grid (of several kinds), 1-4 boxes each, original sizes of three kinds."""
    g = torch.Generator().manual_seed(seed)
    kinds = torch.randint(0, 6, (n,), generator=g).tolist()
    maps = torch.rand(n, h, w, generator=g)
    for i, k in enumerate(kinds):
        if k == 1:
            maps[i] = (maps[i] * 3).floor() / 3  # plateaus: many tied maxima
        elif k == 2:
            maps[i] = 0.0  # all-zero: a miss, no mass, selects nothing
        elif k == 3:
            maps[i] = 0.7  # constant: every pixel is a maximum
        elif k == 4:
            maps[i] = (maps[i] > 0.9).float()  # a few equal peaks
    choices = [(h, w), (37, 53), (64, 48)]
    sizes = torch.tensor([choices[int(torch.randint(0, 3, (1,), generator=g))] for _ in range(n)])
    boxes = []
    for H, W in sizes.tolist():
        m = int(torch.randint(1, 5, (1,), generator=g))
        x0 = torch.rand(m, generator=g) * W
        y0 = torch.rand(m, generator=g) * H
        bw = torch.rand(m, generator=g) * W * 0.6
        bh = torch.rand(m, generator=g) * H * 0.6
        b = torch.stack([x0, y0, x0 + bw, y0 + bh], 1)
        b[0, 2:] = b[0, :2] if m > 1 else b[0, 2:]  # a point annotation among several boxes
        if m > 2:
            b[2] = b[2].round()  # an integer box, possibly past the border (clipped)
            b[2, 2:] += W / 2
        boxes.append(b)
    return maps, boxes, sizes


SEEDS = [0, 1, 2]


# ---- the comparisons ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", ["all", "first", "any"])
@pytest.mark.parametrize("tolerance", [0, 1.5, 15])
def test_pointing_hits_equal_the_per_item_loop(seed, ties, tolerance):
    maps, boxes, sizes = mixed_batch(40, seed)
    got = _pointing_game_update(maps, boxes, sizes, tolerance, ties)
    want = ref_hits(maps, boxes, sizes, tolerance, ties)
    assert torch.equal(got, want)
    assert 0 < want.sum() < len(want)  # both outcomes occur


def test_pointing_hits_in_the_frame_of_the_maps_and_in_small_steps(monkeypatch):
    """Without sizes (one group, maps' own frame) and with a tiny step (points split across steps)."""
    import mmel.metrics.pointing as pointing

    maps, boxes, _ = mixed_batch(30, 3)
    boxes = [b.clamp(max=13.0) * 14 / 64 for b in boxes]
    want = ref_hits(maps, boxes, None, 2, "all")
    assert torch.equal(_pointing_game_update(maps, boxes, None, 2, "all"), want)
    monkeypatch.setattr(pointing, "_PAIRS_PER_STEP", 5)
    assert torch.equal(_pointing_game_update(maps, boxes, None, 2, "all"), want)


@pytest.mark.parametrize("seed", SEEDS)
def test_energy_equals_the_per_item_loop(seed):
    maps, boxes, sizes = mixed_batch(40, seed)
    torch.testing.assert_close(_energy_pointing_game_update(maps, boxes, sizes), ref_energy(maps, boxes, sizes),
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    maps.requires_grad_(True)  # still differentiable through the batched path
    _energy_pointing_game_update(maps, boxes, sizes).sum().backward()
    assert maps.grad is not None and maps.grad.abs().sum() > 0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rule", ["mean", "fraction", "otsu", "topk"])
def test_saliency_iou_and_sweep_equal_the_per_item_loop(seed, rule):
    maps, boxes, sizes = mixed_batch(40, seed)
    iou, sweep = _saliency_iou_update(maps, boxes, sizes, rule, 0.3, 0.2, 50)
    want_iou, want_sweep = ref_iou(maps, boxes, sizes, rule, 0.3, 0.2, 50)
    torch.testing.assert_close(iou, want_iou, rtol=0, atol=1e-6)
    assert torch.equal(sweep, want_sweep)  # counts of exact comparisons: no rounding at all
    assert iou.dtype == sweep.dtype == torch.float32 and sweep.shape == (40, 50)


@pytest.mark.parametrize("rule", ["mean", "fraction", "otsu", "topk"])
def test_binarise_of_a_stack_equals_each_map_alone(rule):
    maps, _, _ = mixed_batch(20, 4)
    got = binarise(maps, rule, 0.3, 0.2)
    for i in range(len(maps)):
        assert torch.equal(got[i], ref_binarise(maps[i], rule, 0.3, 0.2))
        assert torch.equal(binarise(maps[i], rule, 0.3, 0.2), got[i])


@pytest.mark.parametrize("seed", SEEDS)
def test_union_masks_and_difficult_flags_equal_the_per_item_loop(seed):
    _, boxes, sizes = mixed_batch(40, seed)
    for (H, W), b in zip(sizes.tolist(), boxes, strict=True):
        assert torch.equal(box_union_masks(pad_boxes([b]), (H, W))[0], box_union_mask(b, (H, W)))
    many = box_union_masks(pad_boxes(boxes), (37, 53))  # sets of 1-4 boxes padded to 4, in one call
    assert torch.equal(many, torch.stack([box_union_mask(b, (37, 53)) for b in boxes]))
    distractor = torch.arange(40) % 3 > 0
    assert torch.equal(difficult_flags(boxes, sizes, distractor), ref_difficult(boxes, sizes, distractor))
    assert torch.equal(difficult_flags(boxes, sizes, True), ref_difficult(boxes, sizes, True))
    empty = [torch.zeros(0, 4), *boxes[:2]]  # an entry without boxes covers nothing: small
    assert difficult_flags(empty, sizes[:3], True)[0]


@pytest.mark.parametrize("seed", SEEDS)
def test_peaks_equal_the_per_item_argmax(seed):
    maps, _, sizes = mixed_batch(40, seed)
    assert peaks(maps, sizes) == ref_peaks(maps, sizes)
    assert peaks(maps, torch.tensor([[14, 14]] * 40)) == ref_peaks(maps, torch.tensor([[14, 14]] * 40))


def test_box_errors_name_the_first_bad_entry():
    sizes = [(10, 10)] * 4
    good = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    cases = [
        ([good, torch.tensor([[5.0, 0.0, 1.0, 1.0]]), torch.zeros(0, 4), good], r"boxes\[1\].*x2 >= x1"),
        ([good, good, torch.zeros(0, 4), torch.tensor([[5.0, 0.0, 1.0, 1.0]])], r"boxes\[2\].*M>=1"),
        ([good, torch.tensor([[20.0, 0.0, 30.0, 1.0]]), good, good], r"boxes\[1\].*outside"),
        ([good, good, good, torch.tensor([[0.0, float("nan"), 1.0, 1.0]])], r"boxes\[3\].*finite"),
        ([good, torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 11.0, 1.0, 12.0]]), good, good], r"boxes\[1\].*outside"),
    ]
    for boxes, match in cases:
        with pytest.raises(ValueError, match=match):
            check_boxes(boxes, sizes, torch.device("cpu"), "T")
    out = check_boxes([good[0], good, torch.zeros(0, 4), good], sizes, torch.device("cpu"), "T", allow_empty=True)
    assert [tuple(b.shape) for b in out] == [(1, 4), (1, 4), (0, 4), (1, 4)]
