"""Disk cache of frozen-CLIP quantities per data item (HF ``datasets``: Arrow files, memory-mapped on load).

The HSRM trains against a frozen CLIP, so per-item quantities (Grad-ECLIP evidence [L, h, w], keys [L, N, C],
patch tokens [N, C], text feature [D], ...) can be computed once and read back every later epoch. The cache is
generic: ``compute_fn(list of items) -> one dict of tensors per item`` (or a dict of tensors batched on dim 0);
shapes may differ between items (keep-size mode).

A cache directory holds one cache, described by ``cache.json``: the caller's ``key`` (backbone, weights, layers,
resolution, ... — see :func:`cache_key`) and a hash of the ordered item ids. When either differs from what is on
disk the old cache is deleted and rebuilt (the log says which field changed). Items are written in shards of
``shard_size`` items, each saved to a temporary folder and renamed when complete, so an interrupted build resumes
at the first missing shard without recomputing finished ones.

Storage per shard row: ``id`` (str), ``ok`` (False when ``compute_fn`` returned ``None`` for a bad item) and, for
each tensor ``t``, a flat ``t`` column plus ``t__shape``. bfloat16 (not an Arrow type) is stored as float32 and cast
back on load; other dtypes are stored as they are, so loaded tensors equal the computed ones bit for bit.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets.table import InMemoryTable

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "cache.json"

_STORE_AS = {torch.bfloat16: torch.float32}  # Arrow has no bfloat16


def cache_key(
    backbone: str, weights: str | None, layers: Sequence[int], resolution: Any, **extra: Any
) -> dict[str, Any]:
    """The fields a cached frozen-CLIP quantity depends on (add e.g. ``dataset``, ``split``, ``explainer_mode``)."""
    return {"backbone": backbone, "weights": weights, "layers": list(layers), "resolution": resolution, **extra}


def _canonical(obj: Any) -> Any:
    """JSON round trip, so tuples/lists and int/str keys compare the way they are stored."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _ids_hash(ids: Sequence[str]) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode())
        h.update(b"\0")
    return h.hexdigest()


@contextlib.contextmanager
def _quiet_datasets():
    was = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


class _ListColumn:
    """Zero-copy numpy views of one list column of a (memory-mapped) Arrow table; ``col[i]`` -> 1-D array."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        self.starts: list[int] = []
        self.offsets: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        row = 0
        for chunk in column.chunks:
            self.starts.append(row)
            row += len(chunk)
            # offsets follow the chunk's slice; values are the whole backing buffer (a view into the mapped file)
            self.offsets.append(chunk.offsets.to_numpy())
            self.values.append(chunk.values.to_numpy(zero_copy_only=False))

    def __getitem__(self, index: int) -> np.ndarray:
        k = bisect.bisect_right(self.starts, index) - 1
        r = index - self.starts[k]
        return self.values[k][self.offsets[k][r] : self.offsets[k][r + 1]]


class CachedFeatures(torch.utils.data.Dataset):
    """Read side of a built cache: ``cached[i]`` -> dict of tensors (+ ``id``), or ``None`` for a failed item.

    Rows are sliced straight out of the memory-mapped Arrow buffers (the HF ``datasets`` row formatter costs ~10 ms
    per row of a few hundred kB); ``.dataset`` is the HF ``Dataset`` for anything else.
    """

    def __init__(self, shards: list[Path], tensors: dict[str, str]) -> None:
        with _quiet_datasets():
            parts = [datasets.load_from_disk(str(p)) for p in shards]
        self.dataset = datasets.concatenate_datasets(parts) if parts else None
        self.tensors = tensors  # name -> torch dtype name
        table = pa.concat_tables([p.data.table for p in parts]) if parts else None
        self.ids: list[str] = table.column("id").to_pylist() if table is not None else []
        self.ok: list[bool] = table.column("ok").to_pylist() if table is not None else []
        self._cols = {
            c: _ListColumn(table.column(c)) for name in tensors for c in (name, f"{name}__shape") if table is not None
        }
        self._row = {i: k for k, i in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def index(self, item_id: str) -> int:
        """Row of an item id."""
        return self._row[str(item_id)]

    def get(self, item_id: str) -> dict[str, Any] | None:
        """The cached tensors of an item id."""
        return self[self.index(item_id)]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for a cache of {len(self)} items")
        if not self.ok[index]:
            return None
        out: dict[str, Any] = {"id": self.ids[index]}
        for name, dtype in self.tensors.items():
            shape = [int(s) for s in self._cols[f"{name}__shape"][index]]
            values = np.array(self._cols[name][index])  # copy out of the read-only mapping
            out[name] = torch.from_numpy(values).reshape(shape).to(getattr(torch, dtype))
        return out


class FeatureCache:
    """A resumable, key-checked cache of per-item tensors.

    Usage::

        cache = FeatureCache(dir, cache_key("ViT-B-16-quickgelu", "openai", range(6, 12), 224, dataset="coco/val"))
        feats = cache.build(dataset, compute_fn, batch_size=16)   # computes what is missing, then loads
        feats = cache.load()                                       # later: read only (errors if incomplete)

    ``items`` is any sequence (a dataset); ids come from ``ids=`` or ``items.sample_ids``.
    """

    def __init__(self, directory: str | os.PathLike, key: dict[str, Any], shard_size: int = 256) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.dir = Path(directory).expanduser()
        self.key = _canonical(key)
        self.shard_size = int(shard_size)

    # -- manifest ---------------------------------------------------------------------------------------------
    def _manifest_path(self) -> Path:
        return self.dir / MANIFEST

    def manifest(self) -> dict[str, Any] | None:
        """What ``cache.json`` says (None when there is no cache here)."""
        p = self._manifest_path()
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"feature cache manifest {p} is corrupt ({e.msg}); delete {self.dir} to rebuild") from e

    def _write_manifest(self, m: dict[str, Any]) -> None:
        tmp = self._manifest_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(m, indent=1, sort_keys=True))
        os.replace(tmp, self._manifest_path())

    def _shard_dir(self, k: int) -> Path:
        return self.dir / f"shard-{k:05d}"

    def _wipe(self) -> None:
        """Delete this cache's own files only (never unrelated content of the folder)."""
        for p in self.dir.glob("shard-*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        self._manifest_path().unlink(missing_ok=True)

    def _changed(self, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
        changed = [
            f"key.{k}"
            for k in sorted(set(old.get("key", {})) | set(new["key"]))
            if old.get("key", {}).get(k) != new["key"].get(k)
        ]
        changed += [k for k in ("format", "ids_sha256", "n_items", "shard_size") if old.get(k) != new[k]]
        return changed

    # -- build / load -----------------------------------------------------------------------------------------
    def is_complete(self, ids: Sequence[str] | None = None) -> bool:
        """True when a finished cache with this key (and these ids, if given) is on disk."""
        m = self.manifest()
        if not m or not m.get("complete") or m.get("key") != self.key or m.get("format") != FORMAT_VERSION:
            return False
        return ids is None or m.get("ids_sha256") == _ids_hash([str(i) for i in ids])

    def build(
        self,
        items: Sequence[Any],
        compute_fn: Callable[[list[Any]], list[dict[str, torch.Tensor] | None] | dict[str, torch.Tensor]],
        batch_size: int = 8,
        ids: Sequence[str] | None = None,
    ) -> CachedFeatures:
        """Compute and store what is missing, then :meth:`load`. ``compute_fn`` is only called for missing shards."""
        if ids is None:
            ids = getattr(items, "sample_ids", None)
            if ids is None:
                raise ValueError("pass ids= (one stable id per item) or items with a .sample_ids attribute")
        ids = [str(i) for i in ids]
        if len(ids) != len(items):
            raise ValueError(f"{len(ids)} ids for {len(items)} items")
        if len(set(ids)) != len(ids):
            raise ValueError("item ids must be unique")
        want = {
            "format": FORMAT_VERSION,
            "key": self.key,
            "ids_sha256": _ids_hash(ids),
            "n_items": len(ids),
            "shard_size": self.shard_size,
        }
        old = self.manifest()
        if old is not None and self._changed(old, want):
            log.info("feature cache %s: rebuilding (changed: %s)", self.dir, ", ".join(self._changed(old, want)))
            self._wipe()
            old = None
        elif old is None and self.dir.is_dir() and any(self.dir.iterdir()):
            raise ValueError(f"{self.dir} is not empty and holds no feature cache ({MANIFEST}); choose another folder")
        if old is not None and old.get("complete"):
            return self.load()
        self.dir.mkdir(parents=True, exist_ok=True)
        m = old or {**want, "complete": False, "tensors": None}
        self._write_manifest(m)
        for p in self.dir.glob("shard-*.tmp"):  # leftovers of a save interrupted half-way
            shutil.rmtree(p)
        n_shards = (len(ids) + self.shard_size - 1) // self.shard_size
        computed = 0
        for k in range(n_shards):
            if self._shard_dir(k).is_dir():
                continue
            lo, hi = k * self.shard_size, min(len(ids), (k + 1) * self.shard_size)
            rows: list[dict[str, torch.Tensor] | None] = []
            for b in range(lo, hi, batch_size):
                batch = [items[i] for i in range(b, min(hi, b + batch_size))]
                rows += self._as_rows(compute_fn(batch), len(batch))
            m["tensors"] = self._check_schema(rows, m.get("tensors"))
            self._write_shard(k, ids[lo:hi], rows, m["tensors"])
            self._write_manifest(m)  # records the schema as soon as the first shard exists
            computed += hi - lo
        m["complete"] = True
        self._write_manifest(m)
        log.info("feature cache %s: computed %d of %d items", self.dir, computed, len(ids))
        return self.load()

    def load(self) -> CachedFeatures:
        """Open a finished cache (memory-mapped); errors when it is missing, unfinished or for another key."""
        m = self.manifest()
        if m is None:
            raise FileNotFoundError(f"no feature cache in {self.dir} (build it first)")
        if m.get("key") != self.key:
            raise ValueError(f"feature cache {self.dir} was built for key {m.get('key')}, not {self.key}")
        if not m.get("complete"):
            raise ValueError(f"feature cache {self.dir} is incomplete (an interrupted build?); call build() to resume")
        n_shards = (m["n_items"] + m["shard_size"] - 1) // m["shard_size"]
        return CachedFeatures([self._shard_dir(k) for k in range(n_shards)], m["tensors"] or {})

    # -- helpers ----------------------------------------------------------------------------------------------
    @staticmethod
    def _as_rows(out: Any, n: int) -> list[dict[str, torch.Tensor] | None]:
        if isinstance(out, dict):  # batched on dim 0
            rows = (
                [{k: v[i] for k, v in out.items()} for i in range(n)]
                if all(len(v) == n for v in out.values())
                else None
            )
        else:
            rows = list(out) if out is not None else None
        if rows is None or len(rows) != n:
            raise ValueError(f"compute_fn must return {n} per-item dicts (or a dict of tensors with first dim {n})")
        for r in rows:
            if r is not None and not all(isinstance(v, torch.Tensor) for v in r.values()):
                raise TypeError("compute_fn must return dicts of tensors")
        return rows

    @staticmethod
    def _check_schema(rows: list[dict[str, torch.Tensor] | None], known: dict[str, str] | None) -> dict[str, str]:
        schema = dict(known) if known else None
        for r in rows:
            if r is None:
                continue
            got = {k: str(v.dtype).removeprefix("torch.") for k, v in r.items()}
            if schema is None:
                schema = got
            elif got != schema:
                raise ValueError(f"compute_fn returned tensors {got}, but earlier items had {schema}")
        return schema or {}

    def _write_shard(self, k: int, ids: list[str], rows: list, schema: dict[str, str]) -> None:
        cols: dict[str, pa.Array] = {
            "id": pa.array(ids, type=pa.string()),
            "ok": pa.array([r is not None for r in rows], type=pa.bool_()),
        }
        for name, dtype in sorted(schema.items()):  # one column order in every shard (the manifest sorts keys)
            store = _STORE_AS.get(getattr(torch, dtype), getattr(torch, dtype))
            arrays = [
                r[name].detach().to("cpu", store).contiguous().numpy() if r is not None else np.zeros(0) for r in rows
            ]
            np_dtype = torch.empty(0, dtype=store).numpy().dtype
            flat = [a.reshape(-1).astype(np_dtype, copy=False) for a in arrays]
            offsets = np.concatenate([[0], np.cumsum([len(a) for a in flat])]).astype(np.int64)
            values = np.concatenate(flat) if flat else np.zeros(0, np_dtype)
            cols[name] = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))
            cols[f"{name}__shape"] = pa.array([list(a.shape) for a in arrays], type=pa.list_(pa.int64()))
        tmp = self._shard_dir(k).with_suffix(".tmp")
        with _quiet_datasets():
            datasets.Dataset(InMemoryTable(pa.table(cols))).save_to_disk(str(tmp))
        os.replace(tmp, self._shard_dir(k))
