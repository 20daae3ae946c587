"""Collect runs into a paper-style table: every `metrics.json` beside a `.hydra/config.yaml` under the given dirs.

    python experiments/aggregate.py logs/evaluate --rows explainer.name,explainer.mode --out table.md
    python experiments/aggregate.py logs/evaluate --items items.parquet --by category   # + per-item records

Each row is one run; columns are the chosen config keys (dotted paths into the resolved config) followed by the
metrics (all numeric keys of metrics.json, or the ones named with --metrics). Runs missing a metric show "—",
never a made-up number. A run that scored an HSRM on images it was trained on (``train_overlap`` in its
metrics.json, ``allow_train_overlap=true``) has † in its run cell. Writes Markdown (``.md``) or CSV (``.csv``) by
the output's suffix; prints Markdown. ``--items FILE.parquet`` also joins every evaluate run's per-item records
(``items.parquet``, tagged with ``run`` and the row keys) into one parquet file through Hugging Face ``datasets``,
reads it back and prints each run's per-item means (optionally per ``--by`` item column, e.g. ``category``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml
from omegaconf import OmegaConf

DEFAULT_ROWS = ("task_name", "model.name", "data._target_", "explainer.name", "explainer.mode")


def find_runs(roots: Iterable[str | Path]) -> list[Path]:
    """Run dirs (holding metrics.json and .hydra/config.yaml) below each root, sorted."""
    runs = set()
    for root in roots:
        for mj in Path(root).rglob("metrics.json"):
            if (mj.parent / ".hydra" / "config.yaml").is_file():
                runs.add(mj.parent)
    return sorted(runs)


def lookup(cfg: dict, dotted: str):
    """The value at a dotted key, its interpolations resolved where they can be outside the run (e.g.
    ``${hsrm_default:scales}``; one that needs Hydra's runtime, like ``${hydra:runtime.output_dir}``, stays as
    written)."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    try:
        import mmel  # noqa: F401 - registers the project's config resolvers

        return OmegaConf.to_container(OmegaConf.create({"v": node}), resolve=True)["v"] if node is not None else None
    except Exception:  # noqa: BLE001 - an interpolation this process cannot resolve: show it as written
        return node


def load_run(run: Path) -> tuple[dict, dict]:
    cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text()) or {}
    try:
        metrics = json.loads((run / "metrics.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{run / 'metrics.json'} is not valid JSON: {e}") from e
    return cfg, metrics


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}/"))
        else:
            out[key] = v
    return out


def build_table(
    runs: Sequence[Path], rows: Sequence[str] = DEFAULT_ROWS, metrics: Sequence[str] | None = None
) -> tuple[list[str], list[list[str]]]:
    """Header and body rows (strings) for the given runs."""
    loaded = [(r, *load_run(r)) for r in runs]
    flat = [flatten(m) for _, _, m in loaded]
    if metrics is None:
        keys = sorted({k for f in flat for k, v in f.items() if isinstance(v, int | float) and not isinstance(v, bool)})
    else:
        keys = list(metrics)
    header = [*rows, *keys, "run"]
    body = []
    for (run, cfg, m), f in zip(loaded, flat, strict=True):
        cells = [str(lookup(cfg, r)) if lookup(cfg, r) is not None else "—" for r in rows]
        for k in keys:
            v = f.get(k)
            cells.append(f"{v:.4f}" if isinstance(v, float) else ("—" if v is None else str(v)))
        shared = (m.get("train_overlap") or {}).get("images") if isinstance(m.get("train_overlap"), dict) else None
        # a run that scored an HSRM on its own training images (allow_train_overlap=true) is marked
        cells.append(f"{run.name} † train overlap: {shared} images" if shared else run.name)
        body.append(cells)
    return header, body


def items_dataset(runs: Sequence[Path], rows: Sequence[str] = DEFAULT_ROWS):
    """Every evaluate run's per-item records (``items.parquet``, mmel.evaluation.items_table) as one
    ``datasets.Dataset``, each row tagged with ``run`` and the run's ``rows`` config values."""
    from mmel.evaluation.items_table import combine, read_run_items

    tables, labels = [], []
    for run in runs:
        try:
            table = read_run_items(run)
        except FileNotFoundError:
            continue  # a train run: no per-item records
        cfg, _ = load_run(run)
        tables.append(table)
        labels.append({"run": run.name, **{r: str(lookup(cfg, r)) for r in rows}})
    if not tables:
        raise FileNotFoundError(f"no evaluate run with per-item records among {len(runs)} runs")
    return combine(tables, labels)


def item_means(items, by: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Mean of every numeric per-item metric column (``<metric>/<field>``; skipped items left out) per group of
    ``by`` columns, with the item count: the runs' numbers recomputed from their records."""
    df = items.to_pandas()
    if "skip" in df:
        df = df[df["skip"].isna()]
    cols = [c for c in df.columns if "/" in c and not c.startswith("peak/") and df[c].dtype.kind in "bif"]
    header = [*by, "items", *cols]
    body = []
    for key, group in df.groupby(list(by), sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        means = [group[c].astype(float).mean() for c in cols]
        body.append([*map(str, key), str(len(group)), *("—" if v != v else f"{v:.4f}" for v in means)])
    return header, body


def to_markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def to_csv(header: list[str], body: list[list[str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(body)
    return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("roots", nargs="+", help="directories to search for runs")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated config keys")
    ap.add_argument("--metrics", default=None, help="comma-separated metric keys (default: all numeric)")
    ap.add_argument("--out", default=None, help="write the table here (.md or .csv)")
    ap.add_argument("--items", default=None, help="also write every run's per-item records as one parquet table")
    ap.add_argument("--by", default="", help="with --items: item columns to group the per-item means by, besides run")
    args = ap.parse_args(argv)
    runs = find_runs(args.roots)
    if not runs:
        print(f"no runs (metrics.json + .hydra/config.yaml) under {args.roots}", file=sys.stderr)
        return 1
    header, body = build_table(runs, args.rows.split(","), args.metrics.split(",") if args.metrics else None)
    md = to_markdown(header, body)
    print(md)
    if args.out:
        out = Path(args.out)
        out.write_text(to_csv(header, body) if out.suffix == ".csv" else md)
    if args.items:
        import datasets

        items_dataset(runs, args.rows.split(",")).to_parquet(args.items)
        back = datasets.Dataset.from_parquet(args.items)  # read back: the table aggregated is the file written
        print(f"per-item records of the runs -> {args.items} ({len(back)} rows)\n")
        print(to_markdown(*item_means(back, ["run", *[b for b in args.by.split(",") if b]])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
