"""HSRM: starts exactly at Grad-ECLIP, every weight learns from step one, shapes/ranges, the box losses."""

from __future__ import annotations

import pytest
import torch

from mmel.explainers.base import minmax
from mmel.hsrm import HSRM, HSRMInputs, box_losses
from mmel.hsrm.losses import dice_loss, energy_loss, pointing_loss


def make_inputs(p=3, l=4, h=5, w=7, c=16, width=24, d=12, seed=0) -> HSRMInputs:
    g = torch.Generator().manual_seed(seed)
    return HSRMInputs(
        evidence=torch.randn(p, l, h, w, generator=g),
        keys=torch.randn(p, l, h * w, c, generator=g),
        patch_tokens=torch.randn(p, h * w, width, generator=g),
        text=torch.randn(p, d, generator=g),
    )


def make_hsrm(**kw) -> HSRM:
    torch.manual_seed(0)
    return HSRM(num_layers=4, width=24, embed_dim=12, **kw)


def test_initialisation_is_grad_eclip_of_the_last_layer():
    x = make_inputs()
    m, _ = make_hsrm()(x)
    expected = minmax(torch.relu(x.evidence[:, -1]))
    assert m.shape == (3, 5, 7)
    torch.testing.assert_close(m, expected, atol=1e-6, rtol=0)


def test_every_parameter_gets_a_gradient_after_one_step_and_most_at_the_start():
    x = make_inputs()
    hsrm = make_hsrm()
    mask = torch.zeros(3, 5, 7)
    mask[:, 1:3, 2:5] = 1
    m, e = hsrm(x)
    box_losses(m, e, mask, {"energy": 1.0, "dice": 1.0})["total"].backward()
    # at the Grad-ECLIP start the layer weights, scale weights and the gate already learn ...
    for name in ("d_alpha", "d_beta", "gamma"):
        grad = getattr(hsrm, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert (hsrm.d_alpha.grad != 0).all() and (hsrm.d_beta.grad != 0).all()
    # ... and after one step (weights off their one-hot start) temperatures and projections learn too
    with torch.no_grad():
        for p in (hsrm.d_alpha, hsrm.d_beta, hsrm.gamma):
            p -= 0.1 * p.grad
    hsrm.zero_grad()
    m, e = hsrm(x)
    box_losses(m, e, mask, {"energy": 1.0, "dice": 1.0})["total"].backward()
    for name, p in hsrm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_maps_are_in_unit_range_and_upsampled():
    hsrm = make_hsrm()
    with torch.no_grad():
        hsrm.d_alpha.add_(0.3)
        hsrm.d_beta.add_(0.2)
        hsrm.gamma.fill_(2.0)
    m, e = hsrm(make_inputs(), out_size=(20, 28))
    grid, _ = hsrm(make_inputs())
    assert m.shape == (3, 20, 28) and e.shape == (3, 5, 7)
    assert torch.isfinite(m).all() and m.min() >= 0 and m.max() <= 1
    assert torch.allclose(grid.flatten(1).amax(1), torch.ones(3))
    # the image-size map is the grid map resized bilinearly (as every explainer does), not re-normalised
    up = torch.nn.functional.interpolate(grid[:, None], size=(20, 28), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(m, up.clamp(0, 1))


def test_constant_evidence_gives_zero_map_not_nan():
    x = make_inputs()
    x.evidence = torch.zeros_like(x.evidence)
    m, _ = make_hsrm()(x)
    assert torch.equal(m, torch.zeros_like(m))


def test_propagation_moves_evidence_between_related_regions():
    """Two patches with identical keys share evidence at s=1 with a low temperature."""
    hsrm = HSRM(num_layers=1, width=4, embed_dim=4, scales=(1,), tau=0.01)
    keys = torch.eye(4).repeat(1, 1).reshape(1, 1, 4, 4).clone()
    keys[0, 0, 3] = keys[0, 0, 0]  # patch 3 looks like patch 0
    ev = torch.tensor([1.0, 0.0, 0.0, 0.0]).reshape(1, 1, 2, 2)
    terms = hsrm.propagate(ev, keys, (2, 2))
    prop = terms[0, 0, 1].flatten()
    assert prop[3] > 0.4 and prop[0] > 0.4 and prop[1] < 0.01 and prop[2] < 0.01


@pytest.mark.parametrize("grid", [(7, 7), (4, 6), (14, 14)])
def test_any_grid_size(grid):
    h, w = grid
    m, _ = make_hsrm()(make_inputs(h=h, w=w))
    assert m.shape == (3, h, w)


def test_bad_shapes_and_config():
    with pytest.raises(ValueError, match="evidence must be"):
        make_hsrm()(make_inputs(l=3))
    with pytest.raises(ValueError, match="tau"):
        HSRM(num_layers=2, width=4, embed_dim=4, scales=(1, 2), tau=[0.1])
    with pytest.raises(ValueError, match="Unknown HSRM loss"):
        box_losses(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), {"iou": 1.0})


def test_losses_hand_computed():
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    e = torch.tensor([[[3.0, 1.0], [0.0, 0.0]]])
    torch.testing.assert_close(energy_loss(e, mask), -torch.log(torch.tensor([0.75])), atol=1e-5, rtol=0)
    m = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])
    torch.testing.assert_close(dice_loss(m, mask), torch.tensor([1 - 2 * 1.0 / (1.5 + 1.0)]), atol=1e-5, rtol=0)
    # peak inside with margin 0.5 > 0.1: no hinge; peak outside: hinge = 0.1 + (1.0 - 0.2)
    assert pointing_loss(m, mask).item() == 0
    m2 = torch.tensor([[[0.2, 1.0], [0.0, 0.0]]])
    torch.testing.assert_close(pointing_loss(m2, mask), torch.tensor([0.9]))
    # a box covering everything has no outside: no hinge
    assert pointing_loss(m2, torch.ones_like(mask)).item() == 0


@pytest.mark.parametrize(
    "grid,size", [((8, 8), (64, 64)), ((14, 14), (224, 224)), ((7, 9), (50, 61)), ((3, 5), (3, 5))]
)
def test_energy_loss_on_the_grid_equals_the_loss_of_the_upsampled_map(grid, size):
    """Training reads E on the patch grid against input-pixel masks (the adjoint of the bilinear upsampling): the
    loss and its gradient equal those of upsampling E first, also for sizes that are no multiple of the grid."""
    import torch.nn.functional as F

    from mmel.hsrm.losses import bilinear_adjoint

    g = torch.Generator().manual_seed(0)
    e = torch.rand(5, *grid, generator=g, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(5, *size, generator=g) > 0.6).double()
    up = F.interpolate(e[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    want, got = energy_loss(up, mask), energy_loss(e, mask)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    (dw,) = torch.autograd.grad(want.sum(), e)
    (dg,) = torch.autograd.grad(got.sum(), e)
    torch.testing.assert_close(dg, dw, atol=1e-12, rtol=0)
    # the adjoint itself: <U e, x> = <e, U^T x>
    x = torch.rand(5, *size, generator=g, dtype=torch.float64)
    torch.testing.assert_close((up * x).sum(), (e * bilinear_adjoint(x, grid)).sum(), atol=1e-9, rtol=0)


def test_energy_only_training_skips_the_map_and_map_losses_need_it():
    from mmel.hsrm.losses import needs_map

    x, hsrm = make_inputs(), make_hsrm()
    m, e = hsrm(x)
    assert torch.equal(hsrm.energy(x), e)
    assert not needs_map({"energy": 1.0, "dice": 0.0}) and needs_map({"energy": 1.0, "pointing": 0.5})
    mask = torch.zeros_like(e)
    mask[:, :2] = 1
    assert box_losses(None, e, mask, {"energy": 1.0})["total"] == box_losses(m, e, mask, {"energy": 1.0})["total"]
    with pytest.raises(ValueError, match="read the normalised map"):
        box_losses(None, e, mask, {"energy": 1.0, "dice": 1.0})


def test_k_prompts_share_their_image_quantities():
    """Keys/tokens given once per image (P = B*K pairs, image-major) == the same keys repeated for every pair."""
    b, k = 2, 3
    per_pair = make_inputs(p=b * k)
    shared = HSRMInputs(
        evidence=per_pair.evidence,
        keys=per_pair.keys[::k].clone(),
        patch_tokens=per_pair.patch_tokens[::k].clone(),
        text=per_pair.text,
    )
    repeated = HSRMInputs(
        evidence=per_pair.evidence,
        keys=shared.keys.repeat_interleave(k, 0),
        patch_tokens=shared.patch_tokens.repeat_interleave(k, 0),
        text=per_pair.text,
    )
    hsrm = make_hsrm()
    with torch.no_grad():
        hsrm.d_alpha.add_(0.3)
        hsrm.d_beta.add_(0.2)
        hsrm.gamma.fill_(2.0)
    for a, r in zip(hsrm(shared), hsrm(repeated), strict=True):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="HSRM inputs disagree"):
        hsrm(HSRMInputs(per_pair.evidence[:5], shared.keys, shared.patch_tokens, per_pair.text[:5]))


@pytest.mark.parametrize(
    ("kw", "frozen"),
    [
        ({"layer_weights": "uniform"}, {"d_alpha"}),
        ({"layer_weights": "last"}, {"d_alpha"}),
        ({"gate": False}, {"gamma"}),
    ],
)
def test_ablation_switches_fix_their_weights_and_change_the_map(kw, frozen):
    """Each switch removes a part: its weight is no longer a parameter (never trained) and the map follows."""
    x = make_inputs()
    full, ablated = make_hsrm(), make_hsrm(**kw)
    names = {n for n, _ in ablated.named_parameters()}
    assert not (frozen & names) and frozen <= set(ablated.state_dict())  # same keys, not trainable
    ablated.load_state_dict(full.state_dict())  # checkpoints stay interchangeable
    if kw.get("layer_weights") == "uniform":
        torch.testing.assert_close(ablated.alpha, torch.full((4,), 0.25))
        assert not torch.allclose(ablated(x)[0], full(x)[0])
    else:  # 'last' and no gate equal the full module at its start, and stay put when the full one moves
        torch.testing.assert_close(ablated(x)[0], full(x)[0])
        with torch.no_grad():
            if "layer_weights" in kw:
                full.d_alpha.add_(0.5)
            else:
                full.gamma.fill_(5.0)
        assert not torch.allclose(ablated(x)[0], full(x)[0])
    with pytest.raises(ValueError, match="layer_weights"):
        make_hsrm(layer_weights="softmax")


def test_no_propagation_is_the_unpropagated_term_only():
    x = make_inputs()
    h = make_hsrm(scales=())
    assert h.beta.shape == (1,) and h.propagate(x.evidence, x.keys, x.grid).shape[2] == 1
    torch.testing.assert_close(h(x)[0], make_hsrm()(x)[0])  # at the start both are Grad-ECLIP


@pytest.mark.parametrize("grid", [(5, 7), (14, 14)])
def test_precomputed_key_cosines_give_exactly_the_maps_of_the_keys(grid):
    """What a feature cache stores instead of the keys: per-scale cosines, packed as upper triangles."""
    from mmel.hsrm.module import key_cosines, pack_cosines, region_counts, unpack_cosines

    h, w = grid
    x = make_inputs(p=4, h=h, w=w)
    x = HSRMInputs(x.evidence, x.keys[:2], x.patch_tokens[:2], x.text)  # 2 images x 2 prompts
    hsrm = make_hsrm(scales=(1, 2, 4))
    with torch.no_grad():  # off the Grad-ECLIP start, so every propagated term and the gate count
        hsrm.d_alpha.copy_(torch.tensor([0.3, -0.2, 0.5, 0.1]))
        hsrm.d_beta.copy_(torch.tensor([0.0, 0.4, -0.3, 0.6]))
        hsrm.gamma.fill_(2.0)
    ref_m, ref_e = hsrm(x)
    cos = key_cosines(x.keys, grid, hsrm.scales)
    r = region_counts(grid, hsrm.scales)
    assert [tuple(c.shape) for c in cos] == [(2, 4, n, n) for n in r]
    assert all(torch.equal(c, c.transpose(-1, -2)) for c in cos)  # exactly symmetric: the triangle suffices
    packed = pack_cosines(cos)
    assert packed.shape == (2, 4, sum(n * (n + 1) // 2 for n in r))
    assert all(torch.equal(a, b) for a, b in zip(unpack_cosines(packed, grid, hsrm.scales), cos, strict=True))
    for given in (tuple(cos), packed):
        m, e = hsrm(HSRMInputs(x.evidence, None, x.patch_tokens, x.text, cosines=given))
        assert torch.equal(m, ref_m) and torch.equal(e, ref_e)
    # float16 storage: the maps move by about float16's resolution of a cosine, no more
    m16, _ = hsrm(HSRMInputs(x.evidence, None, x.patch_tokens, x.text, cosines=packed.half()))
    assert not torch.equal(m16, ref_m)
    torch.testing.assert_close(m16, ref_m, atol=2e-2, rtol=0)
    with pytest.raises(ValueError, match="need"):
        unpack_cosines(packed[..., :-1], grid, hsrm.scales)
    with pytest.raises(ValueError, match="keys or their cosines"):
        hsrm.propagate(x.evidence, None, grid)


def test_training_logs_the_loss_every_step_and_each_term_as_its_epoch_mean(micro_clip, monkeypatch):
    """One Lightning log call per step (the total); the terms are batch-size-weighted means over the epoch."""
    from mmel.lit_module import HSRMLitModule

    module = HSRMLitModule(clip=micro_clip, layers=2, losses={"energy": 1.0, "dice": 0.5})
    logged: list[tuple[str, float]] = []

    def log(name, value, **kw):
        logged.append((name, float(torch.as_tensor(value).detach())))

    monkeypatch.setattr(module, "log", log)
    g = torch.Generator().manual_seed(0)
    module.on_train_epoch_start()
    want = {"energy": [], "dice": []}
    for n in (3, 5):  # two batches of different sizes
        images = torch.randn(n, 3, 32, 32, generator=g)
        boxes = [torch.tensor([[4.0, 4.0, 20.0, 24.0]])] * n
        batch = {"images": images, "prompt": ["a red circle"] * n, "boxes": boxes}
        module.training_step(batch, 0)
        _, m, energy, masks = module._maps_and_masks(batch)
        terms = box_losses(m, energy, masks, {"energy": 1.0, "dice": 0.5})
        want["energy"].append((float(terms["energy"]), n))
        want["dice"].append((float(terms["dice"]), n))
    assert [name for name, _ in logged] == ["train/loss", "train/loss"]
    module.on_train_epoch_end()
    got = dict(logged[2:])
    for k, vals in want.items():
        mean = sum(v * n for v, n in vals) / sum(n for _, n in vals)
        assert got[f"train/loss_{k}"] == pytest.approx(mean, rel=1e-5), k


def test_hsrm_settings_are_written_once():
    """The HSRM, its trainer, the mmel explainer and both configs take their defaults from HSRMSettings."""
    import inspect
    from dataclasses import asdict

    from hydra import compose, initialize_config_dir

    from mmel.hsrm.explainer import MMELExplainer
    from mmel.hsrm.module import DEFAULTS, HSRM, hsrm_default
    from mmel.lit_module import HSRMLitModule
    from tests.conftest import CONF_DIR

    want = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(DEFAULTS).items()}
    for fn in (HSRM.__init__, HSRMLitModule.__init__, MMELExplainer.__init__):
        params = inspect.signature(fn).parameters
        got = {k: p.default for k, p in params.items() if k in want}
        assert got and all(getattr(DEFAULTS, k) == v for k, v in got.items()), fn.__qualname__
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        hsrm = compose("train").hsrm
        mmel = compose("evaluate", overrides=["explainer=mmel"]).explainer
    assert {k: hsrm[k] for k in want} == want
    assert {k: mmel[k] for k in ("layers", "scales", "tau")} == {k: want[k] for k in ("layers", "scales", "tau")}
    with pytest.raises(KeyError, match="no HSRM setting"):
        hsrm_default("scale")


def test_prompt_conditioning_starts_unconditioned_and_then_weighs_each_prompt_its_own_way():
    """conditioning=prompt: at its zero start the map is the unconditioned HSRM's; once C moves, two prompts of
    the same image get different layer / scale weights (and so different maps from the same evidence)."""
    x = make_inputs()
    plain, cond = make_hsrm(conditioning="none"), make_hsrm(conditioning="prompt")
    assert cond.cond.shape == (4 + 1 + 3, 12)
    torch.testing.assert_close(cond(x)[0], plain(x)[0])
    mask = torch.zeros(3, 5, 7)
    mask[:, 1:3, 2:5] = 1
    m, e = cond(x)
    box_losses(m, e, mask, {"energy": 1.0})["total"].backward()
    assert cond.cond.grad is not None and cond.cond.grad.abs().sum() > 0  # learns from step one
    same = HSRMInputs(x.evidence[:1].expand(2, -1, -1, -1), x.keys[:1], x.patch_tokens[:1], x.text[:2])
    with torch.no_grad():
        cond.cond.normal_()
    a, b = cond(same)[0]
    assert not torch.allclose(a, b)  # same image, same evidence, two prompts: two weightings
    pa, pb = plain(same)[0]
    torch.testing.assert_close(pa, pb)
    with pytest.raises(ValueError, match="conditioning"):
        make_hsrm(conditioning="text")
