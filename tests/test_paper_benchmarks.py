"""The benchmark tables the specs add as `tables:` entries (RefCOCO, ImageNet protocol, ImageNet-S, OpenImages
points): planned for every backbone of coco.yaml, the demo's names real configs, and built from runs with the ImageNet
metric's declared columns and its curves."""

from __future__ import annotations

import json

from experiments.paper import Paper, load_spec, per_backbone
from tests.test_paper import SPEC, fake_runner


def test_the_coco_spec_plans_the_benchmarks_for_every_backbone(tmp_path):
    subs = {out.name: sub for sub, out in per_backbone(load_spec("coco"), tmp_path / "coco")}
    for sub in subs.values():  # the issue: these tables for ViT-B/16 and the other backbones
        assert set(sub.tables) == {"refcoco", "imagenet", "imagenet_s", "openimages_points"}
    runs = Paper(subs["vit-b-16"], tmp_path / "b16").plan()  # composes every config: a bad key would raise
    for data in ("data=imagenet", "data=imagenet_s", "data=openimages_points"):
        bench = [r for r in runs if data in r.overrides]
        assert bench and all("model=vitb16" in r.overrides for r in bench), data
    assert not tmp_path.exists() or not any(tmp_path.rglob("*"))


def test_the_demo_spec_names_the_imagenet_protocol_on_the_shapes_world():
    spec = load_spec("shapes")
    t = spec.tables["imagenet"]
    assert "data=shapes_imagenet" in t.overrides and len(t.explainers) == 3
    assert dict(t.columns)["deletion top-1 AUC"] == "deletion_insertion/deletion_top1_auc"


def test_the_imagenet_table_and_curves_from_runs(tmp_path):
    shapes = load_spec("shapes").tables["imagenet"]
    table = {"title": "Table 6 — shapes ImageNet", "overrides": list(shapes.overrides), "limit": 8,
             "explainers": ["Grad-ECLIP (native)", "attention"], "columns": dict(shapes.columns)}  # fmt: skip
    Paper({**SPEC, "tables": {"imagenet": table}}, tmp_path, runner=fake_runner([])).build()
    t6 = json.loads((tmp_path / "summary.json").read_text())["table-6"]
    assert t6["rows"] == ["Grad-ECLIP (native)", "attention"] and "deletion top-1 AUC" in t6["columns"]
    run = tmp_path / "runs" / "imagenet" / "grad-eclip-native" / "metrics.json"
    outputs = json.loads(run.read_text())["outputs"]  # declared by the ImageNet metric (metrics=shapes_imagenet)
    assert outputs["test/deletion_insertion/deletion_top1_auc"]["higher_is_better"] is False
    assert outputs["test/deletion_insertion/insertion_top10_auc"]["higher_is_better"] is True
    assert (tmp_path / "figures" / "imagenet_curves.png").is_file()


def test_curves_of_different_lengths_share_one_panel(tmp_path):
    """The faithfulness figure holds RISE-style rows (21 points) beside Grad-ECLIP's protocol (11 points): each row
    spans the same axis, and its legend AUC is its own trapezoid over it."""
    import numpy as np

    from mmel.evaluation.figures import curves_panels

    curves = {"a": {"deletion": np.linspace(1, 0, 21)}, "b": {"deletion": np.linspace(1, 0, 11)}}
    assert curves_panels(curves, np.linspace(0, 1, 21), tmp_path / "c.png").is_file()
