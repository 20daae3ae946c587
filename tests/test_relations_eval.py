"""The relational world on disk and its metrics: the refer layout carries every relation annotation and the
counterfactual images; relational accuracy, context coverage and the absent-evidence AUROC compute what their
definitions say, replay from their records, and run end to end through evaluate."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict
from torchmetrics.functional.classification import binary_auroc

from mmel.data.base import DatasetError
from mmel.data.relations import ShapesRelations
from mmel.data.shapes.relations import look_alikes, relational_scene
from mmel.data.shapes.relations_writer import generate_relations, relations_params
from mmel.metrics.relational import (
    AbsentEvidence,
    ContextCoverage,
    RelationalAccuracy,
    auroc,
    context_coverage,
    model_knows,
    relational_correct,
)
from tests.conftest import CONF_DIR

SMALL = {"n_train": 12, "n_val": 6, "n_test": 12}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return generate_relations(tmp_path_factory.mktemp("relworld") / "w", seed=5, **SMALL)


def test_the_world_is_deterministic_and_only_rewritten_when_asked(world, tmp_path):
    again = generate_relations(tmp_path / "w", seed=5, **SMALL)
    a, b = (json.loads((r / "MANIFEST.json").read_text())["files"] for r in (world, again))
    assert a == b  # same parameters, same bytes (sha256 of every file)
    other = generate_relations(tmp_path / "x", seed=6, **SMALL)
    assert json.loads((other / "MANIFEST.json").read_text())["files"] != a
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "mine.txt").write_text("not ours")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_relations(tmp_path / "user", seed=5, **SMALL)
    with pytest.raises(ValueError, match="n_test"):
        relations_params(n_test=-1)


def test_refs_carry_the_relation_and_its_boxes(world):
    refs = pickle.loads((world / "refcocog" / "refs(umd).p").read_bytes())
    inst = json.loads((world / "refcocog" / "instances.json").read_text())
    boxes = {a["id"]: a["bbox"] for a in inst["annotations"]}
    assert len(refs) == 2 * sum(SMALL.values())
    by_image: dict[int, list[dict]] = {}
    for r in refs:
        by_image.setdefault(r["image_id"], []).append(r)
    for pair in by_image.values():
        assert len(pair) == 2
        a, b = pair
        # each is the other's look-alike, and each one's swapped words are the other's expression
        assert a["swapped"] == b["sentences"][0]["sent"] and b["swapped"] == a["sentences"][0]["sent"]
        assert a["lookalike_ann_ids"] == [b["ann_id"]] and b["lookalike_ann_ids"] == [a["ann_id"]]
        for r in pair:
            assert all(i in boxes for i in r["lookalike_ann_ids"] + r["context_ann_ids"])
            assert (r["kind"] == "row") == (r["context_ann_ids"] == [])
            assert ("counterfactual" in r) == (r["split"] != "train")
            if "counterfactual" in r:
                assert (world / r["counterfactual"]).is_file()
    # the referent box is the rendered scene's (test split, first scene: index 0 of split "test")
    first_test = min(r["image_id"] for r in refs if r["split"] == "test")
    rs = relational_scene(5, "test", 0, size=64, size_range=(0.16, 0.30), clutter=2)
    ref0 = next(r for r in refs if r["image_id"] == first_test and r["sent_ids"][0] % 2 == 0)
    x, y, w, h = boxes[ref0["ann_id"]]
    assert (x, y, x + w, y + h) == tuple(rs.referent_box(rs.referrals[0]))
    hidden = set(look_alikes(rs.referrals, rs.referrals[0]))
    cf = relational_scene(5, "test", 0, size=64, size_range=(0.16, 0.30), clutter=2, hide_for=0)
    assert set(cf.hidden) == hidden


def test_the_dataset_reads_the_relation_fields(world):
    ds = ShapesRelations(world, "test")
    assert len(ds) == 2 * SMALL["n_test"]
    item = ds[0]
    assert item["swapped"] != item["prompt"] and item["kind"] and item["relation"] in item["prompt"] + " single"
    assert item["lookalikes"].shape[1] == 4 and Path(item["counterfactual"]).is_file()
    assert not np.array_equal(np.asarray(item["lookalikes"]), item["boxes"].numpy())


def test_a_ref_without_the_relation_fields_is_a_clear_error(world, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(world, bad)
    path = bad / "refcocog" / "refs(umd).p"
    refs = pickle.loads(path.read_bytes())
    del refs[-1]["swapped"]
    path.write_bytes(pickle.dumps(refs))
    with pytest.raises(DatasetError, match=r"refs\(umd\).p: ref \d+ has no \['swapped'\]"):
        ShapesRelations(bad, "test")
    refs[-1]["swapped"] = "x"
    refs[-1]["lookalike_ann_ids"] = [10**9]
    path.write_bytes(pickle.dumps(refs))
    with pytest.raises(DatasetError, match="lookalike_ann_ids .1000000000. are not annotations"):
        ShapesRelations(bad, "test")


# ------------------------------------------------------------------------------------------------ metrics
def _box(x0, y0, x1, y1):
    return torch.tensor([[float(x0), y0, x1, y1]])


def test_relational_correct_compares_the_peaks_on_the_referent_and_its_look_alike():
    maps = torch.zeros(3, 8, 8)
    maps[0, 1, 1] = 1.0  # on the referent
    maps[1, 6, 6] = 1.0  # on the look-alike
    maps[2] = 0.5  # flat: a tie
    ref, look = _box(0, 0, 3, 3), _box(5, 5, 8, 8)
    got = relational_correct(maps, [ref] * 3, [look] * 3)
    assert got.tolist() == [1.0, 0.0, 0.5]
    # the peak outside both boxes does not count: only the values inside each box
    maps2 = torch.zeros(1, 8, 8)
    maps2[0, 0, 7] = 1.0
    maps2[0, 1, 1], maps2[0, 6, 6] = 0.2, 0.3
    assert relational_correct(maps2, [ref], [look]).tolist() == [0.0]
    with pytest.raises(ValueError, match="look-alike"):
        relational_correct(maps, [ref] * 3, [torch.zeros(0, 4)] * 3)


class _Scorer:
    """Cosines chosen per image: image i's cosine with each prompt."""

    def __init__(self, prompts, table):
        self.prompts, self.table = prompts, table

    def index(self, p):
        return self.prompts.index(p)

    def cosines(self, images):
        return torch.stack([self.table[int(im.flatten()[0])] for im in images])


def test_model_knows_reads_the_clip_on_the_counterfactual_image():
    scorer = _Scorer(["a", "b"], {0: torch.tensor([0.9, 0.1]), 1: torch.tensor([0.2, 0.8])})
    cfs = [torch.zeros(3, 2, 2), torch.ones(3, 2, 2), None]
    assert model_knows(scorer, cfs, ["a", "a", "a"], ["b", "b", "b"]) == [True, False, None]
    with pytest.raises(ValueError):
        model_knows(scorer, cfs[:1], ["a"], ["c"])


def test_relational_accuracy_splits_by_what_the_model_knows_and_replays():
    from mmel.metrics.protocol import ItemContext

    maps = torch.zeros(4, 8, 8)
    maps[0, 1, 1] = maps[1, 1, 1] = 1.0  # right
    maps[2, 6, 6] = maps[3, 6, 6] = 1.0  # wrong
    ref, look = [_box(0, 0, 3, 3)] * 4, [_box(5, 5, 8, 8)] * 4
    scorer = _Scorer(["t", "s"], {0: torch.tensor([1.0, 0.0]), 1: torch.tensor([0.0, 1.0])})
    cfs = [torch.zeros(3, 2, 2), torch.ones(3, 2, 2), torch.zeros(3, 2, 2), torch.zeros(3, 2, 2)]
    ctx = ItemContext(maps=maps, boxes=ref, sizes=torch.tensor([[8, 8]] * 4), prompts=["t"] * 4, scorer=scorer,
                      lookalikes=look, swapped=["s"] * 4, counterfactuals=cfs)  # fmt: skip
    m = RelationalAccuracy()
    records = m.item_values(ctx)
    assert [r["knows"] for r in records] == [True, False, True, True]
    m.update(records=records)
    out = m.compute()
    assert out["accuracy"] == 0.5 and out["model_knows"] == 0.75
    assert out["accuracy_model_knows"] == pytest.approx(1 / 3) and out["accuracy_model_wrong"] == 1.0
    direct = RelationalAccuracy()
    direct.update(maps, ref, look, knows=[r["knows"] for r in records])
    assert {k: float(v) for k, v in direct.compute().items()} == {k: float(v) for k, v in out.items()}


def test_context_coverage_is_the_mass_share_on_the_mentioned_objects():
    maps = torch.zeros(2, 8, 8)
    maps[0, 1, 1], maps[0, 6, 6] = 3.0, 1.0
    maps[1, 1, 1] = 1.0
    got = context_coverage(maps, [_box(0, 0, 3, 3), torch.zeros(0, 4)])
    assert got[0].item() == pytest.approx(0.75) and torch.isnan(got[1])
    m = ContextCoverage()
    m.update(maps, [_box(0, 0, 3, 3), torch.zeros(0, 4)])
    assert m.compute().item() == pytest.approx(0.75)  # the item that mentions nothing is not scored


def test_auroc_is_the_mann_whitney_area_with_ties_counted_half():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randint(0, 5, (40,), generator=g).float(), torch.randint(0, 4, (30,), generator=g).float()
    ref = binary_auroc(torch.cat([pos, neg]), torch.cat([torch.ones(40), torch.zeros(30)]).long())
    assert auroc(pos, neg).item() == pytest.approx(ref.item(), abs=1e-6)
    assert auroc(torch.tensor([2.0]), torch.tensor([1.0])).item() == 1.0
    assert torch.isnan(auroc(torch.tensor([1.0]), torch.zeros(0)))


def test_absent_evidence_counts_one_absent_prompt_per_image():
    from mmel.metrics.protocol import ItemContext

    rows = [(5.0, 1.0, True), (0.5, 1.0, False), (2.0, None, True)]  # two items of image A, one of image B
    ctx = ItemContext(maps=torch.zeros(3, 2, 2), evidence=lambda seed: rows)
    m = AbsentEvidence()
    recs = m.item_values(ctx)
    m.update(records=recs)
    out = m.compute()
    # present {5, 0.5, 2} vs absent {1} (image A's, once): 2 of 3 above
    assert out["auroc"].item() == pytest.approx(2 / 3) and out["paired"].item() == pytest.approx(0.5)


def test_evidence_is_the_raw_maps_positive_mass(micro_clip):
    from mmel.explainers import build_explainer

    e = build_explainer("grad_eclip", micro_clip)
    images = torch.randn(1, 3, 32, 32)
    raw = e.raw_maps(images, ["a red circle", "a blue square"]).detach()
    ev = e.evidence(images, ["a red circle", "a blue square"])
    assert torch.allclose(ev, raw.clamp(min=0).flatten(2).sum(-1))


# ------------------------------------------------------------------------------------------------ program
@pytest.mark.program
def test_evaluate_runs_the_relational_metrics_end_to_end(world, tmp_path):
    from mmel.evaluate import run

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            "model=tiny", "explainer=grad_eclip", "data=shapes_relations", f"data.root={world}", "data.seed=5",
            f"+data.generate_kwargs={json.dumps(SMALL).replace(chr(34), '')}", "metrics=shapes_relations",
            "figure_samples=0"])  # fmt: skip
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.paths.log_dir = str(tmp_path / "logs")
    metrics = run(cfg)[0]
    for key in ("relational_accuracy/accuracy", "relational_accuracy/model_knows", "context_coverage",
                "absent_evidence/auroc", "absent_evidence/paired"):  # fmt: skip
        assert 0.0 <= metrics[f"test/{key}"] <= 1.0, key
    assert metrics["test/samples"] == 2 * SMALL["n_test"]
    items = [json.loads(x) for x in (tmp_path / "out" / "items.jsonl").read_text().splitlines()]
    assert all(isinstance(r["metrics"]["relational_accuracy"]["knows"], bool) for r in items)
    n_known = sum(r["metrics"]["relational_accuracy"]["knows"] for r in items)
    assert metrics["test/relational_accuracy/n_model_knows"] == n_known
