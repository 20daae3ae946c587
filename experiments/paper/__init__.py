"""Paper tables and figures from one command: ``python -m experiments.paper shapes`` (``make demo``).

A spec (``experiments/paper/<name>.yaml``) says which runs make which table; this module makes the runs that are
missing (train.py / evaluate.py in this process, each in its own folder under ``results/<name>/runs/``, reused when
its overrides are unchanged), then turns run outputs — ``metrics.json`` and the per-item ``items.jsonl`` — into
tables (Markdown, CSV, LaTeX: :mod:`experiments.tables`) with 95 % bootstrap intervals over items and mean ± std over
training seeds (:mod:`experiments.stats`), figures, and one self-contained ``report.html``
(:mod:`experiments.report`). Nothing in a table is typed in: a value that no run produced is "—".
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from mmel.locations import config_dir, work_root
from mmel.metrics.protocol import output_of
from mmel.utils.machine import machine_fingerprint

from ..stats import bootstrap_ci, mcnemar, mean_std, paired_bootstrap
from ..tables import Cell, Column, Table

log = logging.getLogger(__name__)
# where results/, data/ and .cache/ go: $MMEL_ROOT, else the current directory (`make demo` runs in the checkout);
# never this file's folder, which is site-packages/mmel/experiments when installed
ROOT = work_root()
SPECS = Path(__file__).resolve().parent
RUN_RECORD = "paper_run.json"


def load_spec(name: str) -> dict[str, Any]:
    """The spec ``experiments/paper/<name>.yaml`` (or a path to one), with a clear error for unknown names."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else SPECS / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SPECS.glob("*.yaml"))
        raise FileNotFoundError(f"paper spec {name!r} not found ({path}); known: {known}")
    spec = yaml.safe_load(path.read_text()) or {}
    missing = {"name", "explainers", "seeds"} - set(spec)
    if missing:
        raise ValueError(f"{path}: missing keys {sorted(missing)}")
    return spec


# -------------------------------------------------------------------------------------------------- runs
def config_hash(cfg: DictConfig) -> str:
    """A short hash of the resolved config (what the report cites next to each command)."""
    resolved = {
        k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig) else cfg[k]
        for k in cfg
        if k not in ("hydra", "paths")  # where a run writes does not change its numbers
    }
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:12]


def compose_run(program: str, overrides: Sequence[str], out: Path) -> DictConfig:
    """Compose ``conf/<program>.yaml`` with ``overrides`` and its run dir at ``out``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(program, overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(out)
        cfg.paths.log_dir = str(out.parent)
    return cfg


@dataclass
class Run:
    """A finished run: where it is, how it was made, what it measured."""

    program: str
    overrides: list[str]
    out: Path
    metrics: dict[str, Any]
    config_hash: str

    @property
    def command(self) -> str:
        return f"python {self.program}.py " + " ".join(self.overrides)

    def items(self) -> list[dict[str, Any]]:
        """Scored per-item records (skipped items left out), in dataset order."""
        path = self.out / "items.jsonl"
        if not path.is_file():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in rows if "skip" not in r]


def run_program(program: str, overrides: Sequence[str], out: Path, runner: Callable | None = None) -> Run:
    """Make (or reuse) one run of ``train`` / ``evaluate`` in ``out``.

    A folder holding a finished run with the same program and overrides is reused; one with other overrides is an
    error (never overwritten: delete it yourself). ``runner`` replaces ``mmel.<program>.run`` (tests)."""
    overrides = [str(o) for o in overrides]
    record_path = out / RUN_RECORD
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["program"] != program or record["overrides"] != overrides:
            raise ValueError(
                f"{out} holds a run of `{record['program']} {' '.join(record['overrides'])}`, not "
                f"`{program} {' '.join(overrides)}`: remove it (or change results dir) to remake it"
            )
        if (out / "metrics.json").is_file() and record.get("finished"):
            metrics = json.loads((out / "metrics.json").read_text())
            return Run(program, overrides, out, metrics, record["config_hash"])
    cfg = compose_run(program, overrides, out)
    if program == "evaluate" and (out / "run.json").is_file():
        with open_dict(cfg):
            cfg.resume = str(out)  # an interrupted evaluation continues where it stopped
    out.mkdir(parents=True, exist_ok=True)
    chash = config_hash(cfg)
    record = {"program": program, "overrides": overrides, "config_hash": chash, "finished": False}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=False))
    if runner is None:
        import importlib

        runner = importlib.import_module(f"mmel.{program}").run
    log.info("paper: %s %s -> %s", program, " ".join(overrides), out)
    metrics = runner(cfg)[0]
    record["finished"] = True
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    saved = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else metrics
    return Run(program, overrides, out, saved, chash)


def per_backbone(spec: dict[str, Any], results: Path) -> list[tuple[dict[str, Any], Path]]:
    """A spec with ``backbones: {label: [overrides]}`` is one spec per backbone (its overrides appended, results
    in ``results/<backbone>/``); a spec without is itself."""
    if not spec.get("backbones"):
        return [(spec, results)]
    out = []
    for label, over in spec["backbones"].items():
        sub = {k: v for k, v in spec.items() if k != "backbones"}
        sub["overrides"] = [*spec.get("overrides", []), *over]
        sub["title"] = f"{spec.get('title', spec['name'])} — {label}"
        out.append((sub, results / slug(label)))
    return out


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-")


# ------------------------------------------------------------------------------------------------ values
# A column is a label and the output it shows, named as in metrics.json under the stage ("test/"). What the output
# means — higher is better or not, the per-item record field it averages (for the bootstrap interval over items) —
# is read from the runs' own declarations (metrics.json "outputs", mmel.metrics.protocol): a new metric's column is
# one line here.
STAGE = "test"
LOCALISATION = {
    "pointing game": "pointing_game/accuracy",
    "per-category mean": "pointing_game/mean_per_category",
    "difficult subset": "pointing_game/difficult_accuracy",
    "energy PG": "energy_pointing_game",
    "mIoU": "saliency_iou/miou",
    "specificity": "prompt_specificity/specificity",  # with metrics.prompt_specificity on
}
FAITHFULNESS = {"deletion AUC": "deletion_insertion/deletion_auc", "insertion AUC": "deletion_insertion/insertion_auc"}
TRUST = {
    "cascading: Spearman": "model_randomisation/cascading/spearman",
    "cascading: SSIM": "model_randomisation/cascading/ssim",
    "cascading: HOG": "model_randomisation/cascading/hog",
    "independent: Spearman": "model_randomisation/independent/spearman",
    "prompt randomisation: Spearman": "prompt_randomisation/spearman",
    "specificity": "prompt_specificity/specificity",
    "hard-case specificity": "prompt_specificity/hard_specificity",
    "absent prompt on an object": "prompt_specificity/absent_on_object",
}
HIT, ENERGY = "pointing_game/accuracy", "energy_pointing_game"  # the outputs the significance tests pair items on
MR = f"{STAGE}/model_randomisation"  # the sanity-curve figure: every "<mode>/<measure>@<step>" output


def declared(runs: Sequence[Run], output: str) -> dict[str, Any] | None:
    """The declaration of ``<stage>/<output>`` in the first of ``runs`` that has one (None: no run has it)."""
    return next((r.metrics["outputs"][f"{STAGE}/{output}"] for r in runs
                 if f"{STAGE}/{output}" in r.metrics.get("outputs", {})), None)  # fmt: skip


def item_getter(runs: Sequence[Run], output: str) -> Callable[[dict], float | None] | None:
    """A record -> the item's value of ``output`` (None: the output is not a mean over items, or unknown)."""
    d = declared(runs, output)
    if d is None or d.get("field") is None:
        return None
    out, name = output_of(d), d["metric"]
    return lambda r: out.item_value(r.get("metrics", {}).get(name))


def per_item(runs: Sequence[Run], get: Callable[[dict], float | None]) -> dict[str, float]:
    """sample_id -> the item's value averaged over ``runs`` (seeds); items missing in a run are left out."""
    acc: dict[str, list[float]] = {}
    for run in runs:
        for r in run.items():
            v = get(r)
            if v is not None and math.isfinite(v):
                acc.setdefault(str(r["sample_id"]), []).append(v)
    return {k: float(np.mean(v)) for k, v in acc.items() if len(v) == len(runs)}


def cell(runs: Sequence[Run], output: str) -> Cell:
    """``<stage>/<output>``: mean over runs (± std when several seeds) and a 95 % bootstrap interval over items when
    the output is a mean over items."""
    key, get = f"{STAGE}/{output}", item_getter(runs, output)
    vals = [float(r.metrics[key]) for r in runs if isinstance(r.metrics.get(key), int | float)]
    if not vals:
        return Cell(None)
    m, s = mean_std(vals) if len(vals) > 1 else (vals[0], None)
    low = high = None
    if get is not None:
        items = per_item(runs, get)
        if len(items) > 1:
            ci = bootstrap_ci(list(items.values()))
            low, high = ci.low, ci.high
    return Cell(m, std=s, low=low, high=high)


def metric_table(title: str, rows: dict[str, Sequence[Run]], columns: dict[str, str]) -> Table:
    """One row per label of ``rows``, one column per (label, output) of ``columns``."""
    every = [run for runs in rows.values() for run in runs]
    hib = {name: (declared(every, output) or {}).get("higher_is_better") for name, output in columns.items()}
    return Table(
        title,
        list(rows),
        [Column(name, hib[name]) for name in columns],
        [[cell(runs, output) for output in columns.values()] for runs in rows.values()],
    )


def significance(a: Sequence[Run], b: Sequence[Run]) -> dict[str, Any]:
    """MMEL vs Grad-ECLIP on the same items: exact McNemar on pointing hits per seed of ``a`` (the largest p is
    reported: every seed must win), and a paired bootstrap of the energy difference on seed-averaged items."""
    hit, energy_of = item_getter([*a, *b], HIT), item_getter([*a, *b], ENERGY)
    if hit is None or energy_of is None:
        return {"mcnemar": [], "energy": None}
    hits_b = per_item(b, hit)
    tests = []
    for run in a:
        hits_a = per_item([run], hit)
        common = sorted(set(hits_a) & set(hits_b))
        if common:
            t = mcnemar([hits_a[k] for k in common], [hits_b[k] for k in common])
            tests.append({"b": t.b, "c": t.c, "p": t.p_value, "n": len(common)})
    ea, eb = (
        per_item(a, energy_of),
        per_item(b, energy_of),
    )
    common = sorted(set(ea) & set(eb))
    energy = None
    if len(common) > 1:
        d = paired_bootstrap([ea[k] for k in common], [eb[k] for k in common])
        energy = {"diff": d.diff.value, "low": d.diff.low, "high": d.diff.high, "p": d.p_value, "n": len(common)}
    return {"mcnemar_per_seed": tests, "max_p": max((t["p"] for t in tests), default=None), "energy": energy}


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
            self.trained  # noqa: B018 - makes the training runs
            self.localisation()
            for part, make in (("faithfulness", self.faithfulness), ("phrases", self.phrases),
                               ("ablations", self.ablation_table), ("trust", self.trust)):  # fmt: skip
                if part in self.spec:
                    make()
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
                    for s, t in self.trained.items()
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

    @property
    def trained(self) -> dict[int, Run]:
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
        return table, self.sanity_figure(rows, self.results / "figures" / "sanity_curves.png")

    # ------------------------------------------------------------------------------------------- figures
    def curves_figure(self, rows: dict[str, list[Run]], path: Path) -> Path | None:
        """Mean deletion and insertion curves of every method, AUCs in the legend."""
        plt = _plt()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        drawn = False
        for ax, mode in zip(axes, ("deletion", "insertion"), strict=True):
            for label, runs in rows.items():
                curves = [r["metrics"]["deletion_insertion"][f"{mode}_curve"] for run in runs for r in run.items()
                          if f"{mode}_curve" in r.get("metrics", {}).get("deletion_insertion", {})]  # fmt: skip
                if not curves:
                    continue
                mean = np.mean(np.asarray(curves, dtype=float), axis=0)
                x = np.linspace(0, 1, len(mean))
                auc = float(np.trapezoid(mean, x))
                ax.plot(x, mean, label=f"{label} (AUC {auc:.3f})")
                drawn = True
            ax.set_title(f"{mode} (mean over items)")
            ax.set_xlabel("fraction of pixels " + ("removed" if mode == "deletion" else "inserted"))
            ax.legend(fontsize=7)
        return _save(fig, path) if drawn else None

    def sanity_figure(self, rows: dict[str, list[Run]], path: Path) -> Path | None:
        """Mean similarity to the original maps after each randomisation step, per mode and measure."""
        curves: dict[str, dict[str, list[float]]] = {}
        steps: list[str] = []
        for label, runs in rows.items():
            items = runs[0].items()
            rec = items[0]["metrics"].get("model_randomisation") if items else None
            if not rec:
                continue
            steps = rec["steps"]
            for key in [k for k in runs[0].metrics if k.startswith(f"{MR}/") and "@" not in k]:
                mode_measure = key[len(MR) + 1 :]
                curves.setdefault(mode_measure, {})[label] = [
                    float(np.mean([r.metrics[f"{key}@{s.replace(' ', '')}"] for r in runs])) for s in steps
                ]
        if not curves:
            return None
        plt = _plt()
        keys = sorted(curves)
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
        for ax, key in zip(axes[0], keys, strict=True):
            for label, ys in curves[key].items():
                ax.plot(range(len(ys) + 1), [1.0, *ys], marker="o", ms=3, label=label)
            ax.set_xticks(range(len(steps) + 1), ["original", *steps], rotation=60, fontsize=6)
            ax.axhline(0.0, color="grey", lw=0.5)
            ax.set_title(key.replace("/", ": "), fontsize=8)
        axes[0][-1].legend(fontsize=6)
        return _save(fig, path)

    def category_figure(self, rows: dict[str, list[Run]], labels: Sequence[str], path: Path) -> Path | None:
        """Pointing accuracy per category for the chosen methods (grouped bars)."""
        hit = item_getter([run for runs in rows.values() for run in runs], HIT) or (lambda r: None)
        acc: dict[str, dict[str, float]] = {}
        for label in labels:
            by_cat: dict[str, list[float]] = {}
            for run in rows.get(label, []):
                for r in run.items():
                    if hit(r) is not None:
                        by_cat.setdefault(str(r.get("category")), []).append(hit(r))
            acc[label] = {c: float(np.mean(v)) for c, v in by_cat.items()}
        cats = sorted({c for a in acc.values() for c in a})
        if not cats:
            return None
        plt = _plt()
        fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(cats) * max(1, len(acc)) / 2), 4))
        w = 0.8 / max(1, len(acc))
        for i, (label, a) in enumerate(acc.items()):
            ax.bar(np.arange(len(cats)) + i * w, [a.get(c, np.nan) for c in cats], w, label=label)
        ax.set_xticks(np.arange(len(cats)) + 0.4 - w / 2, cats, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("pointing game")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        return _save(fig, path)

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
        ckpt = self.trained[self.spec["seeds"][0]].metrics["hsrm_checkpoint"]
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
        cat = self.category_figure(
            loc_rows, self.spec.get("grid", {}).get("explainers", []), fig_dir / "categories.png"
        )
        grid = self.grid_figure(fig_dir / "qualitative.png")
        figs += [(p, c) for p, c in ((grid, "the same test items across methods (× = peak)"),
                                     (cat, "pointing game per category")) if p]  # fmt: skip
        sections.append(Section("Localisation", note, [t1], figs))
        tables = [t1]
        if "faithfulness" in self.spec:
            t2, f_rows = self.faithfulness()
            curves = self.curves_figure(f_rows, fig_dir / "deletion_insertion.png")
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


def _significance_note(a: str | None, b: str | None, sig: dict | None, n_seeds: int) -> str:
    if not sig or not sig.get("mcnemar_per_seed"):
        return ""
    parts = [f"{a} vs {b}, same items: exact McNemar on pointing hits per training seed"]
    parts += [f"seed {i}: {t['b']} items only {a.split(' (')[0]} hits, {t['c']} only {b.split(' (')[0]}, "
              f"p = {t['p']:.2g}" for i, t in enumerate(sig["mcnemar_per_seed"])]  # fmt: skip
    e = sig.get("energy")
    if e:
        parts.append(f"energy PG difference {e['diff']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}] (paired bootstrap, "
                     f"p = {e['p']:.2g}, {e['n']} items, {n_seeds}-seed average)")  # fmt: skip
    return "; ".join(parts) + "."


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path
