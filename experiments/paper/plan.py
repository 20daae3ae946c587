"""The plan of a paper spec: every run it needs, as a pure function of the spec and the results folder.

:func:`make_plan` reads nothing and writes nothing: it lists the training runs (one per seed), the ablation trainings
(one per ablation row and seed) and, for every table, each row's evaluate runs (an MMEL row once per training seed,
with that seed's ``hsrm.pt``; an ablation row once per seed, with that row's own ``hsrm.pt`` of the seed, so its
items can be paired with the full HSRM's). The runner (:mod:`experiments.paper`) makes or reuses the runs in this
order and assembles the tables from them; the ``--plan`` flag prints them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .spec import PaperSpec, TableSpec, slug

PROTOCOL_ROW = "{label}, Grad-ECLIP paper's protocol"


@dataclass(frozen=True)
class PlannedRun:
    """One run to make: ``python <program>.py <overrides>`` with its outputs in ``out``."""

    program: str
    overrides: tuple[str, ...]
    out: Path

    @property
    def command(self) -> str:
        return f"python {self.program}.py " + " ".join(self.overrides)


@dataclass(frozen=True)
class Plan:
    """trainings: seed -> its HSRM training; ablations: label -> its trainings, one per seed (in the order of the
    spec's seeds); tables: table -> row label -> the row's evaluate runs (one, or one per seed in the order of the
    spec's seeds for MMEL and ablation rows; ``tables["ablations"]`` scores each ablation training)."""

    trainings: dict[int, PlannedRun]
    ablations: dict[str, list[PlannedRun]] = field(default_factory=dict)
    tables: dict[str, dict[str, list[PlannedRun]]] = field(default_factory=dict)
    # tables of variants: table -> variant (column) -> row label -> runs
    variant_tables: dict[str, dict[str, dict[str, list[PlannedRun]]]] = field(default_factory=dict)

    def runs(self) -> list[PlannedRun]:
        """Every distinct run, trainings first (the MMEL evaluations read their checkpoints)."""
        seen: dict[Path, PlannedRun] = {}
        for run in [*self.trainings.values(), *(r for runs in self.ablations.values() for r in runs)]:
            seen.setdefault(run.out, run)
        every = [*self.tables.values(), *(rows for t in self.variant_tables.values() for rows in t.values())]
        for rows in every:
            for runs in rows.values():
                for run in runs:
                    seen.setdefault(run.out, run)
                    if seen[run.out] != run:  # two labels that slug alike: never merge two runs into one folder
                        raise ValueError(f"paper plan: `{seen[run.out].command}` and `{run.command}` would share "
                                         f"the folder {run.out}; rename one of their labels")  # fmt: skip
        return list(seen.values())

    def training_of(self, evaluate: PlannedRun) -> PlannedRun | None:
        """The training whose ``hsrm.pt`` an evaluate run reads (None: it reads none of the plan's)."""
        ckpt = next((o.split("=", 1)[1] for o in evaluate.overrides if o.startswith("explainer.checkpoint=")), None)
        every = [*self.trainings.values(), *(r for runs in self.ablations.values() for r in runs)]
        return next((t for t in every if ckpt is not None and str(checkpoint(t)) == ckpt), None)


def checkpoint(training: PlannedRun) -> Path:
    """Where a training run writes its HSRM weights (train.py's ``hsrm_checkpoint``)."""
    return training.out / "hsrm.pt"


def make_plan(spec: PaperSpec, results: Path) -> Plan:
    runs_dir = Path(results) / "runs"
    common = spec.overrides
    trainings = {s: PlannedRun("train", (*common, f"seed={s}"), runs_dir / "train" / f"seed{s}") for s in spec.seeds}

    def rows(labels: Sequence[str], tag: str, extra: Sequence[str] = (), limit: int | None = None,
             per_label: dict[str, Sequence[str]] | None = None) -> dict[str, list[PlannedRun]]:  # fmt: skip
        out: dict[str, list[PlannedRun]] = {}
        for label in labels:
            method = spec.method(label)
            caps = [c for c in (spec.limit if limit is None else limit, method.limit) if c is not None]
            own = [*(per_label or {}).get(label, ())]
            over = (*common, *method.overrides, *extra, *own, *([f"limit={min(caps)}"] if caps else []))
            folder = runs_dir / tag / slug(label)
            if method.is_mmel:
                out[label] = [
                    PlannedRun("evaluate", (*over, f"explainer.checkpoint={checkpoint(t)}", *spec.evaluate_overrides),
                               folder / f"seed{s}")
                    for s, t in trainings.items()
                ]  # fmt: skip
            else:
                out[label] = [PlannedRun("evaluate", (*over, *spec.evaluate_overrides), folder)]
        return out

    def of(table: TableSpec, tag: str) -> dict[str, list[PlannedRun]]:
        return rows(table.explainers, tag, table.overrides, table.limit)

    # the grid's methods save their Table 1 maps; the report's qualitative grid is drawn from them
    saving = {label: ["save_maps=true"] for label in (spec.grid.explainers if spec.grid else ())}
    tables = {"localisation": rows(list(spec.explainers), "localisation", per_label=saving)}
    if spec.faithfulness:
        f = spec.faithfulness
        tables["faithfulness"] = of(f, "faithfulness")
        if f.protocol:  # Grad-ECLIP's own deletion/insertion protocol, as a labelled extra row
            ge = "Grad-ECLIP (native)"
            lim = () if f.limit is None else (f"limit={f.limit}",)
            over = (*common, *spec.method(ge).overrides, *f.protocol, *lim, *spec.evaluate_overrides)
            tables["faithfulness"][PROTOCOL_ROW.format(label=ge)] = [
                PlannedRun("evaluate", over, runs_dir / "faithfulness" / "grad-eclip-protocol")
            ]
    if spec.phrases:
        tables["phrases"] = of(spec.phrases, "phrases")
    if spec.trust:
        tables["trust"] = of(spec.trust, "trust")
    variant_tables: dict[str, dict[str, dict[str, list[PlannedRun]]]] = {}
    for name, t in spec.tables.items():
        if t.variants:
            # "+" spelled out: "refcoco+ val" and "refcoco val" are different folders
            variant_tables[name] = {v: rows(t.explainers, f"{slug(name)}/{slug(v.replace('+', ' plus '))}",
                                            (*t.overrides, *over), t.limit)
                                    for v, over in t.variants}  # fmt: skip
        else:
            tables[name] = of(t, slug(name))
    # every ablation row over every seed: trained under runs/train/ablations/, scored by evaluate.py under
    # runs/ablations/ (train.py's own test writes no per-item records; the paired tests need them). A training
    # identical to a seed's main training (no ablation overrides, e.g. coco's full HSRM) is that training.
    ablations: dict[str, list[PlannedRun]] = {}
    for label, over in spec.ablations.items():
        ablations[label] = []
        for s in spec.seeds:
            t = PlannedRun("train", (*common, *over, *spec.ablation_overrides, f"seed={s}"),
                           runs_dir / "train" / "ablations" / slug(label) / f"seed{s}")  # fmt: skip
            ablations[label].append(trainings[s] if t.overrides == trainings[s].overrides else t)
    if ablations:
        # scored as the spec's MMEL row is (its explainer overrides), each with its own checkpoint
        mmel = next((m.overrides for m in spec.explainers.values() if m.is_mmel), ("explainer=mmel",))
        tables["ablations"] = {
            label: [PlannedRun("evaluate", (*common, *mmel, f"explainer.checkpoint={checkpoint(t)}",
                                            *([f"limit={spec.limit}"] if spec.limit is not None else []),
                                            *spec.evaluate_overrides),
                               runs_dir / "ablations" / slug(label) / f"seed{s}")
                    for s, t in zip(spec.seeds, runs, strict=True)]
            for label, runs in ablations.items()
        }  # fmt: skip
    return Plan(trainings, ablations, tables, variant_tables)
