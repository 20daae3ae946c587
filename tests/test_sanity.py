"""Sanity checks: similarity measures on hand-made maps, randomisation on copies only, and the oracle
(tests/sanity_oracle.py) whose curves separate a model-dependent explainer from one that ignores the model."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import spearmanr

from mmel.explainers import build_explainer
from mmel.metrics.sanity import randomised_copies
from mmel.metrics.similarity import hog, hog_similarity, spearman, ssim
from tests.sanity_oracle import explain_items, model_randomisation, prompt_randomisation

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a red circle"]


def _images(n=4, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _maps(n=3, size=24, seed=0):
    return torch.rand(n, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- measures
def test_spearman_matches_scipy_with_ties_and_extremes():
    a, b = _maps(), _maps(seed=1)
    a[0, :10] = 0.0  # many ties, as ReLU'd maps have
    ref = [spearmanr(x.flatten().numpy(), y.flatten().numpy())[0] for x, y in zip(a, b, strict=True)]
    assert torch.allclose(spearman(a, b), torch.tensor(ref, dtype=torch.float32), atol=1e-6)
    assert torch.allclose(spearman(a, a), torch.ones(3))
    assert torch.allclose(spearman(a, 1 - a), -torch.ones(3))
    assert math.isnan(spearman(torch.zeros(1, 8, 8), a[:1, :8, :8]).item())  # a constant map has no ranking


def test_ssim_identity_scale_and_contrast():
    a = _maps()
    assert torch.allclose(ssim(a, a), torch.ones(3), atol=1e-6)
    assert (ssim(a, 1 - a) < 0).all()  # anti-correlated structure
    assert (ssim(a, _maps(seed=5)) < 0.2).all()  # independent noise: little shared structure
    with pytest.raises(ValueError, match="smaller than the 7x7 window"):
        ssim(torch.rand(1, 5, 5), torch.rand(1, 5, 5))


def test_ssim_hand_computed_on_one_window():
    """7x7 maps: one window. x constant 0.5 (no variance), y = x + 0.1 => SSIM = luminance term only."""
    x = torch.full((1, 7, 7), 0.5)
    y = x + 0.1
    c1 = 0.01**2
    expected = (2 * 0.5 * 0.6 + c1) / (0.5**2 + 0.6**2 + c1)
    assert ssim(x, y).item() == pytest.approx(expected, rel=1e-6)


def test_hog_orientation_and_similarity():
    """A vertical edge has horizontal gradients only: all HOG energy in orientation bin 0."""
    m = torch.zeros(1, 24, 24)
    m[:, :, 12:] = 1.0
    cells = hog(m, block=1).view(3, 3, 9)  # block of 1 cell: the normalised cell histograms
    assert cells[..., 1:].abs().max() == 0 and cells[..., 0].sum() > 0
    a = _maps()
    assert torch.allclose(hog_similarity(a, a), torch.ones(3), atol=1e-6)
    t = m.transpose(1, 2)  # horizontal edge: the 90-degree bin instead
    assert hog_similarity(m, t).item() < 0.5
    with pytest.raises(ValueError, match="cells"):
        hog(torch.rand(1, 16, 16))


# ------------------------------------------------------------------------------------------ randomisation
@pytest.mark.parametrize("mode", ["cascading", "independent"])
def test_randomisation_never_touches_the_user_model(micro_clip, mode):
    model = micro_clip.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = list(randomised_copies(micro_clip, mode, seed=0))
    names = [n for n, _ in steps]
    assert names == ["head", "block 1", "block 0", "embed"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    changed = []
    for _, rclip in steps:
        assert rclip.model is not model and rclip.tokenizer is micro_clip.tokenizer
        sd = rclip.model.state_dict()
        changed.append({k for k in sd if not torch.equal(sd[k], before[k])})
        assert all(k.startswith("visual.") for k in changed[-1])  # the text tower stays as trained
    if mode == "cascading":  # each step keeps the previous ones randomised
        assert all(changed[i] < changed[i + 1] for i in range(len(changed) - 1))
        # every learnt tensor of the vision tower (a constant one, e.g. a fresh LayerNorm's ones, has no std)
        assert {k for k, v in before.items() if k.startswith("visual.") and v.float().std() > 0} == changed[-1]
    else:
        assert all(not (changed[i] & changed[j]) for i in range(4) for j in range(i + 1, 4))
        assert any("resblocks.1." in k for k in changed[1]) and not any("resblocks.0." in k for k in changed[1])


def test_curves_separate_model_dependent_from_model_blind_explainers(micro_clip):
    images = _images()
    blind = lambda clip: lambda x, p: x.abs().mean(1, keepdim=True).expand(-1, len(p), -1, -1) / 5  # noqa: E731
    curve_blind, _ = model_randomisation(micro_clip, blind, images, PROMPTS)
    assert torch.allclose(curve_blind.values["spearman"], torch.ones(4, 4))  # ignores the model: never changes
    curve, original = model_randomisation(micro_clip, lambda c: build_explainer("grad_eclip", c), images, PROMPTS)
    assert curve.steps == ["head", "block 1", "block 0", "embed"] and original.shape == (4, 32, 32)
    assert {k: v.shape for k, v in curve.values.items()} == {m: (4, 4) for m in ("spearman", "ssim", "hog")}
    end = curve.end_point()
    assert end["spearman"] < 0.9 and end == {m: curve.mean()[m][-1] for m in end}
    again, _ = model_randomisation(micro_clip, lambda c: build_explainer("grad_eclip", c), images, PROMPTS)
    assert all(torch.equal(again.values[m], curve.values[m]) for m in curve.values)  # seeded: same numbers


def test_mmel_is_rebuilt_on_each_randomised_copy(micro_clip):
    built = []

    def build(clip):
        built.append(clip.model)
        return build_explainer("mmel", clip, layers=2)

    curve, _ = model_randomisation(micro_clip, build, _images(2), PROMPTS[:2], mode="independent")
    assert len(built) == 5 and built[0] is micro_clip.model and len({id(m) for m in built}) == 5
    assert torch.isfinite(curve.values["ssim"]).all()


def test_prompt_randomisation_flags_a_prompt_blind_explainer(micro_clip):
    images = _images()
    others = ["a blue star", "a cyan cross", "a yellow diamond", "a purple square"]
    blind = prompt_randomisation(build_explainer("attention", micro_clip), images, PROMPTS, others)
    assert blind["prompt_insensitive"] and blind["mean"]["spearman"] == pytest.approx(1.0)
    ge = prompt_randomisation(build_explainer("grad_eclip", micro_clip), images, PROMPTS, others)
    assert ge["mean"]["spearman"] < blind["mean"]["spearman"]
    with pytest.raises(ValueError, match="different from the true one"):
        prompt_randomisation(build_explainer("attention", micro_clip), images, PROMPTS, PROMPTS)


def test_explain_items_takes_each_items_column(micro_clip):
    e = build_explainer("grad_eclip", micro_clip)
    images = _images()
    maps = explain_items(e, images, PROMPTS, batch_size=3)
    full = e(images, sorted(set(PROMPTS)))
    cols = [sorted(set(PROMPTS)).index(p) for p in PROMPTS]
    assert torch.allclose(maps, full[torch.arange(4), cols], atol=1e-5)
    with pytest.raises(ValueError, match="not in prompt_set"):
        explain_items(e, images, PROMPTS, prompt_set=["a red circle"])
