"""Paired tests behind the tables' significance marks: known p-values on constructed data, pairing by (sample_id,
seed), no mark for a row identical to its reference, every ablation row planned over every seed, and the legend."""

from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from experiments.paper import Paper, PaperSpec, Run, make_plan
from experiments.paper.paired import MCNEMAR, SIGN_FLIP, marked_table, paired, versus
from experiments.stats import mark, mcnemar, sign_flip
from experiments.tables import Cell, Column, Table

HIT = "pointing_game"


# --------------------------------------------------------------------------------------------- the tests
def test_ten_wins_and_no_losses_give_two_in_1024():
    """The sign test on 10 discordant pairs all one way: two-sided p = 2 * (1/2)^10."""
    assert mcnemar([1] * 10 + [1] * 5, [0] * 10 + [1] * 5).p_value == pytest.approx(2 / 1024)
    # the same ten differences as continuous values: 2^10 sign patterns enumerated, two as extreme
    r = sign_flip([0.7] * 10, [0.2] * 10)
    assert r.exact and r.p_value == pytest.approx(2 / 1024) and r.diff == pytest.approx(0.5)


def test_sign_flip_on_hand_computed_cases_and_its_clusters():
    # differences 1, 2, 3: of the 8 sign patterns only +++ and --- reach |sum| = 6
    assert sign_flip([1, 2, 3], [0, 0, 0]).p_value == pytest.approx(2 / 8)
    # 1, 1, 2, 2 as four independent pairs: 2 of 16 patterns reach 6; as two items over two seeds (the item's
    # pairs flipped together: sums 2 and 4) 2 of 4 patterns do
    d, items = [1, 1, 2, 2], ["x", "x", "y", "y"]
    assert sign_flip(d, [0] * 4).p_value == pytest.approx(2 / 16)
    clustered = sign_flip(d, [0] * 4, clusters=items)
    assert clustered.p_value == pytest.approx(2 / 4) and (clustered.pairs, clustered.clusters) == (4, 2)
    with pytest.raises(ValueError, match="3 cluster labels for 4 pairs"):
        sign_flip(d, [0] * 4, clusters=items[:3])


def test_sign_flip_monte_carlo_agrees_with_enumeration_and_is_deterministic():
    """14 items: 16 384 patterns > 10 000 resamples, so p is drawn; it must match the exact p computed here by
    enumeration within 4 binomial standard deviations of 10 000 draws (sd <= 0.005), and repeat exactly."""
    rng = np.random.default_rng(3)
    d = rng.normal(0.3, 1.0, 14)
    exact = np.mean([abs(np.dot(s, d)) >= abs(d.sum()) - 1e-12 for s in itertools.product((-1, 1), repeat=14)])
    r = sign_flip(d, np.zeros(14))
    assert not r.exact and abs(r.p_value - exact) < 0.02
    assert sign_flip(d, np.zeros(14)) == r  # a fixed seed: the same records give the same p


def test_identical_values_get_p_one_and_no_mark():
    a = np.random.default_rng(0).random(200)
    assert sign_flip(a, a.copy()).p_value == 1.0 and mcnemar(a > 0.5, a > 0.5).p_value == 1.0
    assert [mark(p) for p in (0.009, 0.01, 0.049, 0.05, 1.0, None)] == ["**", "*", "*", "", "", ""]


# ------------------------------------------------------------------------------- pairing on run folders
def _run(folder: Path, values: dict[str, float], order: list[str] | None = None) -> Run:
    """A finished evaluate run whose items.jsonl records ``values`` (sample_id -> pointing hit or energy)."""
    folder.mkdir(parents=True)
    lines = [json.dumps({"sample_id": k, "metrics": {HIT: {"v": values[k]}}}) for k in order or list(values)]
    (folder / "items.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "metrics.json").write_text("{}")
    return Run("evaluate", [], folder, {}, "hash")


def get(r: dict) -> float | None:
    return r["metrics"][HIT]["v"]


def test_pairs_are_matched_by_sample_id_and_seed(tmp_path):
    ids = [f"s{i}" for i in range(10)]
    seed0 = {k: float(i % 2) for i, k in enumerate(ids)}
    seed1 = {k: float(i < 5) for i, k in enumerate(ids)}
    ref = [_run(tmp_path / "ref0", seed0), _run(tmp_path / "ref1", seed1)]
    # the same values, records in another order: every (item, seed) pair agrees
    same = [_run(tmp_path / "a0", seed0, ids[::-1]), _run(tmp_path / "a1", seed1, ids[3:] + ids[:3])]
    t = versus(same, ref, get)
    assert (t.test, t.p, t.pairs, t.items, t.left_out) == (MCNEMAR, 1.0, 20, 10, 0)
    # the seeds swapped: item i of seed 0 meets item i of seed 1, and 12 of the 20 pairs disagree (pooled over the
    # two seeds they cancel, so it is the pairs, not the p-value, that show the pairing)
    a, b, units, _ = paired(same[::-1], ref, get)
    assert sum(x != y for x, y in zip(a, b, strict=True)) == mcnemar(a, b).b + mcnemar(a, b).c == 12
    a, b, _, _ = paired(same, ref, get)
    assert a == b
    assert units[:10] == sorted(ids)  # each pair knows its item (the unit a sign flip keeps together)


def test_missing_items_are_left_out_and_counted_and_a_single_run_repeats_per_seed(tmp_path):
    ids = [f"s{i}" for i in range(8)]
    energy = {k: 0.1 * i for i, k in enumerate(ids)}
    ref = [_run(tmp_path / "ref0", energy), _run(tmp_path / "ref1", {k: v + 0.05 for k, v in energy.items()})]
    short = _run(tmp_path / "short", {k: energy[k] + 0.2 for k in ids[:6]})  # a training-free row, 6 items
    t = versus([short], ref, get)
    assert t.test == SIGN_FLIP and (t.pairs, t.items, t.left_out) == (12, 6, 4)
    assert t.diff == pytest.approx(np.mean([0.2] * 6 + [0.15] * 6))
    with pytest.raises(ValueError, match="cannot be paired by seed"):
        versus(ref + [short], ref, get)
    (tmp_path / "twice").mkdir()
    record = json.dumps({"sample_id": "s0", "metrics": {HIT: {"v": 1.0}}})
    (tmp_path / "twice" / "items.jsonl").write_text(f"{record}\n{record}\n")
    with pytest.raises(ValueError, match="twice/items.jsonl: sample_id 's0' recorded twice"):
        versus([Run("evaluate", [], tmp_path / "twice", {}, "h")], ref, get)


def test_a_marked_table_marks_only_real_differences_in_every_format(tmp_path):
    """A row identical to the reference gets p = 1 and no mark; a row that wins every pair gets ** and the legend
    says which test, how many pairs and over how many seeds (Markdown, CSV, HTML, LaTeX)."""
    ids = [f"s{i}" for i in range(30)]
    miss = {k: 0.0 for k in ids}
    rows = {
        "full": [_run(tmp_path / f"f{s}", miss) for s in range(3)],
        "same": [_run(tmp_path / f"s{s}", miss) for s in range(3)],
        "better (training-free)": [_run(tmp_path / "b", {k: 1.0 for k in ids})],
    }
    table = Table("t", list(rows), [Column("PG"), Column("per category")], [[Cell(0.5), Cell(0.5)]] * 3)
    out = marked_table(table, rows, "full", {"PG": get, "per category": None}, n_seeds=3)
    full, same, better = out.cells
    assert full[0].p is None and same[0].p == 1.0 and same[0].mark == "" and same[0].pairs == 90
    assert better[0].p == pytest.approx(2 * 0.5**90) and better[0].mark == "**" and better[1].p is None
    assert "exact McNemar" in out.legend and "90 per test" in out.legend and "3 training seeds" in out.legend
    assert "better (training-free)" in out.legend and "Not tested (no per-item values): per category" in out.legend
    md = out.markdown()
    assert "| better (training-free) | **0.500** \\*\\* | **0.500** |" in md and md.rstrip().endswith(out.legend)
    assert "| same | **0.500** | **0.500** |" in md
    rows_csv = list(csv.DictReader(io.StringIO(out.csv())))
    assert rows_csv[2]["PG_mark"] == "**" and rows_csv[1]["PG_p"] == "1.0" and rows_csv[0]["PG_p"] == ""
    assert "<sup>**</sup>" in out.html() and "class='legend'" in out.html()
    assert "$^{**}$" in out.latex()
    assert "PG_p" not in table.csv()  # a table without tests keeps its columns


# ------------------------------------------------------------------------------------------- the plan
def test_every_ablation_row_is_trained_and_scored_over_every_seed(tmp_path):
    spec = PaperSpec.parse({
        "name": "x", "seeds": [0, 1, 2], "explainers": {"MMEL": ["explainer=mmel", "explainer.layers=2"]},
        "ablation_overrides": ["trainer.max_epochs=1"],
        "ablations": {"full HSRM": [], "no gate": ["hsrm.gate=false"], "last only": ["hsrm.layer_weights=last"]},
    })  # fmt: skip
    plan = make_plan(spec, tmp_path)
    for label, trains in plan.ablations.items():
        assert [t.overrides[-1] for t in trains] == ["seed=0", "seed=1", "seed=2"]
        scores = plan.tables["ablations"][label]
        for t, e in zip(trains, scores, strict=True):  # each seed's score reads that seed's checkpoint
            assert f"explainer.checkpoint={t.out / 'hsrm.pt'}" in e.overrides and plan.training_of(e) == t
            assert "explainer.layers=2" in e.overrides  # scored as the spec's MMEL row is
    runs = plan.runs()
    ablation_runs = [r for r in runs if "ablations" in r.out.parts]
    assert len(ablation_runs) == 2 * 3 * 3 and len({r.out for r in runs}) == len(runs)
    # a training equal to a seed's main training is that training (no ablation overrides: the full HSRM)
    raw = {"name": "x", "seeds": [0, 1, 2], "explainers": {"MMEL": ["explainer=mmel"]},
           "ablations": {"full HSRM": [], "no gate": ["hsrm.gate=false"]}}  # fmt: skip
    plain = make_plan(PaperSpec.parse(raw), tmp_path)
    assert plain.ablations["full HSRM"] == list(plain.trainings.values())
    assert plain.ablations["no gate"][0] != plain.trainings[0]


# ----------------------------------------------------------------------- the tables of a (fake) paper run
def test_tables_1_3_and_4_carry_tests_against_their_reference(tmp_path):
    from tests.test_paper import SPEC, fake_runner

    spec = {**SPEC, "seeds": [0, 1, 2], "phrases": {"overrides": ["data.format=flickr30k"],
                                                    "explainers": ["Grad-ECLIP (native)", "MMEL"]}}  # fmt: skip
    paper = Paper(spec, tmp_path, runner=fake_runner([]))
    paper.build()
    summary = json.loads((tmp_path / "summary.json").read_text())
    t4 = summary["table-4"]
    assert t4["rows"] == ["full HSRM", "no alignment gate"] and t4["title"].startswith("Table 4 — HSRM ablations (3")
    full, gate = t4["cells"]
    assert all(c["p"] is None for c in full) and full[0]["std"] is not None  # three seeds: a spread
    # the p of the pointing game, recomputed here from the runs' records: (item, seed) pairs of the two rows
    hits = {label: [{r["sample_id"]: r["metrics"]["pointing_game"]["hit"] for r in
                     map(json.loads, (tmp_path / "runs" / "ablations" / slug / f"seed{s}" / "items.jsonl")
                         .read_text().splitlines())} for s in (0, 1, 2)]
            for label, slug in (("full", "full-hsrm"), ("gate", "no-alignment-gate"))}  # fmt: skip
    a = [hits["gate"][s][k] for s in range(3) for k in sorted(hits["gate"][s])]
    b = [hits["full"][s][k] for s in range(3) for k in sorted(hits["full"][s])]
    assert gate[0]["p"] == pytest.approx(mcnemar(a, b).p_value) and gate[0]["pairs"] == len(a) == 3 * 40
    assert gate[1]["p"] is not None and gate[3]["p"] is None  # energy tested; Δ (train.py's own test) not
    assert "“full HSRM”" in t4["legend"] and "pooled over 3 training seeds" in t4["legend"]
    t1 = summary["table-1"]
    mmel = t1["rows"].index("MMEL")
    assert all(c["p"] is None for c in t1["cells"][mmel])
    assert all(t1["cells"][i][0]["p"] is not None for i in range(len(t1["rows"])) if i != mmel)
    assert "training-free: attention, Grad-ECLIP (native)" in t1["legend"]
    t3 = summary["table-3"]
    assert t3["cells"][0][0]["p"] is not None and "PG: red" in t3["columns"]
    assert t4["legend"] in (tmp_path / "tables" / "table-4.md").read_text()


def test_fewer_than_three_seeds_are_allowed_and_the_legend_says_so(tmp_path):
    """A quick spec (shapes_quick: one seed) still builds its ablation table, with spreads and tests over fewer
    seeds than a claim needs: the legend says so instead of refusing."""
    from tests.test_paper import SPEC, fake_runner

    Paper(SPEC, tmp_path, runner=fake_runner([])).build()  # SPEC has two seeds
    t4 = json.loads((tmp_path / "summary.json").read_text())["table-4"]
    assert "Only 2 training seeds" in t4["legend"] and "not for citing" in t4["legend"]
    assert t4["cells"][1][0]["pairs"] == 2 * 40
