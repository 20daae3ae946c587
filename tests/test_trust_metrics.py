"""The trust metrics as evaluate options (metrics=shapes_trust): per-item records equal independent
recomputations, the absent prompt is absent and stable, chunking changes nothing; the metric classes' replay
forms equal their direct forms."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from mmel.metrics import ModelRandomisation, PromptRandomisation, PromptSpecificity, prompt_specificity
from mmel.metrics.sanity import randomised_copies
from mmel.metrics.similarity import MEASURES, similarities
from mmel.metrics.specificity import _prompt_specificity_items, shares_attribute
from tests.sanity_oracle import explain_items, model_randomisation
from tests.test_evaluate import WORLD, compose_cfg

TRUST_KEYS = ("prompt_specificity", "prompt_randomisation", "model_randomisation")


@pytest.fixture(scope="module")
def world(shapes_world) -> Path:
    return shapes_world(seed=5, **WORLD)


class MapSpy:
    """Records every map the trust metrics compare, keyed by sample id, while an evaluate run scores.

    ``items[sid]``: the item's own map [h, w]; ``randomised[sid]``: its maps on the randomised models, one per
    (mode, step) in the order scored; ``absent[sid]``: its image's absent-prompt map. Wraps the two metrics'
    ``item_values`` and reads the context entries they read (computed once per batch: reading them again computes
    nothing new); what the metrics record is unchanged.
    """

    def __init__(self) -> None:
        self.items: dict[str, Tensor] = {}
        self.randomised: dict[str, list[Tensor]] = defaultdict(list)
        self.absent: dict[str, Tensor] = {}

    def install(self, mp: pytest.MonkeyPatch) -> None:
        real_model, real_prompt = ModelRandomisation.item_values, PromptRandomisation.item_values
        spy = self

        def model(self, ctx):
            for mode in self.modes:
                _, per_step = ctx.randomised(mode, self.seed)
                for j, sid in enumerate(ctx.ids):
                    spy.items[sid] = ctx.maps[j].float().cpu()
                    spy.randomised[sid] += [maps[j] for maps in per_step]
            return real_model(self, ctx)

        def prompt(self, ctx):
            for sid, (_, m, _) in zip(ctx.ids, ctx.absent(self.seed), strict=True):
                if m is not None:
                    spy.absent[sid] = m
            return real_prompt(self, ctx)

        mp.setattr(ModelRandomisation, "item_values", model)
        mp.setattr(PromptRandomisation, "item_values", prompt)


def run_with_spy(world: Path, out: Path, *over: str):
    """evaluate.run with the trust metrics on and a :class:`MapSpy` installed -> (results, parts, items, spy)."""
    from mmel.evaluate import run

    spy = MapSpy()
    with pytest.MonkeyPatch.context() as mp:
        spy.install(mp)
        res, parts = run(compose_cfg(world, out, "metrics=shapes_trust", "limit=14", "figure_samples=0", *over))
    items = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    return res, parts, items, spy


@pytest.fixture(scope="module")
def trust_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("trust") / "run"
    res, parts, items, spy = run_with_spy(world, out, "data.batch_size=5", "save_maps=true")
    return out, res, parts, items, spy


# Why maps, not similarities, are compared across computations: a batched and a one-image explanation differ by
# float32 kernel rounding (measured <= 7e-7 on these maps, on an AVX-512 CPU). Spearman, HOG (and any rank or
# binning measure) are discontinuous in the maps: a patch at exactly 0 (ReLU) in one computation and at 1e-7 in the
# other leaves a tie group of ~1000 pixels, and a weak gradient changes orientation bin. The same items moved Spearman
# by 1.4e-4 and HOG by 6e-3 between batch compositions, by an amount that depends on the CPU's kernels. The maps
# themselves move by the rounding only, so they are compared at MAP_ATOL: 1e-5 is 14x the measured difference and
# 1e-5 of a map's [0, 1] range, far below anything a metric reads as signal.
MAP_ATOL = 1e-5
# A similarity recomputed from the SAME maps: float64 internally, stored as float32 -> one float32 rounding apart.
SAME_MAPS_ATOL = 1e-6
# Continuous measures (SSIM, in-box energies) of maps that moved by <= MAP_ATOL move by at most a few times that.
CONTINUOUS_ATOL = 1e-4
DISCONTINUOUS = ("spearman", "hog")


def _annotations(world: Path) -> tuple[dict, dict]:
    ann = json.loads(next((world / "coco" / "annotations").glob("instances_test*.json")).read_text())
    cats = {c["id"]: c["name"] for c in ann["categories"]}
    objects: dict[int, list[tuple[str, list[float]]]] = defaultdict(list)
    for a in ann["annotations"]:
        x, y, w, h = a["bbox"]
        objects[a["image_id"]].append((cats[a["category_id"]], [x, y, x + w, y + h]))
    return objects, {im["id"]: (im["height"], im["width"]) for im in ann["images"]}


def test_specificity_records_equal_the_functional_metric_on_the_saved_maps(world, trust_run):
    """Rebuild every pair from the annotation file (named object, the image's other objects, the colour rule) and
    score the saved maps with the functional metric: the engine's numbers must match."""
    out, res, parts, items, _ = trust_run
    transform = parts["datamodule"].transform
    objects, sizes = _annotations(world)
    maps = {}
    for f in sorted((out / "maps").glob("chunk_*.npz")):
        with np.load(f) as z:
            maps.update({k: torch.from_numpy(z[k].astype(np.float32)) for k in z.files})
    m_list, named, other, hard = [], [], [], []
    for r in items:
        objs = objects[r["image_id"]]
        size = sizes[r["image_id"]]
        mine = [b for c, b in objs if c == r["category"]]
        rest = [(c, b) for c, b in objs if c != r["category"]]
        m_list.append(maps[r["sample_id"]])
        named.append(transform.boxes(torch.tensor(mine), size, count=False))
        other.append(transform.boxes(torch.tensor([b for _, b in rest]).reshape(-1, 4), size, count=False))
        hard.append(any(c.split()[0] == r["category"].split()[0] for c, _ in rest))
    ref = prompt_specificity(torch.stack(m_list), named, other, hard=torch.tensor(hard))
    multi = sum(len(o) > 0 for o in other)
    assert 0 < multi < len(items), "the fixture should mix single- and multi-object images"
    assert sum(hard) > 0, "the fixture should contain a same-colour pair"
    for k in ("specificity", "hard_specificity", "named_rate", "other_rate", "background_rate", "pairs",
              "hard_pairs", "skipped"):  # fmt: skip
        assert res[f"test/prompt_specificity/{k}"] == pytest.approx(float(ref[k]), abs=1e-6, nan_ok=True), k
    # one absent pair per image, on the image's first record
    images = {r["image_id"] for r in items}
    firsts = [r for r in items if r["metrics"]["prompt_specificity"]["absent"]]
    assert res["test/prompt_specificity/absent_pairs"] == len(images) == len(firsts)


def test_absent_prompt_is_absent_and_the_same_for_every_item_of_an_image(world, trust_run):
    _, res, _, items, _ = trust_run
    objects, _ = _annotations(world)
    by_image: dict[int, set[str]] = defaultdict(set)
    for r in items:
        pr = r["metrics"]["prompt_randomisation"]
        by_image[r["image_id"]].add(pr["prompt"])
        assert not any(pr["prompt"].endswith(f" {c}.") for c, _ in objects[r["image_id"]]), pr["prompt"]
        assert set(pr) == {"prompt", *MEASURES}
    assert all(len(p) == 1 for p in by_image.values())
    assert len({next(iter(p)) for p in by_image.values()}) > 1  # seeded per image, not one prompt for all
    assert res["test/prompt_randomisation/pairs"] == len(items)
    sp = np.mean([r["metrics"]["prompt_randomisation"]["spearman"] for r in items])
    assert res["test/prompt_randomisation/spearman"] == pytest.approx(sp, abs=1e-6)


def test_model_randomisation_records_equal_the_sanity_check_on_the_same_items(trust_run):
    """The engine's per-item curves are the sanity check's measures (mmel.metrics.sanity) of the maps the engine
    explained, item by item, mode by mode and step by step; those maps are the ones the sanity module explains
    directly, one image at a time, to float rounding (see MAP_ATOL for why the curves themselves are not compared
    across the two computations)."""
    _, res, parts, items, spy = trust_run
    clip, ds = parts["clip"], parts["datamodule"].dataset("test")
    transform = parts["datamodule"].transform
    first = items[:4]
    images = torch.stack([transform(ds.load(r["index"]))["image"] for r in first])
    prompts = [r["prompt"] for r in first]
    from mmel.explainers import build_explainer

    def build(c):  # the run's explainer: evaluate's default, grad_eclip
        return build_explainer("grad_eclip", c)

    original = explain_items(build(clip), images, prompts, batch_size=1)
    engine_original = torch.stack([spy.items[r["sample_id"]] for r in first])
    torch.testing.assert_close(engine_original, original, atol=MAP_ATOL, rtol=0)
    n_steps = len(clip.model.visual.transformer.resblocks) + 2
    for r in items:  # every scored item was re-explained once per (mode, step)
        assert len(spy.randomised[r["sample_id"]]) == 2 * n_steps, r["sample_id"]
    for m_i, mode in enumerate(("cascading", "independent")):
        curve, direct_original = model_randomisation(clip, build, images, prompts, mode=mode, batch_size=1)
        steps = first[0]["metrics"]["model_randomisation"]["steps"]
        assert curve.steps == steps and len(steps) == n_steps
        torch.testing.assert_close(direct_original, original, atol=0, rtol=0)  # same call, same bits
        for s, (step, rclip) in enumerate(randomised_copies(clip, mode, 0)):
            assert step == steps[s]
            direct = explain_items(build(rclip), images, prompts, batch_size=1)
            engine = torch.stack([spy.randomised[r["sample_id"]][m_i * n_steps + s] for r in first])
            torch.testing.assert_close(engine, direct, atol=MAP_ATOL, rtol=0, msg=f"{mode} {step}")
            # the sanity module's curve is the measures of its own maps; the engine's records those of the engine's
            for name, v in similarities(original, direct).items():
                torch.testing.assert_close(curve.values[name][s], v, atol=0, rtol=0, equal_nan=True)
            for name, v in similarities(engine_original, engine).items():
                got = torch.tensor([r["metrics"]["model_randomisation"][mode][name][s] for r in first])
                torch.testing.assert_close(got, v, atol=SAME_MAPS_ATOL, rtol=0, equal_nan=True, msg=name)
        end = np.nanmean([r["metrics"]["model_randomisation"][mode]["spearman"][-1] for r in items])
        assert res[f"test/model_randomisation/{mode}/spearman"] == pytest.approx(end, abs=1e-6)


def test_chunking_changes_no_trust_number(world, trust_run, tmp_path):
    """Other chunks (batch size 3 instead of 5): every map a trust metric read is the same to float rounding, every
    continuous number the same to CONTINUOUS_ATOL. Rank and binning measures (DISCONTINUOUS) are not compared by
    value across the two runs (see MAP_ATOL); the test above pins that they are the measures of the maps compared
    here."""
    _, res, _, items, spy = trust_run
    other, _, other_items, spy_b = run_with_spy(world, tmp_path / "b", "data.batch_size=3")
    assert sorted(r["sample_id"] for r in other_items) == sorted(r["sample_id"] for r in items)
    for sid, m in spy.items.items():
        torch.testing.assert_close(spy_b.items[sid], m, atol=MAP_ATOL, rtol=0, msg=sid)
        torch.testing.assert_close(torch.stack(spy_b.randomised[sid]), torch.stack(spy.randomised[sid]),
                                   atol=MAP_ATOL, rtol=0, msg=sid)  # fmt: skip
    assert spy.absent and spy_b.absent.keys() == spy.absent.keys()
    for sid, m in spy.absent.items():
        torch.testing.assert_close(spy_b.absent[sid], m, atol=MAP_ATOL, rtol=0, msg=sid)
    keys = [k for k in res if k.startswith(tuple(f"test/{t}" for t in TRUST_KEYS))]
    continuous = [k for k in keys if not any(d in k for d in DISCONTINUOUS)]
    assert len(continuous) > 20 and len(keys) > len(continuous)
    for k in continuous:
        assert float(other[k]) == pytest.approx(float(res[k]), abs=CONTINUOUS_ATOL, nan_ok=True), k


# ------------------------------------------------------------------------------------------ metric classes
def _pairs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(7, 12, 12, generator=g)
    named = [torch.tensor([[0.0, 0.0, 5.0, 5.0]])] * 5 + [torch.zeros(0, 4)] * 2
    other = [torch.tensor([[6.0, 6.0, 12.0, 12.0]])] * 4 + [torch.zeros(0, 4)] + [torch.tensor([[0.0, 6, 6, 12]])] * 2
    hard = torch.tensor([True, False, True, False, False, False, False])
    return maps, named, other, hard


def test_specificity_replay_equals_update():
    """update(records=...) (the protocol's replay; was update_values) == update on the maps."""
    maps, named, other, hard = _pairs()
    a = PromptSpecificity()
    a.update(maps, named, other, hard=hard)
    v = _prompt_specificity_items(maps, named, other)
    b = PromptSpecificity()
    b.update(records=[{"named": float(v["named"][k]), "other": float(v["other"][k]), "kind": int(v["kind"][k]),
                       "hard": bool(hard[k]), "absent": None} for k in range(len(hard))])  # fmt: skip
    for k, x in a.compute().items():
        torch.testing.assert_close(b.compute()[k], x, equal_nan=True, msg=k)
    assert v["kind"].tolist() == [1, 1, 1, 1, 0, 2, 2]


def test_hard_rule():
    assert shares_attribute("red circle", ["red star", "blue circle"], "first_word")
    assert not shares_attribute("red circle", ["blue circle", "red circle"], "first_word")
    assert not shares_attribute("red circle", ["red star"], None)
    with pytest.raises(ValueError, match="hard='colour'"):
        PromptSpecificity(hard="colour")


def test_randomisation_metrics_replay_equals_direct():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(5, 32, 32, generator=g), torch.rand(5, 32, 32, generator=g)
    p = PromptRandomisation()
    p.update(a, b)
    direct = similarities(a, b)
    for m in MEASURES:
        assert float(p.compute()[m]) == pytest.approx(float(direct[m].mean()), abs=1e-6)
    assert float(p.compute()["prompt_insensitive"]) == 0.0 and float(p.compute()["pairs"]) == 5
    q = PromptRandomisation(flag_above=0.9)
    q.update(a, a)
    assert float(q.compute()["prompt_insensitive"]) == 1.0

    mr = ModelRandomisation(modes=["cascading"])
    steps = ["head", "block 0"]
    mr.update(a, {"cascading": [b, a]}, steps)
    out = mr.compute()
    assert out["cascading/spearman"] == pytest.approx(1.0)  # the last step's maps are the originals
    assert float(out["cascading/spearman@head"]) == pytest.approx(float(direct["spearman"].mean()), abs=1e-6)
    with pytest.raises(ValueError, match="modes"):
        ModelRandomisation(modes=["sideways"])
