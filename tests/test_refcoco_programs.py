"""RefCOCO through the programs: evaluate gives the same numbers from the refer files and from parquet; the leakage
guard refuses an HSRM on images it was trained on unless allowed, and then every table marks the run; the per-item
records come back from items.parquet for aggregation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from mmel.evaluation.overlap import TrainOverlapError
from tests.conftest import CONF_DIR

pytestmark = pytest.mark.program  # runs whole programs: `pytest -m "not program"` skips it

WORLD = {"n_train": 48, "n_val": 16, "n_test": 24}  # as tests/test_programs.py: one world per session
LIMIT = 24


@pytest.fixture(scope="module")
def world(shapes_world) -> Path:
    return shapes_world(seed=3, **WORLD)


def _cfg(program: str, out: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(program, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.log_dir = str(out.parent / "logs")
    (out / ".hydra").mkdir(parents=True)  # as a Hydra run leaves it (experiments/aggregate.py reads it)
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    return cfg


def _refcoco(world: Path, tmp: Path, *extra: str) -> list[str]:
    return ["data=refcoco", f"data.root={world / 'refer'}", f"data.hf_cache_dir={tmp / 'hf'}", "data.num_workers=0",
            "data.batch_size=8", "metrics=shapes", "figure_samples=0", f"limit={LIMIT}", *extra]  # fmt: skip


def _items(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "file"} for r in rows]


def test_refer_and_parquet_give_the_same_numbers_and_items(world, tmp_path):
    from experiments.aggregate import item_means, items_dataset
    from mmel.evaluate import run

    res = {}
    for source in ("refer", "parquet"):
        cfg = _cfg("evaluate", tmp_path / source, ["model=tiny", "explainer=grad_eclip", *_refcoco(world, tmp_path),
                                                   f"data.source={source}", "data.splits.test=testA"])  # fmt: skip
        res[source] = run(cfg)[0]
    a, b = res["refer"], res["parquet"]
    assert a["test/samples"] == b["test/samples"] > 0
    scalars = [k for k, v in a.items() if k.startswith("test/") and isinstance(v, int | float)]
    assert scalars and {k: a[k] for k in scalars} == {k: b[k] for k in scalars}
    assert _items(tmp_path / "refer") == _items(tmp_path / "parquet")
    # the per-item table read back for aggregation gives the run's own numbers again
    items = items_dataset([tmp_path / "refer", tmp_path / "parquet"], ["data.source"])
    assert len(items) == 2 * a["test/samples"]
    header, body = item_means(items, ["run"])
    hit = header.index("pointing_game/hit")
    for row in body:
        assert float(row[hit]) == pytest.approx(float(a["test/pointing_game/accuracy"]), abs=1e-4)


def test_the_leakage_guard(world, tmp_path):
    """An HSRM trained on the world's COCO train split has seen every shapes-RefCOCO image (as a COCO-trained HSRM
    has seen every real RefCOCO image): refused, unless allowed, and then recorded and marked."""
    from experiments.aggregate import build_table
    from experiments.paper.columns import metric_table
    from experiments.paper.runs import Run
    from mmel.evaluate import run as evaluate
    from mmel.train import run as train

    world_kw = "{" + ",".join(f"{k}:{v}" for k, v in WORLD.items()) + "}"
    shapes = [f"data.root={world}", "data.seed=3", f"++data.generate_kwargs={world_kw}"]
    train(_cfg("train", tmp_path / "train", ["model=micro", *shapes, "trainer.max_epochs=1", "data.batch_size=16",
                                              "test=false", f"feature_cache.dir={tmp_path / 'fc'}"]))  # fmt: skip
    ckpt = tmp_path / "train" / "hsrm.pt"
    trained = torch.load(ckpt, weights_only=True)["config"]["train_images"]
    assert len(trained) == WORLD["n_train"] and "coco:1" in trained  # COCO image ids, the train split's
    mmel = ["model=micro", "explainer=mmel", f"explainer.checkpoint={ckpt}"]

    with pytest.raises(TrainOverlapError, match=r"trained on 3 of the 3 images .*allow_train_overlap=true"):
        evaluate(_cfg("evaluate", tmp_path / "refused", [*mmel, *_refcoco(world, tmp_path)]))
    assert not (tmp_path / "refused" / "metrics.json").exists()

    allowed = evaluate(_cfg("evaluate", tmp_path / "allowed",
                            [*mmel, *_refcoco(world, tmp_path), "allow_train_overlap=true"]))[0]  # fmt: skip
    overlap = json.loads((tmp_path / "allowed" / "metrics.json").read_text())["train_overlap"]
    assert overlap["images"] == 3 and overlap["samples"] == allowed["test/samples"] > 0
    # the world's COCO test split shares no image with the training split: scored, overlap 0, no mark
    clean = evaluate(_cfg("evaluate", tmp_path / "clean", [*mmel, *shapes, "limit=8", "figure_samples=0"]))[0]
    assert clean["train_overlap"]["images"] == 0

    _, body = build_table([tmp_path / "allowed", tmp_path / "clean"], ["explainer.name"])
    assert body[0][-1] == "allowed † train overlap: 3 images" and body[1][-1] == "clean"

    def as_run(out: Path) -> Run:
        return Run("evaluate", [], out, json.loads((out / "metrics.json").read_text()), "")

    table = metric_table("T", {"MMEL": [as_run(tmp_path / "allowed")], "MMEL clean": [as_run(tmp_path / "clean")]},
                         {"pointing game": "pointing_game/accuracy"})  # fmt: skip
    assert (
        table.rows == ["MMEL †", "MMEL clean"] and "†: the HSRM was scored on images it was trained on" in table.title
    )


def test_the_coco_spec_plans_the_refcoco_table_for_every_backbone(tmp_path):
    from experiments.paper import Paper, load_spec, per_backbone

    subs = dict((out.name, sub) for sub, out in per_backbone(load_spec("coco"), tmp_path))
    assert all("refcoco" in sub.tables for sub in subs.values())  # ViT-B/16 and the other backbones
    runs = [r for r in Paper(subs["vit-b-16"], tmp_path / "vit-b-16").plan() if "data=refcoco" in r.overrides]
    splits = {("refcoco", s) for s in ("val", "testA", "testB")} | {("refcoco+", s) for s in ("val", "testA", "testB")}
    splits |= {("refcocog", "val"), ("refcocog", "test")}
    seen = {(o.split("=")[1], p.split("=")[1]) for r in runs for o in r.overrides for p in r.overrides
            if o.startswith("data.dataset=") and p.startswith("data.splits.test=")}  # fmt: skip
    assert seen == splits
    assert len(runs) == len(splits) * (3 + 3) and len({r.out for r in runs}) == len(runs)  # 3 methods + MMEL x 3 seeds
    assert all("allow_train_overlap=true" in r.overrides for r in runs)  # the HSRM rows are allowed, and marked
