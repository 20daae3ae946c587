"""The paper runner's benchmark tables (experiments/paper/benchmarks.py): planned for the backbones a spec names,
built from runs into tables and the ImageNet curves, and the demo's spec names real configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.paper import Paper, load_spec, per_backbone
from tests.test_paper import SPEC, fake_runner


def test_the_coco_spec_plans_the_benchmarks_for_vit_b16_only(tmp_path):
    subs = dict((out.name, sub) for sub, out in per_backbone(load_spec("coco"), tmp_path / "coco"))
    b16 = Paper(subs["vit-b-16"], tmp_path / "b16").plan()  # composes every config: a bad key would raise
    bench = [r for r in b16 if "benchmarks" in r.out.parts]
    for data in ("data=imagenet", "data=imagenet_s", "data=openimages_points"):
        assert any(data in r.overrides for r in bench), data
    assert all("model=vitb16" in r.overrides for r in bench)
    b32 = Paper(subs["vit-b-32"], tmp_path / "b32").plan()
    assert not [r for r in b32 if "benchmarks" in r.out.parts]
    assert not tmp_path.exists() or not any(tmp_path.rglob("*"))


def test_the_shapes_spec_benchmark_names_its_explainers():
    spec = load_spec("shapes")
    b = spec["benchmarks"]["imagenet"]
    assert "data=shapes_imagenet" in b["overrides"] and len(b["explainers"]) == 3
    assert set(b["explainers"]) <= set(spec["explainers"])


def test_benchmark_tables_and_curves_from_runs(tmp_path):
    spec = {**SPEC, "benchmarks": {"imagenet": {"title": "Table 6 — shapes ImageNet", "overrides":
                                                ["data=shapes_imagenet"], "limit": 8,
                                                "explainers": ["Grad-ECLIP (native)", "attention"]}}}  # fmt: skip
    calls: list = []
    html = Paper(spec, tmp_path, runner=fake_runner(calls)).build().read_text()
    assert "Table 6 — shapes ImageNet" in html
    summary = json.loads((tmp_path / "summary.json").read_text())
    t6 = summary["table-6"]
    assert t6["rows"] == ["Grad-ECLIP (native)", "attention"] and "deletion top-1 AUC" in t6["columns"]
    run = Path(tmp_path / "runs" / "benchmarks" / "imagenet" / "grad-eclip-native")
    assert (run / "metrics.json").is_file()
    # the deletion AUC column is the run's top-1 AUC output, declared by the ImageNet metric
    outputs = json.loads((run / "metrics.json").read_text())["outputs"]
    assert outputs["test/deletion_insertion/deletion_top1_auc"]["higher_is_better"] is False
    assert (tmp_path / "figures" / "imagenet_deletion_insertion.png").is_file()
    with pytest.raises(ValueError, match="no default columns"):
        Paper({**SPEC, "benchmarks": {"mine": {"explainers": ["attention"]}}}, tmp_path / "x",
              runner=fake_runner([])).build()  # fmt: skip
