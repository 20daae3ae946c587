"""Per-item records as a table: ``items.parquet`` beside ``items.jsonl``, read back with Hugging Face ``datasets``.

``items.jsonl`` (:mod:`mmel.evaluation.records`) stays the resumable journal; at the end of a run its records are
also written flat, one row per sample, so that many runs can be loaded and aggregated as one table
(``experiments/aggregate.py --items``). Columns:

* the record's own fields: ``sample_id``, ``index``, ``chunk``, ``image_id`` (as a string: ids are ints on COCO,
  strings on Flickr30k), ``file``, ``prompt``, ``category``, ``skip`` (null when scored), ``n_boxes_cropped_out``,
  ``peak/y``, ``peak/x``;
* ``<metric>/<field>`` for every field of ``metrics`` (nested dicts joined with ``/``): numbers as float64, booleans
  as bool, strings as string, lists of numbers (curves, sweeps) as list<float64>; a field of any other shape is kept
  as its JSON text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ITEMS_PARQUET = "items.parquet"
TOP = ("sample_id", "index", "chunk", "image_id", "file", "prompt", "category", "skip", "n_boxes_cropped_out")


def _flat(d: dict[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for k, v in d.items():
        if isinstance(v, dict):
            _flat(v, f"{prefix}{k}/", out)
        else:
            out[f"{prefix}{k}"] = v


def flatten(record: dict[str, Any]) -> dict[str, Any]:
    """One record of items.jsonl as a flat row (module docstring)."""
    row = {k: record.get(k) for k in TOP}
    row["image_id"] = None if row["image_id"] is None else str(row["image_id"])
    peak = record.get("peak") or {}
    row["peak/y"], row["peak/x"] = peak.get("y"), peak.get("x")
    _flat(record.get("metrics") or {}, "", row)
    return row


def _column(values: list[Any]):
    """A pyarrow array of one column, typed by what its non-null values are (module docstring)."""
    import pyarrow as pa

    seen = [v for v in values if v is not None]
    if seen and all(isinstance(v, bool) for v in seen):
        return pa.array(values, pa.bool_())
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in seen):
        return pa.array([None if v is None else float(v) for v in values], pa.float64())
    if all(isinstance(v, str) for v in seen):
        return pa.array(values, pa.string())
    if all(isinstance(v, list) and all(isinstance(x, int | float) or x is None for x in v) for v in seen):
        return pa.array([None if v is None else [math.nan if x is None else float(x) for x in v] for v in values],
                        pa.list_(pa.float64()))  # fmt: skip
    return pa.array([None if v is None else json.dumps(v, sort_keys=True) for v in values], pa.string())


def items_arrow_table(records: Sequence[dict[str, Any]]):
    """``records`` (items.jsonl's, in order) as one pyarrow table, a row per record (module docstring)."""
    import pyarrow as pa

    rows = [flatten(r) for r in records]
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    return pa.table({n: _column([row.get(n) for row in rows]) for n in names})


def write_items_parquet(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write ``records`` as ``path`` (parquet, atomically); returns the path."""
    import pyarrow.parquet as pq

    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(items_arrow_table(records), tmp)
    tmp.replace(path)
    return path


def read_run_items(run: Path):
    """A run dir's items as a pyarrow table: its items.parquet, or (older runs) built from its items.jsonl."""
    import pyarrow.parquet as pq

    from mmel.evaluation.records import ITEMS, read_items

    path = Path(run) / ITEMS_PARQUET
    if path.is_file():
        return pq.read_table(path)
    if (Path(run) / ITEMS).is_file():
        return items_arrow_table(read_items(Path(run) / ITEMS))
    raise FileNotFoundError(f"{run}: no {ITEMS_PARQUET} nor {ITEMS} (not an evaluate run dir?)")


def combine(tables: Sequence[Any], labels: Sequence[dict[str, str]]):
    """One ``datasets.Dataset`` of several runs' item tables, each row tagged with its run's ``labels`` (string
    columns, e.g. ``run``, ``explainer.name``); a column one run lacks is null in its rows."""
    import datasets
    import pyarrow as pa

    tagged = []
    for table, tags in zip(tables, labels, strict=True):
        for k, v in tags.items():
            table = table.append_column(k, pa.array([v] * len(table), pa.string()))
        tagged.append(table)
    return datasets.Dataset(pa.concat_tables(tagged, promote_options="permissive"))
