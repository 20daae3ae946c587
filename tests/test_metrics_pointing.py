"""Pointing game and energy pointing game: hand-computed cases, class == functional, batching, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from mmel.metrics import EnergyPointingGame, PointingGame, energy_pointing_game, pointing_game
from mmel.metrics._common import box_pixel_ranges, box_union_mask


def peak(h: int, w: int, r: int, c: int) -> torch.Tensor:
    m = torch.zeros(1, h, w)
    m[0, r, c] = 1.0
    return m


def hit(m, box, **kw) -> float:
    return pointing_game(m, [torch.tensor([box], dtype=torch.float32)], **kw)["accuracy"].item()


# ---- box geometry -------------------------------------------------------------------------------------------------


def test_box_pixels_integer_fractional_degenerate_and_clipped():
    size = (10, 10)
    assert box_union_mask(torch.tensor([[2.0, 3.0, 5.0, 4.0]]), size).sum() == 3  # 3 columns x 1 row
    assert box_union_mask(torch.tensor([[2.2, 3.0, 2.4, 4.0]]), size).sum() == 1  # sub-pixel box -> its pixel
    assert box_union_mask(torch.tensor([[6.0, 6.0, 6.0, 6.0]]), size).sum() == 1  # point annotation
    assert box_union_mask(torch.tensor([[8.0, 8.0, 30.0, 30.0]]), size).sum() == 4  # clipped at the border
    assert box_pixel_ranges(torch.tensor([[2.5, 1.0, 4.5, 3.0]]), size).tolist() == [[2, 1, 4, 2]]
    union = box_union_mask(torch.tensor([[0.0, 0.0, 5.0, 10.0], [3.0, 0.0, 8.0, 10.0]]), size)
    assert union.sum() == 80 and union[:, :8].all()


# ---- pointing game: hand-computed ---------------------------------------------------------------------------------


def test_all_zero_map_is_a_miss_even_for_a_whole_image_box():
    for ties in ("all", "first", "any"):
        assert hit(torch.zeros(1, 20, 20), [0.0, 0.0, 20.0, 20.0], ties=ties) == 0.0


def test_constant_map_follows_the_tie_rule():
    m = torch.ones(1, 100, 100)
    assert hit(m, [0.0, 0.0, 100.0, 100.0]) == 1.0  # every maximum is on the target
    assert hit(m, [40.0, 40.0, 60.0, 60.0]) == 0.0  # "all": most maxima are far from it
    assert hit(m, [40.0, 40.0, 60.0, 60.0], ties="any") == 1.0
    assert hit(m, [40.0, 40.0, 60.0, 60.0], ties="first") == 0.0  # first maximum = pixel (0, 0)
    assert hit(m, [10.0, 10.0, 60.0, 60.0], ties="first") == 1.0  # (0,0) to pixel (10,10): sqrt(200) < 15


def test_box_covering_the_whole_image_always_hits_a_nonzero_map():
    torch.manual_seed(0)
    maps = torch.rand(5, 30, 40)
    boxes = [torch.tensor([[0.0, 0.0, 40.0, 30.0]])] * 5
    assert pointing_game(maps, boxes, tolerance=0)["accuracy"].item() == 1.0


def test_box_touching_the_border():
    assert hit(peak(100, 100, 99, 99), [90.0, 90.0, 100.0, 100.0], tolerance=0) == 1.0
    assert hit(peak(100, 100, 99, 99), [90.0, 90.0, 130.0, 125.0], tolerance=0) == 1.0  # box beyond the image
    assert hit(peak(100, 100, 0, 0), [0.0, 0.0, 1.0, 100.0], tolerance=0) == 1.0
    assert hit(peak(100, 100, 0, 1), [0.0, 0.0, 1.0, 100.0], tolerance=0) == 0.0


def test_one_pixel_box():
    box = [10.0, 20.0, 11.0, 21.0]  # pixel row 20, col 10
    assert hit(peak(40, 40, 20, 10), box, tolerance=0) == 1.0
    assert hit(peak(40, 40, 20, 11), box, tolerance=0) == 0.0
    assert hit(peak(40, 40, 20, 11), box, tolerance=1) == 0.0  # distance exactly 1 = tau: a miss (strict)
    assert hit(peak(40, 40, 20, 11), box, tolerance=1.01) == 1.0


def test_several_boxes_use_their_union():
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [80.0, 80.0, 90.0, 90.0]])]
    assert pointing_game(peak(100, 100, 85, 85), boxes, tolerance=0)["accuracy"].item() == 1.0
    assert pointing_game(peak(100, 100, 5, 5), boxes, tolerance=0)["accuracy"].item() == 1.0
    assert pointing_game(peak(100, 100, 45, 45), boxes, tolerance=15)["accuracy"].item() == 0.0


def test_tolerance_edge_exactly_at_tau():
    box = [0.0, 0.0, 10.0, 10.0]  # pixels 0..9
    assert hit(peak(60, 60, 5, 9 + 15), box) == 0.0  # 15 px right of the box: distance == tau -> miss
    assert hit(peak(60, 60, 5, 9 + 14), box) == 1.0
    assert hit(peak(60, 60, 9 + 9, 9 + 12), box) == 0.0  # diagonal 9-12-15 triangle: exactly tau
    assert hit(peak(60, 60, 9 + 9, 9 + 11), box) == 1.0  # sqrt(202) < 15
    assert math.isclose(hit(peak(60, 60, 5, 24), box, tolerance=15.0001), 1.0)


def test_maps_are_resized_to_the_original_size_before_pointing():
    # A 10x10 map with one peak cell, images of 100x100: bilinear upsampling puts a 2x2 plateau of maxima at
    # pixels (24..25, 34..35) - the centre of cell (2, 3).
    m = torch.zeros(1, 10, 10)
    m[0, 2, 3] = 1.0
    sizes = torch.tensor([[100, 100]])
    box = [torch.tensor([[34.0, 24.0, 35.0, 25.0]])]  # only pixel (24, 34)
    assert pointing_game(m, box, sizes, tolerance=0, ties="first")["accuracy"].item() == 1.0
    assert pointing_game(m, box, sizes, tolerance=0, ties="all")["accuracy"].item() == 0.0
    assert pointing_game(m, box, sizes, tolerance=0, ties="any")["accuracy"].item() == 1.0
    assert pointing_game(m, box, sizes, tolerance=1.5, ties="all")["accuracy"].item() == 1.0
    # non-square original: 50 rows x 200 cols; peak cell (2, 3) of 10x10 -> rows 12, cols 69..70
    far = [torch.tensor([[69.0, 12.0, 71.0, 13.0]])]
    assert pointing_game(m, far, torch.tensor([[50, 200]]), tolerance=0)["accuracy"].item() == 1.0


def test_categories_and_difficult_subset():
    maps = torch.cat([peak(20, 20, 2, 2), peak(20, 20, 3, 3), peak(20, 20, 18, 18)])
    boxes = [torch.tensor([[0.0, 0.0, 5.0, 5.0]])] * 3
    diff = torch.tensor([False, False, True])
    out = pointing_game(maps, boxes, categories=["a", "a", "b"], difficult=diff, tolerance=0)
    assert out["accuracy"].item() == pytest.approx(2 / 3)
    assert out["mean_per_category"].item() == pytest.approx(0.5)  # (1 + 0) / 2, not 2/3
    assert out["difficult_accuracy"].item() == 0.0
    ids = pointing_game(maps, boxes, categories=torch.tensor([4, 4, 7]), tolerance=0)
    assert ids["mean_per_category"].item() == pytest.approx(0.5)
    none = pointing_game(maps, boxes, tolerance=0)
    assert math.isnan(none["mean_per_category"].item()) and math.isnan(none["difficult_accuracy"].item())
    metric = PointingGame(tolerance=0)
    metric.update(maps, boxes, categories=["a", "a", "b"])
    assert metric.per_category() == {"a": 1.0, "b": 0.0}


# ---- class vs functional, batching ---------------------------------------------------------------------------------


def random_batch(n: int, seed: int, size=(24, 32)):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(n, 6, 8, generator=g) ** 4
    h, w = size
    boxes = []
    for _ in range(n):
        k = int(torch.randint(1, 3, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w - 4.0, h - 4.0])
        wh = torch.rand(k, 2, generator=g) * 10 + 1
        boxes.append(torch.cat([xy, (xy + wh).minimum(torch.tensor([float(w), float(h)]))], 1))
    sizes = torch.tensor([[h, w]] * n)
    cats = [["x", "y", "z"][i % 3] for i in range(n)]
    diff = torch.arange(n) % 2 == 0
    return maps, boxes, sizes, cats, diff


def test_pointing_class_equals_functional_and_batches_equal_one_shot():
    maps, boxes, sizes, cats, diff = random_batch(12, 0)
    ref = pointing_game(maps, boxes, sizes, cats, diff, tolerance=4)
    metric = PointingGame(tolerance=4)
    for sl in (slice(0, 5), slice(5, 6), slice(6, 12)):
        metric.update(maps[sl], boxes[sl], sizes[sl], cats[sl], diff[sl])
    out = metric.compute()
    assert out.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(out[k], ref[k])
    assert 0 < ref["accuracy"] < 1  # the data exercises both outcomes


def test_energy_hand_computed():
    ones = torch.ones(1, 10, 10)
    assert energy_pointing_game(torch.zeros(1, 10, 10), [torch.tensor([[0.0, 0.0, 10.0, 10.0]])]).item() == 0.0
    assert energy_pointing_game(ones, [torch.tensor([[0.0, 0.0, 5.0, 10.0]])]).item() == pytest.approx(0.5)
    assert energy_pointing_game(ones, [torch.tensor([[0.0, 0.0, 10.0, 10.0]])]).item() == pytest.approx(1.0)
    assert energy_pointing_game(ones, [torch.tensor([[3.0, 4.0, 4.0, 5.0]])]).item() == pytest.approx(0.01)
    border = [torch.tensor([[5.0, 5.0, 12.0, 12.0]])]  # clipped to the 5x5 corner
    assert energy_pointing_game(ones, border).item() == pytest.approx(0.25)
    two = [torch.tensor([[0.0, 0.0, 5.0, 10.0], [3.0, 0.0, 8.0, 10.0]])]  # overlapping: union 80 px, not 100
    assert energy_pointing_game(ones, two).item() == pytest.approx(0.8)
    m = torch.zeros(1, 10, 10)
    m[0, 0, 0], m[0, 9, 9] = 3.0, 1.0
    assert energy_pointing_game(m, [torch.tensor([[0.0, 0.0, 1.0, 1.0]])]).item() == pytest.approx(0.75)


def test_energy_is_differentiable_and_class_matches():
    maps, boxes, sizes, _, _ = random_batch(7, 1)
    maps.requires_grad_(True)
    ref = energy_pointing_game(maps, boxes, sizes)
    ref.backward()
    assert maps.grad is not None and maps.grad.abs().sum() > 0
    metric = EnergyPointingGame()
    metric.update(maps[:3], boxes[:3], sizes[:3])
    metric.update(maps[3:], boxes[3:], sizes[3:])
    torch.testing.assert_close(metric.compute(), ref.detach())


def test_higher_is_better_flags():
    assert PointingGame.higher_is_better is True and EnergyPointingGame.higher_is_better is True
    assert PointingGame.full_state_update is False and EnergyPointingGame.full_state_update is False


# ---- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("maps", "boxes", "match"),
    [
        (torch.zeros(1, 1, 10, 10), [torch.tensor([[0.0, 0.0, 1.0, 1.0]])], r"maps.*\[N, h, w\]"),
        (torch.zeros(1, 10, 10), [torch.zeros(0, 4)], r"boxes\[0\].*M>=1"),
        (torch.zeros(1, 10, 10), [torch.tensor([[5.0, 0.0, 1.0, 1.0]])], r"x2 >= x1"),
        (torch.zeros(1, 10, 10), [torch.tensor([[20.0, 20.0, 30.0, 30.0]])], r"outside the image"),
        (torch.zeros(2, 10, 10), [torch.tensor([[0.0, 0.0, 1.0, 1.0]])], r"list of N=2"),
        (torch.full((1, 10, 10), float("nan")), [torch.tensor([[0.0, 0.0, 1.0, 1.0]])], r"NaN"),
    ],
)
def test_bad_input_names_the_field(maps, boxes, match):
    with pytest.raises(ValueError, match=match):
        pointing_game(maps, boxes)


def test_bad_options():
    with pytest.raises(ValueError, match="ties"):
        PointingGame(ties="random")
    with pytest.raises(ValueError, match="sizes"):
        pointing_game(torch.zeros(1, 4, 4), [torch.tensor([[0.0, 0.0, 1.0, 1.0]])], sizes=torch.tensor([4, 4]))
    with pytest.raises(ValueError, match="non-negative"):
        energy_pointing_game(-torch.ones(1, 4, 4), [torch.tensor([[0.0, 0.0, 1.0, 1.0]])])
    with pytest.raises(ValueError, match="categories"):
        pointing_game(torch.ones(1, 4, 4), [torch.tensor([[0.0, 0.0, 1.0, 1.0]])], categories=["a", "b"])


def test_states_survive_a_state_dict_round_trip():
    # evaluate checkpoints metric states (persistent) to resume long runs: sum and "cat" states must come back.
    maps, boxes, sizes, cats, diff = random_batch(6, 2)
    a = PointingGame(tolerance=4)
    a.persistent(True)
    a.update(maps[:4], boxes[:4], sizes[:4], cats[:4], diff[:4])
    b = PointingGame(tolerance=4)
    b.persistent(True)
    b.load_state_dict(a.state_dict())
    b.update(maps[4:], boxes[4:], sizes[4:], cats[4:], diff[4:])
    ref = pointing_game(maps, boxes, sizes, cats, diff, tolerance=4)
    out = b.compute()
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], equal_nan=True)
