"""PromptSpecificity: hand-computed cases, functional == class, batched == one-shot, clear errors, and DDP."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmel.metrics import PromptSpecificity, prompt_specificity

A = torch.tensor([[0.0, 0.0, 4.0, 4.0]])  # top-left object
B = torch.tensor([[6.0, 6.0, 10.0, 10.0]])  # bottom-right object
EMPTY = torch.zeros(0, 4)


def _peak(r, c, size=10):
    m = torch.zeros(size, size)
    m[r, c] = 1.0
    return m


def _case():
    """Six pairs: named hit, other hit, background, a hard named hit, an absent prompt on an object, one skipped."""
    maps = torch.stack([_peak(1, 1), _peak(8, 8), _peak(1, 8), _peak(2, 2), _peak(7, 7), _peak(1, 1)])
    boxes = [A, A, A, A, EMPTY, A]
    others = [B, B, B, B, torch.cat([A, B]), EMPTY]
    hard = torch.tensor([False, False, False, True, False, True])
    return maps, boxes, others, hard


def test_hand_computed():
    maps, boxes, others, hard = _case()
    out = prompt_specificity(maps, boxes, others, hard=hard)
    # present pairs 0-3: named 2 (pairs 0, 3), other 1 (pair 1), background 1 (pair 2); pair 5 has no other object
    assert out["specificity"].item() == pytest.approx(2 / 3)
    assert out["named_rate"].item() == pytest.approx(0.5)
    assert out["other_rate"].item() == pytest.approx(0.25)
    assert out["background_rate"].item() == pytest.approx(0.25)
    assert out["hard_specificity"].item() == pytest.approx(1.0)  # pair 5 is flagged hard but skipped
    assert out["absent_on_object"].item() == pytest.approx(1.0)
    assert [out[k].item() for k in ("pairs", "hard_pairs", "absent_pairs", "skipped")] == [4, 1, 1, 1]


def test_ties_split_the_vote_and_zero_maps_point_nowhere():
    m = torch.zeros(1, 10, 10)
    m[0, 1, 1] = m[0, 8, 8] = m[0, 9, 9] = 1.0  # one peak on the named object, two on the other
    out = prompt_specificity(m, [A], [B])
    assert out["specificity"].item() == pytest.approx(1 / 3)
    zero = prompt_specificity(torch.zeros(1, 10, 10), [A], [B])
    assert zero["background_rate"].item() == 1.0 and math.isnan(zero["specificity"].item())
    overlap = prompt_specificity(_peak(3, 3)[None], [A], [torch.tensor([[2.0, 2.0, 8.0, 8.0]])])
    assert overlap["specificity"].item() == 1.0  # a pixel in both boxes counts as the named object


def test_maps_are_resized_to_the_original_size():
    """A 5x5 map peaking at (0, 0) on a 10x10 image: the peak pixels lie in the top-left box A."""
    m = torch.zeros(1, 5, 5)
    m[0, 0, 0] = 1.0
    out = prompt_specificity(m, [A], [B], sizes=torch.tensor([[10, 10]]))
    assert out["specificity"].item() == 1.0


def test_functional_equals_class_and_batched_equals_one_shot():
    maps, boxes, others, hard = _case()
    one = prompt_specificity(maps, boxes, others, hard=hard)
    metric = PromptSpecificity()
    for lo, hi in ((0, 2), (2, 3), (3, 6)):
        metric.update(maps[lo:hi], boxes[lo:hi], others[lo:hi], hard=hard[lo:hi])
    batched = metric.compute()
    assert one.keys() == batched.keys()
    for k in one:
        torch.testing.assert_close(batched[k], one[k], equal_nan=True, msg=k)
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(metric.compute()["specificity"].item())


def test_clear_errors():
    maps, boxes, others, _ = _case()
    with pytest.raises(ValueError, match="other_boxes"):
        prompt_specificity(maps, boxes, others[:2])
    with pytest.raises(ValueError, match="hard"):
        prompt_specificity(maps, boxes, others, hard=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        prompt_specificity(maps, [torch.tensor([[50.0, 50.0, 60.0, 60.0]])] + boxes[1:], others)


# ------------------------------------------------------------------------------------------------------ DDP
def _evaluate(lo, hi):
    maps, boxes, others, hard = _case()
    metric = PromptSpecificity()
    metric.update(maps[lo:hi], boxes[lo:hi], others[lo:hi], hard=hard[lo:hi])
    return metric.compute()


def _worker(rank: int, init: str, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        res = _evaluate(0, 2) if rank == 0 else _evaluate(2, 6)
        if rank == 0:
            torch.save(res, out_path)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process(tmp_path):
    single = _evaluate(0, 6)
    out_path = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(f"file://{tmp_path / 'init'}", str(out_path)), nprocs=2, join=True)
    ddp = torch.load(out_path)
    for k, v in single.items():
        torch.testing.assert_close(ddp[k], v, equal_nan=True, msg=k)
    assert not torch.equal(_evaluate(0, 2)["specificity"], single["specificity"])  # rank 0 alone differs


def test_items_batched_over_sizes_equal_a_per_pair_reference():
    """The per-pair values, computed in one pass per original size, equal the definition applied pair by pair:
    plateaus, all-zero maps, absent prompts, pairs without another object and two original sizes mixed."""
    import torch.nn.functional as F

    from mmel.metrics._common import box_union_mask
    from mmel.metrics.specificity import _prompt_specificity_items

    g = torch.Generator().manual_seed(3)
    n = 40
    maps = torch.rand(n, 6, 6, generator=g).round(decimals=1)  # many ties
    maps[::7] = 0  # points nowhere
    sizes = torch.tensor([[24, 30] if i % 3 else [18, 18] for i in range(n)])

    def boxes(k, h, w):
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w - 4.0, h - 4.0])
        return torch.cat([xy, xy + 2 + torch.rand(k, 2, generator=g) * 8], 1)

    named = [boxes(0 if i % 5 == 0 else 1 + i % 2, *sizes[i].tolist()) for i in range(n)]
    other = [boxes(0 if i % 4 == 0 else 1 + i % 3, *sizes[i].tolist()) for i in range(n)]
    got = _prompt_specificity_items(maps, named, other, sizes)
    for i in range(n):
        size = tuple(sizes[i].tolist())
        m = F.interpolate(maps[i][None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        kind, nv, ov = 0, 0.0, 0.0
        if len(other[i]):
            peaks = (m == m.max()) if bool(m.abs().max() > 0) else torch.zeros_like(m, dtype=torch.bool)
            share = max(int(peaks.sum()), 1)
            on_other = box_union_mask(other[i], size)
            if len(named[i]):
                on_named = box_union_mask(named[i], size)
                kind, nv = 1, int((peaks & on_named).sum()) / share
                ov = int((peaks & on_other & ~on_named).sum()) / share
            else:
                kind, ov = 2, int((peaks & on_other).sum()) / share
        assert int(got["kind"][i]) == kind, i
        assert math.isclose(float(got["named"][i]), nv, abs_tol=1e-6) and math.isclose(
            float(got["other"][i]), ov, abs_tol=1e-6
        ), i
    assert set(got["kind"].tolist()) == {0, 1, 2}
