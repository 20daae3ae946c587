"""Paper tables and figures from one command: ``python -m experiments.paper shapes`` (``make demo``).

A spec (``experiments/paper/<name>.yaml``) says which runs make which table; this module makes the runs that are
missing (train.py / evaluate.py in this process, each in its own folder under ``results/<name>/runs/``, reused when
its overrides are unchanged), then turns run outputs — ``metrics.json`` and the per-item ``items.jsonl`` — into
tables (Markdown, CSV, LaTeX: :mod:`experiments.tables`) with 95 % bootstrap intervals over items, mean ± std over
training seeds (:mod:`experiments.stats`) and, in Tables 1, 3 and 4, every row's paired test against the table's
reference row over (item, seed) pairs as a significance mark (:mod:`.paired`), figures, and one self-contained
``report.html``
(:mod:`experiments.report`). Nothing in a table is typed in: a value that no run produced is "—".

Three parts: a typed spec (:mod:`.spec`: what the YAML may say, checked; one spec per backbone) -> a pure plan
(:mod:`.plan`: the list of runs, nothing read or written; ``--plan`` prints it with each config composed) -> the
runs (:mod:`.runs`: compose, make or reuse one run) -> assembly (this module's :class:`Paper`: the tables and report
from the finished runs, with :mod:`.columns` — what a column shows, read from the runs' declared outputs; cells,
intervals, the paired tests — and :mod:`.figures`, drawn from the runs' records and saved maps).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mmel.utils.machine import machine_fingerprint

from ..stats import mean_std
from ..tables import Cell, Column, Table
from .columns import (  # noqa: F401 - the runner's public names
    ABLATIONS,
    FAITHFULNESS,
    HIT,
    LOCALISATION,
    MR,
    STAGE,
    TRUST,
    _significance_note,
    cell,
    declared,
    item_getter,
    metric_table,
    overlap_marks,
    per_item,
    significance,
)
from .figures import category_figure, curves_figure, grid_figure, sanity_figure
from .paired import Getter, marked_table
from .plan import Plan, PlannedRun, checkpoint, make_plan  # noqa: F401
from .runs import ROOT, RUN_RECORD, Run, compose_run, config_hash, run_program  # noqa: F401
from .spec import SPECS, PaperSpec, SpecError, as_spec, load_spec, per_backbone, slug  # noqa: F401

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ the runs
class Paper:
    """Makes (or reuses) every run of a spec's plan and assembles the tables, figures and report in ``results``."""

    def __init__(
        self, spec: PaperSpec | dict[str, Any], results: Path, runner: Callable[[str], Callable] | None = None
    ) -> None:
        self.spec, self.results = as_spec(spec), Path(results)
        self.plan_ = make_plan(self.spec, self.results)  # pure: nothing is read, composed or written
        self._runner = runner  # program -> run(cfg) (tests); None: mmel.<program>.run
        self._done: dict[Path, Run] = {}

    def plan(self) -> list[Run]:
        """Every run of the plan with its config composed (an unknown key or value fails here); none is run and
        nothing is written. Each carries its config hash, and a training its checkpoint's path."""
        out = []
        for p in self.plan_.runs():
            cfg = compose_run(p.program, list(p.overrides), p.out)
            out.append(Run(p.program, list(p.overrides), p.out, {"hsrm_checkpoint": str(checkpoint(p))},
                           config_hash(cfg)))  # fmt: skip
        return out

    def _make(self, p: PlannedRun) -> Run:
        if p.out not in self._done:
            training = self.plan_.training_of(p) if p.program == "evaluate" else None
            if training is not None:  # the checkpoint it reads exists first
                self._make(training)
            runner = self._runner(p.program) if self._runner else None
            self._done[p.out] = run_program(p.program, list(p.overrides), p.out, runner)
        return self._done[p.out]

    def rows(self, table: str) -> dict[str, list[Run]]:
        """A table's rows: label -> its finished runs (made now when missing, else reused)."""
        return {label: [self._make(p) for p in runs] for label, runs in self.plan_.tables[table].items()}

    @property
    def provenance(self) -> list[Run]:
        """The runs made or reused so far, in plan order (the report cites each command)."""
        return [self._done[p.out] for p in self.plan_.runs() if p.out in self._done]

    def _machine_note(self, made_on: dict) -> str:
        """Next to Table 1: whether this machine is the kind that made the README's table (only for its spec)."""
        from ..readme_table import RESULTS, machine_note

        recorded = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        return machine_note(made_on, recorded.get("machine")) if recorded.get("spec") == self.spec.name else ""

    # ------------------------------------------------------------------------------------------- tables
    def columns(self, table: str, default: dict[str, str]) -> dict[str, str]:
        """A table's columns: the defaults, then the spec's ``columns: {<table>: {label: output}}`` (a metric's
        output joins a table by being named there, e.g. ``pixel AP: saliency_ap``)."""
        return {**default, **dict(self.spec.columns.get(table, ()))}

    @property
    def reference(self) -> str | None:
        """The row Tables 1 and 3 test every other row against: the first of ``compare``, else the first MMEL row."""
        if self.spec.compare:
            return self.spec.compare[0]
        return next((label for label, m in self.spec.explainers.items() if m.is_mmel), None)

    def tested(self, table: Table, rows: dict[str, list[Run]], reference: str | None,
               getters: dict[str, Getter | None]) -> Table:  # fmt: skip
        """``table`` with each row's paired tests against ``reference`` and the legend (:mod:`.paired`)."""
        if reference is None:
            return table
        return marked_table(table, rows, reference, getters, len(self.spec.seeds))

    def localisation(self) -> tuple[Table, dict[str, list[Run]]]:
        rows = self.rows("localisation")
        columns = self.columns("localisation", LOCALISATION)
        every = [run for runs in rows.values() for run in runs]
        table = metric_table("Table 1 — localisation", rows, columns)
        getters = {name: item_getter(every, output) for name, output in columns.items()}
        return self.tested(table, rows, self.reference, getters), rows

    def faithfulness(self) -> tuple[Table, dict[str, list[Run]]]:
        rows = self.rows("faithfulness")
        columns = {**self.columns("faithfulness", FAITHFULNESS), **dict(self.spec.faithfulness.columns)}
        return metric_table("Table 2 — faithfulness (deletion / insertion)", rows, columns), rows

    def phrases(self) -> Table:
        rows = self.rows("phrases")
        hit = item_getter([run for runs in rows.values() for run in runs], HIT) or (lambda r: None)
        types = sorted({str(r.get("category")) for runs in rows.values() for r in runs[0].items()})
        cells = []
        for runs in rows.values():
            by_type: dict[str, list[float]] = {}
            for run in runs:
                for r in run.items():
                    by_type.setdefault(str(r.get("category")), []).append(hit(r))
            overall = cell(runs, HIT)
            cells.append([overall] + [Cell(float(np.mean(by_type[t])) if by_type.get(t) else None) for t in types])
        cols = [Column("pointing game")] + [Column(f"PG: {t}") for t in types]
        labels, title = overlap_marks("Table 3 — phrase localisation (Flickr30k Entities format), by phrase type", rows)
        getters: dict[str, Getter | None] = {"pointing game": hit}
        for t in types:  # a type's column: the hits of that type's items only
            getters[f"PG: {t}"] = lambda r, t=t: hit(r) if str(r.get("category")) == t else None
        return self.tested(Table(title, labels, cols, cells), rows, self.reference, getters)

    def ablation_table(self) -> Table:
        """Table 4: every ablation row trained over every seed and scored by evaluate.py, mean ± std over seeds, each
        row tested against the first (the full HSRM) on the same (item, seed) pairs; Δ from train.py's own test."""
        rows = self.rows("ablations")
        trainings = {label: [self._make(p) for p in runs] for label, runs in self.plan_.ablations.items()}
        every = [run for runs in rows.values() for run in runs]
        table = metric_table("Table 4 — HSRM ablations", rows, ABLATIONS)
        gains = []  # the test pointing game minus the Grad-ECLIP map it started from, per seed (train.py's test)
        for runs in trainings.values():
            g = [float(m["test/pointing_game"]) - float(m["test/grad_eclip_pointing_game"]) for m in
                 (r.metrics for r in runs) if m.get("test/pointing_game") is not None
                 and m.get("test/grad_eclip_pointing_game") is not None]  # fmt: skip
            gains.append(Cell(None) if not g else Cell(*mean_std(g)) if len(g) > 1 else Cell(g[0]))
        extra = " ".join(self.spec.ablation_overrides)
        n = len(self.spec.seeds)
        title = f"{table.title} ({n} seed{'s' if n != 1 else ''}{', ' + extra if extra else ''})"
        table = Table(title, table.rows, [*table.columns, Column("Δ PG vs its Grad-ECLIP start")],
                      [[*cells, gain] for cells, gain in zip(table.cells, gains, strict=True)])  # fmt: skip
        getters = {name: item_getter(every, output) for name, output in ABLATIONS.items()}
        return self.tested(table, rows, next(iter(rows)), getters)

    def trust(self) -> tuple[Table, Path | None]:
        """Table 5 from evaluate runs with the trust metrics on (docs/metrics.md, Trust), and the sanity curves."""
        rows = self.rows("trust")
        table = metric_table("Table 5 — trust: similarity to the original map after full randomisation (lower: "
                             "the map depends on the model / prompt), prompt specificity", rows,
                             self.columns("trust", TRUST))  # fmt: skip
        return table, sanity_figure(rows, self.results / "figures" / "sanity_curves.png")

    def extra_table(self, name: str) -> tuple[Table, dict[str, list[Run]]]:
        """A ``tables:`` entry: its rows, with the columns it names (Table 1's when it names none); a table of
        variants has a column per variant showing its ``output``."""
        t = self.spec.tables[name]
        if not t.variants:
            rows = self.rows(name)
            return metric_table(t.title, rows, dict(t.columns) or LOCALISATION), rows
        grid = {v: {label: [self._make(p) for p in runs] for label, runs in by_label.items()}
                for v, by_label in self.plan_.variant_tables[name].items()}  # fmt: skip
        every = [run for by_label in grid.values() for runs in by_label.values() for run in runs]
        hib = (declared(every, t.output) or {}).get("higher_is_better")
        cells = [[cell(grid[v][label], t.output) for v in grid] for label in t.explainers]
        rows = {label: [run for v in grid for run in grid[v][label]] for label in t.explainers}
        labels, title = overlap_marks(t.title, rows)
        return Table(title, labels, [Column(v, hib) for v in grid], cells), rows

    # ---------------------------------------------------------------------------------------- everything
    def build(self) -> Path:
        """Make every missing run of the plan (in its order), then assemble; returns the report."""
        for p in self.plan_.runs():
            self._make(p)
        return self.assemble()

    def assemble(self) -> Path:
        """Tables (Markdown, CSV, LaTeX), figures, summary.json and report.html from the plan's runs."""
        from ..report import Provenance, Section, git_commit, write_report

        tables_dir, fig_dir = self.results / "tables", self.results / "figures"
        tables_dir.mkdir(parents=True, exist_ok=True)
        fig_dir.mkdir(parents=True, exist_ok=True)
        sections: list[Section] = []
        facts, key = machine_fingerprint()
        summary: dict[str, Any] = {
            "spec": self.spec.name,
            "commit": git_commit(),  # the code's checkout
            "machine": {**facts, "key": key},
        }

        t1, loc_rows = self.localisation()
        a, b = self.spec.compare or (None, None)
        sig = significance(loc_rows[a], loc_rows[b]) if a in loc_rows and b in loc_rows else None
        summary["significance"] = {"a": a, "b": b, **(sig or {})}
        note = _significance_note(a, b, sig, len(self.spec.seeds))
        differs = self._machine_note(summary["machine"])
        if differs:
            log.warning("%s", differs)
            note = f"{differs} {note}".strip()
        figs = []
        grid_spec = self.spec.grid
        cat = category_figure(loc_rows, grid_spec.explainers if grid_spec else [], fig_dir / "categories.png")
        grid = grid_figure(grid_spec, loc_rows, fig_dir / "qualitative.png") if grid_spec else None
        figs += [(p, c) for p, c in ((grid, "the same test items across methods (× = peak)"),
                                     (cat, "pointing game per category")) if p]  # fmt: skip
        sections.append(Section("Localisation", note, [t1], figs))
        tables = [t1]
        if self.spec.faithfulness:
            t2, f_rows = self.faithfulness()
            curves = curves_figure(f_rows, fig_dir / "deletion_insertion.png")
            sections.append(
                Section("Faithfulness", "", [t2], [(curves, "deletion / insertion curves")] if curves else [])
            )
            tables.append(t2)
        if self.spec.phrases:
            tables.append(self.phrases())
            sections.append(Section("Phrase localisation", "", [tables[-1]]))
        if self.spec.ablations:
            tables.append(self.ablation_table())
            sections.append(Section("HSRM ablations", "Each row trained with every seed and scored by evaluate.py "
                                    f"on the test split; marks: paired tests against “{next(iter(self.spec.ablations))}"
                                    "”. Δ: train.py's own test, pointing game minus the Grad-ECLIP map the HSRM starts "
                                    "from (the same map for every row, so Δ differs between rows as the pointing game "
                                    "does).", [tables[-1]]))  # fmt: skip
        if self.spec.trust:
            t5, sanity = self.trust()
            tables.append(t5)
            sections.append(Section("Trust", "", [t5], [(sanity, "sanity-check curves")] if sanity else []))
        for name in self.spec.tables:
            t, rows = self.extra_table(name)
            curves = curves_figure(rows, fig_dir / f"{slug(name)}_curves.png")
            tables.append(t)
            sections.append(Section(t.title, "", [t], [(curves, "deletion / insertion curves")] if curves else []))
        for t in tables:
            stem = slug(t.title.split("—")[0]) or slug(t.title)
            (tables_dir / f"{stem}.md").write_text(t.markdown())
            (tables_dir / f"{stem}.csv").write_text(t.csv())
            (tables_dir / f"{stem}.tex").write_text(t.latex())
            summary[stem] = {
                "title": t.title,
                "rows": t.rows,
                "columns": [c.name for c in t.columns],
                "cells": [[c.__dict__ for c in row] for row in t.cells],
                "legend": t.legend,
            }
        (self.results / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
        prov = [Provenance(slug(str(r.out.relative_to(self.results))), r.command, r.config_hash)
                for r in self.provenance]  # fmt: skip
        return write_report(self.results / "report.html", self.spec.display_title, sections, prov)
