"""Paper tables and figures from one command: ``python -m experiments.paper shapes`` (``make demo``).

A spec (``experiments/paper/<name>.yaml``) says which runs make which table; this module makes the runs that are
missing (train.py / evaluate.py in this process, each in its own folder under ``results/<name>/runs/``, reused when
its overrides are unchanged), then turns run outputs — ``metrics.json`` and the per-item ``items.jsonl`` — into
tables (Markdown, CSV, LaTeX: :mod:`experiments.tables`) with 95 % bootstrap intervals over items and mean ± std over
training seeds (:mod:`experiments.stats`), figures, and one self-contained ``report.html``
(:mod:`experiments.report`). Nothing in a table is typed in: a value that no run produced is "—".

The parts: :mod:`.spec` (the spec file, one spec per backbone), :mod:`.runs` (compose, make or reuse one run),
this module's :class:`Paper` (which runs a spec names — ``plan()`` composes them without running anything — and the
tables and report assembled from them), :mod:`.columns` (what a column shows, read from the runs' declared
outputs; cells, intervals, the paired tests) and :mod:`.figures` (figures from the runs' records).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmel.utils.machine import machine_fingerprint

from ..tables import Cell, Column, Table
from .benchmarks import benchmark_tables
from .columns import (  # noqa: F401 - the runner's public names
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
    per_item,
    significance,
)
from .figures import _plt, _save, category_figure, curves_figure, sanity_figure
from .runs import ROOT, RUN_RECORD, Run, compose_run, config_hash, run_program  # noqa: F401
from .spec import SPECS, load_spec, per_backbone, slug  # noqa: F401

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ the runs
class Paper:
    """Makes (or reuses) every run a spec names and assembles the tables, figures and report in ``results``."""

    def __init__(self, spec: dict[str, Any], results: Path, runner: Callable[[str], Callable] | None = None) -> None:
        self.spec, self.results = spec, Path(results)
        self.runs_dir = self.results / "runs"
        self._runner = runner  # program -> run(cfg) (tests); None: mmel.<program>.run
        self.provenance: list[Run] = []
        self._planning = False

    def _run(self, program: str, overrides: Sequence[str], out: Path) -> Run:
        if program == "evaluate":  # e.g. figure_samples=0: the report draws its own grid
            overrides = [*overrides, *self.spec.get("evaluate_overrides", [])]
        if self._planning:  # compose only (unknown keys / values fail here), nothing runs or is written
            cfg = compose_run(program, [str(o) for o in overrides], out)
            run = Run(program, [str(o) for o in overrides], out, {"hsrm_checkpoint": str(out / "hsrm.pt")},
                      config_hash(cfg))  # fmt: skip
        else:
            run = run_program(program, overrides, out, self._runner(program) if self._runner else None)
        self.provenance.append(run)
        return run

    def plan(self) -> list[Run]:
        """Every run the spec makes (train and evaluate commands, in order), each config composed, none run."""
        self._planning, self.provenance = True, []
        try:
            self.trained()  # makes (plans) the training runs
            self.localisation()
            for part, make in (("faithfulness", self.faithfulness), ("phrases", self.phrases),
                               ("ablations", self.ablation_table), ("trust", self.trust)):  # fmt: skip
                if part in self.spec:
                    make()
            benchmark_tables(self)  # the spec's `benchmarks` (ImageNet-S, OpenImages points, ImageNet)
        finally:
            self._planning = False
        return self.provenance

    def _common(self, extra: Sequence[str] = ()) -> list[str]:
        return [*self.spec.get("overrides", []), *extra]

    def explainer(self, label: str) -> tuple[list[str], int | None]:
        """A spec explainer's evaluate overrides and its own sample cap: the spec gives either a list of overrides
        or {overrides: [...], limit: N} (an expensive method scored on the first N samples; its label says so)."""
        if label not in self.spec["explainers"]:
            raise ValueError(f"spec {self.spec['name']}: {label!r} is not among its explainers")
        entry = self.spec["explainers"][label]
        if isinstance(entry, dict):
            return [str(o) for o in entry.get("overrides", [])], entry.get("limit")
        return [str(o) for o in entry], None

    def trainings(self) -> dict[int, Run]:
        """The HSRM trained with each seed (Tables 1-3 MMEL rows)."""
        return {
            s: self._run("train", self._common([f"seed={s}"]), self.runs_dir / "train" / f"seed{s}")
            for s in self.spec["seeds"]
        }

    def evaluations(
        self, labels: Sequence[str], tag: str, extra: Sequence[str] = (), limit: int | None = None
    ) -> dict[str, list[Run]]:
        """label -> its evaluate runs (one per seed for MMEL rows, else one)."""
        out: dict[str, list[Run]] = {}
        for label in labels:
            own, own_limit = self.explainer(label)
            caps = [c for c in (self.spec.get("limit") if limit is None else limit, own_limit) if c is not None]
            lim = [f"limit={min(caps)}"] if caps else []
            over = self._common([*own, *extra, *lim])
            if "explainer=mmel" in over:
                out[label] = [
                    self._run(
                        "evaluate",
                        [*over, f"explainer.checkpoint={t.metrics['hsrm_checkpoint']}"],
                        self.runs_dir / tag / slug(label) / f"seed{s}",
                    )
                    for s, t in self.trained().items()
                ]
            else:
                out[label] = [self._run("evaluate", over, self.runs_dir / tag / slug(label))]
        return out

    def ablations(self) -> dict[str, Run]:
        seed = self.spec["seeds"][0]
        extra = [*self.spec.get("ablation_overrides", []), f"seed={seed}"]
        return {
            label: self._run("train", self._common([*over, *extra]), self.runs_dir / "ablations" / slug(label))
            for label, over in self.spec.get("ablations", {}).items()
        }

    def trained(self) -> dict[int, Run]:
        """The HSRM training runs, made (or reused) on first use and kept: every MMEL row reads their checkpoints."""
        if not hasattr(self, "_trained"):
            self._trained = self.trainings()
        return self._trained

    def _machine_note(self, made_on: dict) -> str:
        """Next to Table 1: whether this machine is the kind that made the README's table (only for its spec)."""
        from ..readme_table import RESULTS, machine_note

        recorded = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        return machine_note(made_on, recorded.get("machine")) if recorded.get("spec") == self.spec["name"] else ""

    # ------------------------------------------------------------------------------------------- tables
    def columns(self, table: str, default: dict[str, str]) -> dict[str, str]:
        """A table's columns: the defaults, then the spec's ``columns: {<table>: {label: output}}`` (a metric's
        output joins a table by being named there, e.g. ``pixel AP: saliency_ap``)."""
        extra = (self.spec.get("columns") or {}).get(table) or {}
        unknown = set(self.spec.get("columns") or {}) - {"localisation", "faithfulness", "trust"}
        if unknown:
            raise ValueError(f"paper spec {self.spec['name']!r}: columns for unknown tables {sorted(unknown)}; "
                             "expected localisation, faithfulness or trust")  # fmt: skip
        return {**default, **{str(k): str(v) for k, v in extra.items()}}

    def localisation(self) -> tuple[Table, dict[str, list[Run]]]:
        rows = self.evaluations(list(self.spec["explainers"]), "localisation")
        return metric_table("Table 1 — localisation", rows, self.columns("localisation", LOCALISATION)), rows

    def faithfulness(self) -> tuple[Table, dict[str, list[Run]]]:
        f = self.spec["faithfulness"]
        rows = self.evaluations(f["explainers"], "faithfulness", f.get("overrides", []), f.get("limit"))
        protocol = f.get("protocol")
        if protocol:  # Grad-ECLIP's own deletion/insertion protocol, as a labelled extra row
            ge = "Grad-ECLIP (native)"
            lim = [] if f.get("limit") is None else [f"limit={f['limit']}"]
            over = self._common([*self.explainer(ge)[0], *protocol, *lim])
            rows[f"{ge}, Grad-ECLIP paper's protocol"] = [
                self._run("evaluate", over, self.runs_dir / "faithfulness" / "grad-eclip-protocol")
            ]
        columns = self.columns("faithfulness", FAITHFULNESS)
        return metric_table("Table 2 — faithfulness (deletion / insertion)", rows, columns), rows

    def phrases(self) -> Table:
        p = self.spec["phrases"]
        rows = self.evaluations(p["explainers"], "phrases", p.get("overrides", []))
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
        return Table(
            "Table 3 — phrase localisation (Flickr30k Entities format), by phrase type", list(rows), cols, cells
        )

    def ablation_table(self) -> Table:
        runs = self.ablations()
        cols = [Column("pointing game"), Column("energy PG"), Column("Δ PG vs its Grad-ECLIP start")]
        cells = []
        for run in runs.values():
            m = run.metrics
            pg, en, base = (m.get(k) for k in ("test/pointing_game", "test/energy", "test/grad_eclip_pointing_game"))
            gain = None if pg is None or base is None else float(pg) - float(base)
            cells.append([Cell(pg), Cell(en), Cell(gain)])
        seed = self.spec["seeds"][0]
        extra = " ".join(self.spec.get("ablation_overrides", []))
        return Table(f"Table 4 — HSRM ablations (seed {seed}, {extra})", list(runs), cols, cells)

    def trust(self) -> tuple[Table, Path | None]:
        """Table 5 from evaluate runs with the trust metrics on (docs/metrics.md, Trust), and the sanity curves."""
        t = self.spec["trust"]
        rows = self.evaluations(t["explainers"], "trust", t.get("overrides", []), t.get("limit"))
        table = metric_table("Table 5 — trust: similarity to the original map after full randomisation (lower: "
                             "the map depends on the model / prompt), prompt specificity", rows,
                             self.columns("trust", TRUST))  # fmt: skip
        if self._planning:
            return table, None
        return table, sanity_figure(rows, self.results / "figures" / "sanity_curves.png")

    # ------------------------------------------------------------------------------------------- figures
    def grid_figure(self, path: Path) -> Path | None:
        """The same seeded test items across methods: image with its boxes, then one map per method (peak marked)."""
        import torch
        from hydra.utils import instantiate

        from mmel.utils.runs import build_datamodule

        g = self.spec.get("grid")
        if not g:
            return None
        cfg = compose_run("evaluate", self._common(), self.runs_dir / "grid")
        clip = instantiate(cfg.model)
        dm = build_datamodule(cfg, clip)
        dm.prepare_data()
        ds = dm.dataset("test")
        pick = np.random.default_rng(g.get("seed", 0)).choice(len(ds), size=min(g["items"], len(ds)), replace=False)
        items = [dm.transform(ds[int(i)]) for i in sorted(pick)]
        items = [it for it in items if it is not None]
        ckpt = self.trained()[self.spec["seeds"][0]].metrics["hsrm_checkpoint"]
        maps = {}
        for label in g["explainers"]:
            over = self._common(self.explainer(label)[0])
            if "explainer=mmel" in over:
                over.append(f"explainer.checkpoint={ckpt}")
            e = instantiate(compose_run("evaluate", over, self.runs_dir / "grid").explainer)(clip=clip)
            with torch.enable_grad():
                maps[label] = [e(it["image"][None], [it["prompt"]])[0, 0].cpu().numpy() for it in items]
        plt = _plt()
        mean, std = np.asarray(clip.mean)[:, None, None], np.asarray(clip.std)[:, None, None]
        fig, axes = plt.subplots(len(items), len(maps) + 1, figsize=(1.9 * (len(maps) + 1), 2.0 * len(items)),
                                 squeeze=False)  # fmt: skip
        for r, it in enumerate(items):
            img = np.clip(it["image"].numpy() * std + mean, 0, 1).transpose(1, 2, 0)
            axes[r][0].imshow(img)
            for x0, y0, x1, y1 in it["boxes"].tolist():
                axes[r][0].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime", lw=1.5))
            axes[r][0].set_title(it["prompt"], fontsize=6)
            for c, (label, ms) in enumerate(maps.items(), start=1):
                m = ms[r]
                axes[r][c].imshow(img)
                axes[r][c].imshow(m, cmap="jet", alpha=0.5, vmin=0, vmax=1)
                y, x = np.unravel_index(int(np.argmax(m)), m.shape)
                axes[r][c].plot([x], [y], marker="x", color="white", ms=6, mew=2)
                if r == 0:
                    axes[r][c].set_title(label, fontsize=6)
        for ax in axes.flat:
            ax.axis("off")
        return _save(fig, path)

    # ---------------------------------------------------------------------------------------- everything
    def build(self) -> Path:
        """Make every missing run, then write tables, figures, summary.json and report.html; returns the report."""
        from ..report import Provenance, Section, git_commit, write_report

        tables_dir, fig_dir = self.results / "tables", self.results / "figures"
        tables_dir.mkdir(parents=True, exist_ok=True)
        fig_dir.mkdir(parents=True, exist_ok=True)
        sections: list[Section] = []
        facts, key = machine_fingerprint()
        summary: dict[str, Any] = {
            "spec": self.spec["name"],
            "commit": git_commit(),  # the code's checkout
            "machine": {**facts, "key": key},
        }

        t1, loc_rows = self.localisation()
        a, b = self.spec.get("compare", [None, None])
        sig = significance(loc_rows[a], loc_rows[b]) if a in loc_rows and b in loc_rows else None
        summary["significance"] = {"a": a, "b": b, **(sig or {})}
        note = _significance_note(a, b, sig, len(self.spec["seeds"]))
        differs = self._machine_note(summary["machine"])
        if differs:
            log.warning("%s", differs)
            note = f"{differs} {note}".strip()
        figs = []
        cat = category_figure(loc_rows, self.spec.get("grid", {}).get("explainers", []), fig_dir / "categories.png")
        grid = self.grid_figure(fig_dir / "qualitative.png")
        figs += [(p, c) for p, c in ((grid, "the same test items across methods (× = peak)"),
                                     (cat, "pointing game per category")) if p]  # fmt: skip
        sections.append(Section("Localisation", note, [t1], figs))
        tables = [t1]
        if "faithfulness" in self.spec:
            t2, f_rows = self.faithfulness()
            curves = curves_figure(f_rows, fig_dir / "deletion_insertion.png")
            sections.append(
                Section("Faithfulness", "", [t2], [(curves, "deletion / insertion curves")] if curves else [])
            )
            tables.append(t2)
        if "phrases" in self.spec:
            tables.append(self.phrases())
            sections.append(Section("Phrase localisation", "", [tables[-1]]))
        if "ablations" in self.spec:
            tables.append(self.ablation_table())
            sections.append(Section("HSRM ablations", "Each row trained once; compare with its full-HSRM row.",
                                    [tables[-1]]))  # fmt: skip
        if "trust" in self.spec:
            t5, sanity = self.trust()
            tables.append(t5)
            sections.append(Section("Trust", "", [t5], [(sanity, "sanity-check curves")] if sanity else []))
        for table, figs in benchmark_tables(self, fig_dir):
            tables.append(table)
            sections.append(Section(table.title.split("—")[-1].strip() or table.title, "", [table], figs))
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
            }
        (self.results / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
        prov = [Provenance(slug(str(r.out.relative_to(self.results))), r.command, r.config_hash)
                for r in self.provenance]  # fmt: skip
        return write_report(self.results / "report.html", self.spec.get("title", self.spec["name"]), sections, prov)
