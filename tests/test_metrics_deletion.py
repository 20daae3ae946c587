"""Deletion / insertion: analytic curves with a model whose score is a known function of the pixels, fills,
batching, de-duplication, targets, and the CLIP scorer on the micro model."""

from __future__ import annotations

import pytest
import torch

from mmel.metrics import ClipScorer, DeletionInsertion, deletion_insertion
from mmel.metrics.perturbation import PerturbationOptions, _deletion_insertion_update, gaussian_blur, make_fill

RAW = {"pixel_mean": (0.0, 0.0, 0.0), "pixel_std": (1.0, 1.0, 1.0)}  # images in pixel space


def quadrant_score(x: torch.Tensor) -> torch.Tensor:
    """Mean of channel 0 over the top-left 4x4 quadrant of an 8x8 image (16 of 64 pixels)."""
    return x[:, 0, :4, :4].mean((1, 2))


def quadrant_first_map() -> torch.Tensor:
    m = torch.ones(1, 8, 8)
    m[0, :4, :4] = 2.0  # the scored region is the most salient
    return m


def curves(maps, images, scorer=quadrant_score, **kw):
    kw = {"fill": "zeros", **RAW, **kw}
    targets = kw.pop("targets", None)
    return _deletion_insertion_update(maps, images, scorer, targets, PerturbationOptions(**kw))


def test_analytic_curves_region_first():
    # step 1/16 of 64 px = 4 px a step. Deletion removes the 16 scored pixels first: 1 - 4s/16 until 0.
    # Insertion into black puts them back first: 4s/16 until 1.
    c = curves(quadrant_first_map(), torch.ones(1, 3, 8, 8), step=1 / 16)
    expected_del = torch.tensor([1, 0.75, 0.5, 0.25] + [0.0] * 13)
    expected_ins = torch.tensor([0, 0.25, 0.5, 0.75] + [1.0] * 13)
    torch.testing.assert_close(c["deletion"][0], expected_del)
    torch.testing.assert_close(c["insertion"][0], expected_ins)
    out = deletion_insertion(quadrant_first_map(), torch.ones(1, 3, 8, 8), quadrant_score, step=1 / 16,
                             fill="zeros", **RAW)  # fmt: skip
    # trapezoid with dx = 1/16: (sum - (first + last) / 2) / 16
    assert out["deletion_auc"].item() == pytest.approx((2.5 - 0.5) / 16)
    assert out["insertion_auc"].item() == pytest.approx((14.5 - 0.5) / 16)


def test_analytic_curves_region_last_and_half_protocol():
    bad = 3.0 - quadrant_first_map()  # the scored region is the least salient
    out = deletion_insertion(bad, torch.ones(1, 3, 8, 8), quadrant_score, step=1 / 16, fill="zeros", **RAW)
    assert out["deletion_auc"].item() == pytest.approx((14.5 - 0.5) / 16)  # a bad map: slow deletion
    assert out["insertion_auc"].item() == pytest.approx((2.5 - 0.5) / 16)
    # Grad-ECLIP-like: stop at 50%, 8 px a step: deletion 1, .5, 0, 0, 0 over x = 0, .25, ..., 1
    half = deletion_insertion(quadrant_first_map(), torch.ones(1, 3, 8, 8), quadrant_score, step=0.125,
                              max_fraction=0.5, fill="zeros", **RAW)  # fmt: skip
    assert half["deletion_auc"].item() == pytest.approx(0.25)
    # insertion 0, .5, 1, 1, 1 -> .25 * (.25 + .75 + 1 + 1) = .75
    assert half["insertion_auc"].item() == pytest.approx(0.75)


def test_partial_last_step_uses_the_true_fraction():
    c = curves(quadrant_first_map(), torch.ones(1, 3, 8, 8), step=0.1, max_fraction=0.25)
    # points at 0, 10%, 20%, 25% of 64 px -> 0, 6, 13, 16 px removed (rounded) from the 16 scored ones
    torch.testing.assert_close(c["deletion"][0], torch.tensor([1.0, 10 / 16, 3 / 16, 0.0]))


def test_ties_are_broken_in_raster_order():
    # A constant map removes pixels row by row: the top-left quadrant (rows 0..3, cols 0..3) loses 4 px per row.
    c = curves(torch.zeros(1, 8, 8), torch.ones(1, 3, 8, 8), step=1 / 8)
    torch.testing.assert_close(c["deletion"][0], torch.tensor([1, 0.75, 0.5, 0.25, 0, 0, 0, 0, 0.0]))


def test_fills():
    img = torch.zeros(1, 3, 8, 8)
    img[:, :, :, 4:] = 1.0  # right half white: mean 0.5
    mean_fill = make_fill("mean", img, **RAW)
    assert torch.allclose(mean_fill, torch.full_like(img, 0.5))
    zeros = make_fill("zeros", img, pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.25, 0.25, 0.25))
    assert torch.allclose(zeros, torch.full_like(img, -2.0))  # black in normalised space
    grey = make_fill("dataset_mean", img, pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.25, 0.25, 0.25))
    assert torch.equal(grey, torch.zeros_like(img))  # RISE: zeros of the normalised tensor
    noise = make_fill("noise", img, seed=1, **RAW)
    assert torch.equal(noise, make_fill("noise", img, seed=1, **RAW))
    assert not torch.equal(noise, make_fill("noise", img, seed=2, **RAW))
    assert noise.min() >= 0 and noise.max() < 1 and 0.3 < noise.mean() < 0.7
    const = torch.full((2, 3, 9, 9), 0.3)
    torch.testing.assert_close(gaussian_blur(const), const)  # replicate padding keeps constants constant
    blurred = make_fill("blur", img, **RAW)
    assert blurred[0, 0, 0, 3] > 0 and blurred[0, 0, 0, 4] < 1  # the edge is smoothed
    torch.testing.assert_close(blurred.mean(), img.mean(), atol=1e-6, rtol=0)  # symmetric edge: mass kept
    # mean fill, rightmost columns first: deleting the white half leaves black + mean colour, then all mean colour
    by_column = torch.arange(8.0).expand(1, 8, 8)
    c = curves(by_column, img, scorer=lambda x: x.mean((1, 2, 3)), fill="mean", step=0.5)
    torch.testing.assert_close(c["deletion"][0], torch.tensor([0.5, 0.25, 0.5]))


def test_batching_and_deduplication():
    calls = []

    def counting(x):
        calls.append(x.shape[0])
        return x.flatten(1).mean(1)

    g = torch.Generator().manual_seed(0)
    maps, images = torch.rand(3, 4, 4, generator=g), torch.rand(3, 3, 8, 8, generator=g)
    big = curves(maps, images, scorer=counting, step=0.25, batch_size=100)
    assert calls == [3 * (2 * 5 - 2)]  # one pass; clean and all-black images shared between the curves
    calls.clear()
    small = curves(maps, images, scorer=counting, step=0.25, batch_size=7)
    assert max(calls) == 7 and sum(calls) == 24
    for k in big:
        torch.testing.assert_close(big[k], small[k])
    calls.clear()
    curves(maps, images, scorer=counting, step=0.25, fill=("zeros", "blur"))
    assert sum(calls) == 3 * (2 * 5 - 1)  # different fills: only the clean image is shared


def test_targets_reach_the_scorer():
    images = torch.zeros(2, 3, 4, 4)
    images[0, 1], images[1, 2] = 1.0, 1.0
    seen = []

    def channel_score(x, t):
        seen.append(t.clone())
        return x[torch.arange(x.shape[0]), t].mean((1, 2))

    c = curves(torch.rand(2, 4, 4), images, scorer=channel_score, targets=torch.tensor([1, 2]), step=1.0)
    torch.testing.assert_close(c["deletion"], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert sorted(torch.cat(seen).tolist()) == [1, 1, 2, 2]  # clean + all-black per pair (insertion reuses them)


def test_class_equals_functional_batches_equal_one_shot_and_curves():
    g = torch.Generator().manual_seed(1)
    maps, images = torch.rand(5, 6, 6, generator=g), torch.rand(5, 3, 12, 12, generator=g)
    kw = {"step": 0.1, "fill": ("noise", "blur"), "seed": 3, **RAW}
    ref = deletion_insertion(maps, images, quadrant_score, **kw)
    metric = DeletionInsertion(quadrant_score, **kw)
    metric.update(maps[:2], images[:2])
    metric.update(maps[2:], images[2:])
    out = metric.compute()
    for k in ref:
        torch.testing.assert_close(out[k], ref[k])
    cv = metric.curves()
    assert cv["fractions"].shape == (11,) and cv["deletion"].shape == (5, 11) and cv["insertion"].shape == (5, 11)
    one = deletion_insertion(maps, images, quadrant_score, modes=("deletion",), **kw)
    torch.testing.assert_close(one["deletion_auc"], ref["deletion_auc"])
    assert torch.isnan(one["insertion_auc"])
    assert DeletionInsertion.higher_is_better is None and DeletionInsertion.full_state_update is False


def test_scorer_is_not_a_submodule_and_bad_input():
    metric = DeletionInsertion(torch.nn.Linear(2, 1))
    assert "scorer" not in dict(metric.named_modules()) and not list(metric.parameters())
    with pytest.raises(ValueError, match="no scorer"):
        DeletionInsertion().update(torch.rand(1, 4, 4), torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="images"):
        deletion_insertion(torch.rand(2, 4, 4), torch.rand(1, 3, 4, 4), quadrant_score)
    with pytest.raises(ValueError, match="fill"):
        DeletionInsertion(quadrant_score, fill="gray")
    with pytest.raises(ValueError, match="step"):
        DeletionInsertion(quadrant_score, step=0.6, max_fraction=0.5)
    with pytest.raises(ValueError, match="scores"):
        deletion_insertion(torch.rand(1, 4, 4), torch.rand(1, 3, 4, 4), lambda x: x.mean(), step=0.5)


def test_clip_scorer_kinds(micro_clip):
    prompts = ["a red circle", "a blue square", "a green triangle"]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32, generator=g)
    with torch.no_grad():
        f = torch.nn.functional.normalize(micro_clip.model.encode_image(images), dim=-1)
        t = torch.nn.functional.normalize(micro_clip.model.encode_text(micro_clip.tokenize(prompts)), dim=-1)
    cos = f @ t.T
    targets = torch.tensor([0, 1, 2, 1])
    rows = torch.arange(4)
    torch.testing.assert_close(ClipScorer(micro_clip, prompts, "cosine")(images, targets), cos[rows, targets])
    soft = ClipScorer(micro_clip, prompts, "softmax")
    total = sum(soft(images, torch.full((4,), k)) for k in range(3))
    torch.testing.assert_close(total, torch.ones(4))
    top1 = ClipScorer(micro_clip, prompts, "top1", target=1)
    assert torch.equal(top1(images), (cos.argmax(-1) == 1).float())
    metric = DeletionInsertion(ClipScorer(micro_clip, prompts, "cosine"), step=0.25, batch_size=8)
    metric.update(torch.rand(4, 2, 2, generator=g), images, targets)
    out = metric.compute()
    assert torch.isfinite(out["deletion_auc"]) and torch.isfinite(out["insertion_auc"])
    with pytest.raises(ValueError, match="no target"):
        ClipScorer(micro_clip, prompts)(images)


def test_clip_normalisation_constants_match_open_clip():
    import open_clip

    from mmel.metrics.perturbation import CLIP_MEAN, CLIP_STD

    assert tuple(CLIP_MEAN) == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert tuple(CLIP_STD) == tuple(open_clip.OPENAI_DATASET_STD)


def test_docstring_examples_run():
    import doctest
    import importlib

    for name in ("pointing", "iou", "perturbation"):
        module = importlib.import_module(f"mmel.metrics.{name}")
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, name


def test_curves_survive_a_state_dict_round_trip():
    g = torch.Generator().manual_seed(4)
    maps, images = torch.rand(3, 4, 4, generator=g), torch.rand(3, 3, 8, 8, generator=g)
    a = DeletionInsertion(quadrant_score, step=0.25, fill="zeros", **RAW)
    a.persistent(True)
    a.update(maps[:2], images[:2])
    b = DeletionInsertion(quadrant_score, step=0.25, fill="zeros", **RAW)
    b.persistent(True)
    b.load_state_dict(a.state_dict())
    b.update(maps[2:], images[2:])
    ref = curves(maps, images, step=0.25)
    torch.testing.assert_close(b.curves()["deletion"], ref["deletion"])
    torch.testing.assert_close(b.compute()["insertion_auc"], deletion_insertion(maps, images, quadrant_score,
                               step=0.25, fill="zeros", **RAW)["insertion_auc"])  # fmt: skip
