"""The paper runner: runs named by a spec are made once and reused, tables carry seeds' mean ± std and item
bootstrap intervals, MMEL vs Grad-ECLIP gets its paired tests, and everything lands in one report."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from experiments.paper import Paper, PaperSpec, load_spec, run_program
from mmel.evaluate import build_metrics
from mmel.metrics.protocol import outputs_of

pytestmark = pytest.mark.program  # runs whole programs: `pytest -m "not program"` skips it

N_ITEMS = 40


def _value(cfg, salt: str) -> float:
    """A deterministic per-run number in [0.2, 0.8] from the explainer, checkpoint (seed) and a salt."""
    explainer = cfg.get("explainer") or {}  # train runs have none
    key = f"{explainer.get('name')}|{explainer.get('checkpoint')}|{cfg.get('seed')}|{salt}"
    return 0.2 + 0.6 * (zlib.crc32(key.encode()) % 1000) / 1000


def fake_runner(calls):
    def for_program(program):
        def run(cfg):
            out = Path(cfg.paths.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            calls.append((program, out.name))
            if program == "train":
                pg = _value(cfg, "train")
                m = {"test/pointing_game": pg, "test/energy": pg / 2, "test/grad_eclip_pointing_game": 0.5,
                     "hsrm_checkpoint": str(out / "hsrm.pt")}  # fmt: skip
            else:
                rng = np.random.default_rng(zlib.crc32(str(out).encode()))
                p = _value(cfg, "pg")
                hits = (rng.random(N_ITEMS) < p).astype(float)
                items = [
                    {"sample_id": f"s{i}", "category": "red" if i % 2 else "blue",
                     "metrics": {"pointing_game": {"hit": h, "difficult": i % 3 == 0},
                                 "energy_pointing_game": {"energy": p / 2 + 0.01 * (i % 5)},
                                 "saliency_iou": {"iou": p / 3},
                                 "deletion_insertion": {"deletion_auc": 1 - p, "insertion_auc": p,
                                                        "deletion_curve": [1.0, 1 - p, 0.0],
                                                        "insertion_curve": [0.0, p, 1.0]}}}
                    for i, h in enumerate(hits)
                ]  # fmt: skip
                m = {"test/pointing_game/accuracy": float(hits.mean()), "test/energy_pointing_game": p / 2,
                     "test/saliency_iou/miou": p / 3, "test/deletion_insertion/deletion_auc": 1 - p,
                     "test/deletion_insertion/insertion_auc": p}  # fmt: skip
                if cfg.metrics.model_randomisation.enabled:  # the trust metrics' records and keys
                    steps = ["head", "block 0", "embed"]
                    for r in items:
                        r["metrics"]["model_randomisation"] = {
                            "steps": steps, **{mode: {ms: [p, p / 2, p / 4] for ms in ("spearman", "ssim", "hog")}
                                               for mode in ("cascading", "independent")}}  # fmt: skip
                        r["metrics"]["prompt_randomisation"] = {"prompt": "x", "spearman": p, "ssim": p, "hog": p}
                    for mode in ("cascading", "independent"):
                        for ms in ("spearman", "ssim", "hog"):
                            m[f"test/model_randomisation/{mode}/{ms}"] = p / 4
                            m.update({f"test/model_randomisation/{mode}/{ms}@{st.replace(' ', '')}": v
                                      for st, v in zip(steps, (p, p / 2, p / 4), strict=True)})  # fmt: skip
                    m["test/prompt_randomisation/spearman"] = p
                    m["test/prompt_specificity/specificity"] = 1 - p / 2
                (out / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
                # what each key means, declared by the configured metrics themselves (as evaluate writes it)
                m["outputs"] = outputs_of(build_metrics(cfg.metrics), "test")
            (out / "metrics.json").write_text(json.dumps(m))
            return m, {}

        return run

    return for_program


SPEC = {
    "name": "fake",
    "overrides": ["model=micro"],
    "seeds": [0, 1],
    "explainers": {
        "attention": ["explainer=attention"],
        "Grad-ECLIP (native)": ["explainer=grad_eclip"],
        "MMEL": ["explainer=mmel"],
    },  # fmt: skip
    "compare": ["MMEL", "Grad-ECLIP (native)"],
    "faithfulness": {"limit": 8, "explainers": ["Grad-ECLIP (native)", "MMEL"], "protocol": ["metrics.scorer=top1"]},
    "ablation_overrides": ["trainer.max_epochs=1"],
    "ablations": {"full HSRM": [], "no alignment gate": ["hsrm.gate=false"]},
    "trust": {"overrides": ["metrics=shapes_trust"], "limit": 8, "explainers": ["Grad-ECLIP (native)", "MMEL"]},
}


def test_paper_builds_tables_report_and_reuses_runs(tmp_path):
    calls: list = []
    report = Paper(SPEC, tmp_path, runner=fake_runner(calls)).build()
    html = report.read_text()
    assert "Table 1 — localisation" in html and "Table 4 — HSRM ablations" in html and "<img" in html
    n_first = len(calls)
    # 2 trainings + (attention, grad_eclip, 2 x mmel) + faithfulness (grad_eclip, 2 x mmel, protocol) + 2 ablations
    # x 2 seeds, each trained and evaluated + trust (grad_eclip, 2 x mmel)
    assert n_first == 2 + 4 + 4 + 2 * 2 * 2 + 3
    summary = json.loads((tmp_path / "summary.json").read_text())
    t1 = summary["table-1"]
    mmel = t1["cells"][t1["rows"].index("MMEL")]
    runs = [json.loads((tmp_path / "runs" / "localisation" / "mmel" / f"seed{s}" / "metrics.json").read_text())
            for s in (0, 1)]  # fmt: skip
    pgs = [r["test/pointing_game/accuracy"] for r in runs]
    assert mmel[0]["value"] == pytest.approx(np.mean(pgs)) and mmel[0]["std"] == pytest.approx(np.std(pgs, ddof=1))
    assert mmel[0]["low"] <= mmel[0]["value"] <= mmel[0]["high"]  # the interval brackets the seed mean
    att = t1["cells"][t1["rows"].index("attention")]
    assert att[0]["std"] is None and att[1]["value"] is None  # one run: no std; a metric no run made: missing
    sig = summary["significance"]
    assert len(sig["mcnemar_per_seed"]) == 2 and 0 < sig["max_p"] <= 1 and sig["energy"]["n"] == N_ITEMS
    assert (tmp_path / "tables" / "table-1.tex").read_text().startswith("\\begin{tabular}")
    assert (tmp_path / "figures" / "deletion_insertion.png").is_file()
    assert (tmp_path / "figures" / "sanity_curves.png").is_file() and "Table 5 — trust" in html
    t5 = summary["table-5"]
    ge = t5["cells"][t5["rows"].index("Grad-ECLIP (native)")]
    ge_run = json.loads((tmp_path / "runs" / "trust" / "grad-eclip-native" / "metrics.json").read_text())
    assert ge[0]["value"] == pytest.approx(ge_run["test/model_randomisation/cascading/spearman"])
    # everything again: nothing is recomputed, the same tables come out
    Paper(SPEC, tmp_path, runner=fake_runner(calls)).build()
    assert len(calls) == n_first
    assert json.loads((tmp_path / "summary.json").read_text())["table-1"] == t1


def test_a_run_folder_of_other_overrides_is_never_overwritten(tmp_path):
    calls: list = []
    run_program("evaluate", ["model=micro", "explainer=attention"], tmp_path / "r", fake_runner(calls)("evaluate"))
    with pytest.raises(ValueError, match="holds a run of `evaluate model=micro explainer=attention`"):
        run_program("evaluate", ["model=micro", "explainer=game"], tmp_path / "r", fake_runner(calls)("evaluate"))
    assert len(calls) == 1


def test_the_shapes_spec_names_real_configs():
    from tests.test_configs import options

    spec = load_spec("shapes")  # a typed, checked PaperSpec (experiments/paper/spec.py)
    assert len(spec.seeds) >= 3
    methods = list(spec.explainers.values())
    names = {o.split("=", 1)[1] for m in methods for o in m.overrides if o.startswith("explainer=")}
    assert len(names) == len(spec.explainers)  # one explainer config per row
    assert any(m.limit for m in methods)  # RISE's own cap (a dict entry) is read
    assert names <= set(options("explainer")), names - set(options("explainer"))
    for key in ("faithfulness", "phrases", "grid"):
        assert set(getattr(spec, key).explainers) <= set(spec.explainers), key
    assert set(spec.compare) <= set(spec.explainers)
    with pytest.raises(FileNotFoundError, match="known"):
        load_spec("nope")


def test_the_coco_spec_plans_every_run_per_backbone_without_running_or_writing(tmp_path):
    from experiments.paper import per_backbone

    spec = load_spec("coco")
    subs = per_backbone(spec, tmp_path / "coco")
    assert [out.name for _, out in subs] == ["vit-b-32", "vit-b-16", "vit-l-14"]
    sub, out = subs[1]
    runs = Paper(sub, out).plan()  # composes every config: an unknown key or value would raise here
    assert not tmp_path.exists() or not any(tmp_path.rglob("*"))
    trains = [r for r in runs if r.program == "train"]
    assert [r.overrides for r in trains[:3]] == [["data=coco", "trainer=gpu", "model=vitb16", f"seed={s}"]
                                                 for s in (0, 1, 2)]  # fmt: skip
    # every ablation row over every seed; coco's full HSRM (no ablation overrides) is the seed's main training
    assert spec.ablations[next(iter(spec.ablations))] == () and not spec.ablation_overrides
    assert len(trains) == 3 + 3 * (len(spec.ablations) - 1)
    mmel = [r for r in runs if "explainer=mmel" in r.overrides]
    assert mmel and all(any(o.startswith("explainer.checkpoint=") and o.endswith("hsrm.pt") for o in r.overrides)
                        for r in mmel)  # fmt: skip
    assert any("data=flickr30k" in r.overrides for r in runs)  # Table 3 on Flickr30k Entities
    assert len({r.out for r in runs}) == len(runs)  # one folder per run


def test_the_relations_spec_plans_its_world_model_and_every_ablation_seed(tmp_path):
    """The relational paper: every run reads the relational world with the relations CLIP, every ablation row is
    trained over every seed, and the columns it adds are outputs the relational metrics declare."""
    from mmel.metrics.relational import AbsentEvidence, ContextCoverage, RelationalAccuracy

    spec = load_spec("relations")
    runs = Paper(spec, tmp_path / "relations").plan()  # composes every config
    assert all({"model=tiny_relations", "data=shapes_relations"} <= set(r.overrides) for r in runs)
    trains = [r for r in runs if r.program == "train"]
    assert len(trains) == len(spec.seeds) * (1 + len(spec.ablations)) and len(spec.seeds) >= 3
    assert any("hsrm.conditioning=none" in r.overrides for r in trains)
    declared = {f"relational_accuracy/{o.name}" for o in RelationalAccuracy.outputs}
    declared |= {"context_coverage"} | {f"absent_evidence/{o.name}" for o in AbsentEvidence.outputs}
    assert ContextCoverage.outputs[0].name == "" and set(dict(spec.columns["localisation"]).values()) <= declared


def test_a_spec_adds_a_column_by_naming_an_output(tmp_path):
    """`columns: {localisation: {label: output}}` puts any declared output into Table 1, with its direction and its
    item interval read from the runs' declarations; a table the runner does not make is refused."""
    spec = {**SPEC, "columns": {"localisation": {"energy (again)": "energy_pointing_game"}}}
    paper = Paper(spec, tmp_path, runner=fake_runner([]))
    paper.build()
    t1 = json.loads((tmp_path / "summary.json").read_text())["table-1"]
    j, k = t1["columns"].index("energy (again)"), t1["columns"].index("energy PG")
    for row in t1["cells"]:
        assert row[j] == row[k] and row[j]["low"] is not None
    table, _ = paper.localisation()  # the runs are reused: the direction comes from the declarations
    assert table.columns[j].higher_is_better is True
    with pytest.raises(ValueError, match="unknown tables"):
        Paper({**SPEC, "columns": {"ablations": {"x": "y"}}}, tmp_path / "b", runner=fake_runner([])).build()


def test_a_spec_is_checked_and_typed_before_anything_runs(tmp_path):
    """A typo in a spec is an error naming the key (it never drops a table silently); a table naming an explainer
    the spec does not define is refused; the plan is a pure function of the spec."""
    from experiments.paper import SpecError, make_plan

    for bad, match in (
        ({**SPEC, "faithfullness": SPEC["faithfulness"]}, "unknown keys \\['faithfullness'\\]"),
        ({**SPEC, "trust": {**SPEC["trust"], "explainers": ["Grad-ECLIP"]}}, "trust.explainers: \\['Grad-ECLIP'\\]"),
        ({**SPEC, "seeds": []}, "seeds: expected a non-empty list"),
        ({**SPEC, "limit": 0}, "limit: expected a positive integer"),
        ({**SPEC, "explainers": {"x": {"overides": []}}}, "explainers.x: unknown keys"),
    ):
        with pytest.raises(SpecError, match=match):
            Paper(bad, tmp_path)
    spec = PaperSpec.parse(SPEC)
    plan = make_plan(spec, tmp_path)
    assert make_plan(spec, tmp_path) == plan and not any(tmp_path.iterdir())  # pure: same answer, nothing written
    mmel = plan.tables["localisation"]["MMEL"]
    assert [r.out.name for r in mmel] == ["seed0", "seed1"]
    assert all(
        f"explainer.checkpoint={plan.trainings[s].out / 'hsrm.pt'}" in r.overrides
        for s, r in zip((0, 1), mmel, strict=True)
    )
    assert set(plan.tables) == {"localisation", "faithfulness", "trust", "ablations"}
    assert set(plan.ablations) == set(plan.tables["ablations"]) == set(SPEC["ablations"])


def test_a_benchmark_table_is_one_spec_entry(tmp_path):
    """`tables: {name: {title, explainers, overrides, columns}}` adds a table of evaluate runs with the columns it
    names, in the report and summary, with no runner code."""
    spec = {**SPEC, "tables": {"boxes again": {"title": "Table 6 — boxes again", "explainers": ["attention", "MMEL"],
                                               "overrides": ["data.format=flickr30k"],
                                               "columns": {"IoU": "saliency_iou/miou"}}}}  # fmt: skip
    calls: list = []
    Paper(spec, tmp_path, runner=fake_runner(calls)).build()
    t6 = json.loads((tmp_path / "summary.json").read_text())["table-6"]
    assert t6["rows"] == ["attention", "MMEL"] and t6["columns"] == ["IoU"]
    run = json.loads((tmp_path / "runs" / "boxes-again" / "attention" / "metrics.json").read_text())
    assert t6["cells"][0][0]["value"] == pytest.approx(run["test/saliency_iou/miou"])
    assert ("evaluate", "attention") in calls and (tmp_path / "tables" / "table-6.md").is_file()


def test_the_qualitative_grid_is_drawn_from_the_runs_saved_maps_without_the_model(shapes_world, tmp_path, monkeypatch):
    """The report's grid reads the maps the Table 1 runs saved (the plan gives the grid's methods save_maps=true)
    and rebuilds each image from the run's data config and recorded preprocessing: CLIP is neither loaded nor run."""
    from experiments.paper.figures import grid_figure, saved_maps, scored_views
    from experiments.paper.spec import GridSpec

    world = shapes_world(seed=5, n_train=8, n_val=4, n_test=22)
    data = ["model=micro", f"data.root={world}", "data.seed=5", "++data.generate_kwargs={n_train:8,n_val:4,n_test:22}"]
    rows = {
        label: [run_program("evaluate", [*data, f"explainer={name}", "save_maps=true", "figure_samples=0"],
                            tmp_path / name)]
        for label, name in (("attention", "attention"), ("Grad-ECLIP", "grad_eclip"))
    }  # fmt: skip
    plan = PaperSpec.parse({**SPEC, "grid": {"items": 3, "seed": 0, "explainers": ["attention", "MMEL"]}})
    from experiments.paper import make_plan

    planned = make_plan(plan, tmp_path / "p").tables["localisation"]
    assert "save_maps=true" in planned["attention"][0].overrides and "save_maps=true" in planned["MMEL"][0].overrides
    assert "save_maps=true" not in planned["Grad-ECLIP (native)"][0].overrides

    def no_model(*a, **k):
        raise AssertionError("the grid must not load CLIP")

    monkeypatch.setattr("mmel.backbone.load_clip", no_model)
    monkeypatch.setattr("open_clip.create_model_and_transforms", no_model)
    path = grid_figure(GridSpec(3, 0, ("attention", "Grad-ECLIP")), rows, tmp_path / "grid.png")
    assert path.is_file() and path.stat().st_size > 5000
    records = rows["attention"][0].items()[:3]
    views = scored_views(rows["attention"][0], records)
    for label, (run,) in rows.items():
        by_id = {r["sample_id"]: r for r in run.items()}
        maps = saved_maps(run, [r["sample_id"] for r in records])
        for rec, (img, boxes) in zip(records, views, strict=True):
            m = maps[rec["sample_id"]]
            assert m.shape == img.shape[:2] and np.isfinite(m).all() and boxes  # the map is in the image's frame
            peak = by_id[rec["sample_id"]]["peak"]  # the run's own peak is the saved map's maximum
            assert m[peak["y"], peak["x"]] == pytest.approx(m.max(), abs=2e-3), label
    (rows["attention"][0].out / "maps" / "chunk_000000.npz").unlink()
    with pytest.raises(FileNotFoundError, match="save_maps=true"):
        saved_maps(rows["attention"][0], [records[0]["sample_id"]])


def test_a_table_of_variants_has_a_column_per_variant_and_can_be_one_backbones(tmp_path):
    """`variants: {column: [overrides]}` (e.g. a benchmark's splits) makes one run set per (explainer, variant)
    and a column per variant showing `output`; `backbones:` limits the table to those backbones."""
    from experiments.paper import SpecError, per_backbone

    table = {"title": "Table 6 — splits", "explainers": ["attention", "MMEL"], "output": "pointing_game/accuracy",
             "variants": {"val": ["split=val"], "test": ["split=test"]}, "backbones": ["B"]}  # fmt: skip
    spec = {**SPEC, "backbones": {"A": ["model=micro"], "B": ["model=micro"]}, "tables": {"splits": table}}
    (a, _), (b, out) = per_backbone(PaperSpec.parse(spec), tmp_path)
    assert not a.tables and set(b.tables) == {"splits"}
    calls: list = []
    Paper(b, out, runner=fake_runner(calls)).build()
    t6 = json.loads((out / "summary.json").read_text())["table-6"]
    assert t6["columns"] == ["val", "test"] and t6["rows"] == ["attention", "MMEL"]
    for v in ("val", "test"):
        run = json.loads((out / "runs" / "splits" / v / "attention" / "metrics.json").read_text())
        assert t6["cells"][0][t6["columns"].index(v)]["value"] == pytest.approx(run["test/pointing_game/accuracy"])
    mmel = [json.loads((out / "runs" / "splits" / "val" / "mmel" / f"seed{s}" / "metrics.json").read_text())
            for s in (0, 1)]  # fmt: skip
    assert t6["cells"][1][0]["value"] == pytest.approx(np.mean([m["test/pointing_game/accuracy"] for m in mmel]))
    with pytest.raises(SpecError, match="needs `output`"):
        PaperSpec.parse({**SPEC, "tables": {"x": {"explainers": ["MMEL"], "variants": {"v": []}}}})
    with pytest.raises(SpecError, match="backbones: \\['C'\\]"):
        PaperSpec.parse({**spec, "tables": {"splits": {**table, "backbones": ["C"]}}})


def test_two_labels_that_share_a_folder_are_an_error_not_one_run(tmp_path):
    from experiments.paper import make_plan

    spec = {**SPEC, "tables": {"t": {"explainers": ["attention"], "output": "pointing_game/accuracy",
                                     "variants": {"a b": ["split=val"], "a-b": ["split=test"]}}}}  # fmt: skip
    with pytest.raises(ValueError, match="would share the folder"):
        make_plan(PaperSpec.parse(spec), tmp_path).runs()


def test_a_key_given_twice_in_a_spec_file_is_an_error(tmp_path):
    """Plain YAML keeps the last of two equal keys: a second `tables:` would drop the first's tables silently."""
    from experiments.paper import SpecError

    path = tmp_path / "twice.yaml"
    path.write_text("name: x\nseeds: [0]\nexplainers: {a: [explainer=attention]}\ntables: {}\ntables: {}\n")
    with pytest.raises(SpecError, match="line 5: the key 'tables' is given twice"):
        load_spec(str(path))
