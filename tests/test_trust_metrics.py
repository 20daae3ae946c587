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

from mmel.metrics import ModelRandomisation, PromptRandomisation, PromptSpecificity, prompt_specificity
from mmel.metrics.sanity import model_randomisation
from mmel.metrics.similarity import MEASURES, similarities
from mmel.metrics.specificity import _prompt_specificity_items, shares_attribute
from tests.test_evaluate import WORLD, compose_cfg

TRUST_KEYS = ("prompt_specificity", "prompt_randomisation", "model_randomisation")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from mmel.data.shapes import generate

    return generate(tmp_path_factory.mktemp("world"), seed=5, **WORLD)


@pytest.fixture(scope="module")
def trust_run(world, tmp_path_factory):
    from mmel.evaluate import run

    out = tmp_path_factory.mktemp("trust") / "run"
    res, parts = run(compose_cfg(world, out, "metrics=shapes_trust", "limit=14", "data.batch_size=5",
                                 "save_maps=true", "figure_samples=0"))  # fmt: skip
    items = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    return out, res, parts, items


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
    out, res, parts, items = trust_run
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
    _, res, _, items = trust_run
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
    """The engine's per-item curves == mmel.metrics.sanity.model_randomisation run directly on those items."""
    _, res, parts, items = trust_run
    clip, ds = parts["clip"], parts["datamodule"].dataset("test")
    transform = parts["datamodule"].transform
    first = items[:4]
    images = torch.stack([transform(ds.load(r["index"]))["image"] for r in first])
    from mmel.explainers import build_explainer

    def build(c):  # the run's explainer: evaluate's default, grad_eclip
        return build_explainer("grad_eclip", c)

    for mode in ("cascading", "independent"):
        curve, _ = model_randomisation(clip, build, images, [r["prompt"] for r in first], mode=mode, batch_size=1)
        steps = first[0]["metrics"]["model_randomisation"]["steps"]
        assert curve.steps == steps and len(steps) == len(clip.model.visual.transformer.resblocks) + 2
        for m in MEASURES:
            got = torch.tensor([r["metrics"]["model_randomisation"][mode][m] for r in first]).T  # [S, N]
            # HOG bins gradient orientations: on a randomised model's near-flat maps, the 1e-7 differences between a
            # batched and a one-image explanation move weak gradients across bins (measured up to 6e-3)
            atol = 1e-2 if m == "hog" else 1e-4
            torch.testing.assert_close(got, curve.values[m].float(), atol=atol, rtol=0, equal_nan=True, msg=m)
        end = np.nanmean([r["metrics"]["model_randomisation"][mode]["spearman"][-1] for r in items])
        assert res[f"test/model_randomisation/{mode}/spearman"] == pytest.approx(end, abs=1e-6)


def test_chunking_changes_no_trust_number(world, trust_run, tmp_path):
    from mmel.evaluate import run

    _, res, _, _ = trust_run
    other, _ = run(compose_cfg(world, tmp_path / "b", "metrics=shapes_trust", "limit=14", "data.batch_size=3",
                               "figure_samples=0"))  # fmt: skip
    keys = [k for k in res if k.startswith(tuple(f"test/{t}" for t in TRUST_KEYS))]
    assert len(keys) > 20
    for k in keys:
        # batch composition moves maps by ~1e-7; HOG turns that into up to ~2e-3 on the randomised models' near-flat
        # maps (weak gradients change orientation bin; L2-Hys normalisation scales near-empty blocks up)
        tol = 5e-3 if "hog" in k else 1e-4  # ranks of near-equal pixels: ~1e-5
        assert float(other[k]) == pytest.approx(float(res[k]), abs=tol, nan_ok=True), k


# ------------------------------------------------------------------------------------------ metric classes
def _pairs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(7, 12, 12, generator=g)
    named = [torch.tensor([[0.0, 0.0, 5.0, 5.0]])] * 5 + [torch.zeros(0, 4)] * 2
    other = [torch.tensor([[6.0, 6.0, 12.0, 12.0]])] * 4 + [torch.zeros(0, 4)] + [torch.tensor([[0.0, 6, 6, 12]])] * 2
    hard = torch.tensor([True, False, True, False, False, False, False])
    return maps, named, other, hard


def test_specificity_update_values_equals_update():
    maps, named, other, hard = _pairs()
    a = PromptSpecificity()
    a.update(maps, named, other, hard=hard)
    v = _prompt_specificity_items(maps, named, other)
    b = PromptSpecificity()
    b.update_values(v["named"], v["other"], v["kind"], hard)
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
