"""Disk cache of frozen-CLIP quantities per data item: sharded Arrow IPC files, memory-mapped on load.

The HSRM trains against a frozen CLIP, so per-item quantities (Grad-ECLIP evidence, key cosines, patch tokens, text
features, ...) can be computed once and read back every later epoch. The cache is generic: ``compute_fn(list of
items) -> one dict of tensors per item`` (or a dict of tensors batched on dim 0); shapes may differ between items.
Tensors are stored in the dtype ``compute_fn`` gives them (the caller chooses float16 or float32), so loaded
tensors equal the computed ones bit for bit; bfloat16 (not an Arrow type) is stored as float32 and cast back.

Layout of a cache directory (one cache):

* ``build.json``: what is being built (the caller's ``key``, a hash of the ordered item ids, the shard size),
  written before the first shard. A different key or item list wipes the folder's cache files and rebuilds (the
  log says which field changed);
* ``shard-00000.arrow``, ...: ``shard_size`` items each (columns ``id``, ``ok``, and per tensor ``t`` a flat
  ``t`` column plus ``t__shape``; read back by :mod:`mmel.data.cache_rows`). A shard is written to a temporary
  name and renamed when complete, so a killed build leaves only whole shards, and a resumed build computes only
  the missing ones;
* ``cache.json``: the manifest, written **last**, once every shard exists: key, ids hash, item count, tensor
  schema, and each shard's name, item count, size and SHA-256 (plus one hash over them all). Without it the cache
  is incomplete and :meth:`FeatureCache.load` refuses it; with it, load checks every shard's size and ids against
  it (``verify=True`` rehashes the bytes).

Several processes may build one cache together (``rank`` / ``world_size``, e.g. the ranks of a DDP job): shard
``k`` belongs to rank ``k % world_size``, each rank writes its own shards, and rank 0 writes the manifest after a
barrier. A progress bar (items/s, ETA; redrawn sparsely when stderr is not a terminal) shows rank 0's work. Before
computing, the build logs its size (measured on the first batch, or the caller's ``expected_bytes``) and refuses
to start when the disk cannot hold it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from mmel.data.cache_rows import CachedFeatures

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
MANIFEST = "cache.json"
BUILD = "build.json"
DISK_MARGIN = 1.05  # refuse when the estimate is within 5 % of the free space

_STORE_AS = {torch.bfloat16: torch.float32}  # Arrow has no bfloat16


def cache_key(
    backbone: str, weights: str | None, layers: Sequence[int], resolution: Any, **extra: Any
) -> dict[str, Any]:
    """The fields a cached frozen-CLIP quantity depends on (add e.g. ``dataset``, ``split``, ``explainer_mode``)."""
    return {"backbone": backbone, "weights": weights, "layers": list(layers), "resolution": resolution, **extra}


def human_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, as disks are sold)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"  # pragma: no cover


def check_disk(directory: Path, need: float, what: str) -> None:
    """Raise ``OSError`` when the filesystem of ``directory`` has less than ``need`` bytes (plus 5 %) free."""
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need * DISK_MARGIN > free:
        raise OSError(
            f"{what} needs about {human_bytes(need)} but only {human_bytes(free)} is free on the disk of {probe}. "
            "Free space, point feature_cache.dir at a larger disk, store float16 (feature_cache.dtype=float16), "
            "or train without a cache (feature_cache.enabled=false: features are recomputed every step)."
        )


def _canonical(obj: Any) -> Any:
    """JSON round trip, so tuples/lists and int/str keys compare the way they are stored."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _ids_hash(ids: Sequence[str]) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode())
        h.update(b"\0")
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    """Atomic JSON write (temporary name per process, then rename)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"feature cache file {path} is corrupt ({e.msg}); delete {path.parent} to rebuild") from e


def _on_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class FeatureCache:
    """A resumable, key-checked, sharded cache of per-item tensors.

    Usage::

        cache = FeatureCache(dir, cache_key("ViT-B-16-quickgelu", "openai", range(6, 12), 224, dataset="coco/val"))
        feats = cache.build(dataset, compute_fn, batch_size=16)   # computes what is missing, then loads
        feats = cache.load()                                       # later: read only (errors if incomplete)

    ``items`` is any sequence (a dataset); ids come from ``ids=`` or ``items.sample_ids``. An item may be ``None``
    (a :class:`mmel.data.BoxDataset` gives ``None`` for an unreadable image): ``compute_fn`` should return ``None``
    for it, and the cache then gives ``None`` for that row too.
    """

    def __init__(self, directory: str | os.PathLike, key: dict[str, Any], shard_size: int = 256) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.dir = Path(directory).expanduser()
        self.key = _canonical(key)
        self.shard_size = int(shard_size)

    # -- manifest ---------------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any] | None:
        """What ``cache.json`` says (None when there is no finished cache here)."""
        return _read_json(self.dir / MANIFEST)

    def _shard_path(self, k: int) -> Path:
        return self.dir / f"shard-{k:05d}.arrow"

    def _n_shards(self, n_items: int, shard_size: int) -> int:
        return (n_items + shard_size - 1) // shard_size

    def _wipe(self) -> None:
        """Delete this cache's own files only (never unrelated content of the folder)."""
        for p in self.dir.glob("shard-*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        for name in (MANIFEST, BUILD):
            (self.dir / name).unlink(missing_ok=True)

    @staticmethod
    def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
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
        *,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] | None = None,
        expected_bytes: float | None = None,
        size_fn: Callable[[list[dict[str, torch.Tensor] | None]], float] | None = None,
        progress: bool = True,
    ) -> CachedFeatures:
        """Compute and store what is missing, then :meth:`load`. ``compute_fn`` is only called for missing shards.

        With ``world_size > 1`` every rank calls ``build`` with the same items and a ``barrier`` that waits for
        all of them (e.g. ``trainer.strategy.barrier``); rank ``r`` computes the missing shards ``k`` with
        ``k % world_size == r``. ``expected_bytes``: the caller's estimate of the finished cache's size, checked
        against the free disk before anything is computed; otherwise the first computed batch gives it, through
        ``size_fn(rows) -> total bytes`` (which may log its own breakdown) or as its mean row size x the item count.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if world_size > 1 and barrier is None:
            raise ValueError("a build shared by several processes (world_size > 1) needs a barrier")
        sync = barrier or (lambda: None)
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
        if self.is_complete(ids) and self.manifest().get("shard_size") == self.shard_size:
            return self.load()
        if rank == 0:
            self._begin(want)
        sync()  # every rank sees the folder rank 0 prepared
        n_shards = self._n_shards(len(ids), self.shard_size)
        mine = [k for k in range(n_shards) if k % world_size == rank and not self._shard_path(k).is_file()]
        todo = sum(min(len(ids), (k + 1) * self.shard_size) - k * self.shard_size for k in mine)
        if expected_bytes is not None and rank == 0:
            self._check_size(expected_bytes, len(ids), self._bytes_on_disk(), measured=False)
        bar = tqdm(
            total=todo,
            unit="item",
            desc=f"feature cache {self.dir.name}",
            disable=not progress or rank != 0 or todo == 0,
            mininterval=0.5 if _on_terminal() else 30.0,  # off a terminal: a line every 30 s, not a redraw per item
            dynamic_ncols=True,
        )
        checked = expected_bytes is not None
        schema: dict[str, str] | None = None
        with bar:
            for k in mine:
                lo, hi = k * self.shard_size, min(len(ids), (k + 1) * self.shard_size)
                rows: list[dict[str, torch.Tensor] | None] = []
                for b in range(lo, hi, batch_size):
                    batch = [items[i] for i in range(b, min(hi, b + batch_size))]
                    got = self._as_rows(compute_fn(batch), len(batch))
                    if not checked and rank == 0 and any(r is not None for r in got):
                        total = size_fn(got) if size_fn is not None else self._row_bytes(got) * len(ids)
                        self._check_size(total, len(ids), self._bytes_on_disk(), measured=True)
                        checked = True
                    rows += got
                    bar.update(len(batch))
                schema = self._check_schema(rows, schema)
                self._write_shard(k, ids[lo:hi], rows, schema)
        sync()  # all shards written
        if rank == 0:
            self._finish(want)
        sync()  # the manifest exists
        log.info("feature cache %s: rank %d computed %d of %d items", self.dir, rank, todo, len(ids))
        return self.load()

    def _begin(self, want: dict[str, Any]) -> None:
        """Rank 0, before any shard: wipe a cache built for something else, record what is being built."""
        old = _read_json(self.dir / BUILD) or self.manifest()
        if old is not None and self._changed(old, want):
            log.info("feature cache %s: rebuilding (changed: %s)", self.dir, ", ".join(self._changed(old, want)))
            self._wipe()
        elif old is None and self.dir.is_dir() and any(self.dir.iterdir()):
            raise ValueError(f"{self.dir} is not empty and holds no feature cache ({BUILD}); choose another folder")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / MANIFEST).unlink(missing_ok=True)  # from here on the cache is incomplete until _finish
        for p in self.dir.glob("*.tmp-*"):  # leftovers of a write killed half-way
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        _write_json(self.dir / BUILD, want)

    def _finish(self, want: dict[str, Any]) -> None:
        """Rank 0, after every shard: check them, then write the manifest (the last file of a build)."""
        shards, schema = [], None
        for k in range(self._n_shards(want["n_items"], want["shard_size"])):
            p = self._shard_path(k)
            if not p.is_file():
                raise RuntimeError(f"feature cache {self.dir}: shard {p.name} is missing after the build")
            meta = pa.ipc.open_file(pa.memory_map(str(p), "r")).schema.metadata or {}
            got = json.loads(meta.get(b"tensors", b"{}"))
            if got and schema is not None and got != schema:
                raise ValueError(f"feature cache {self.dir}: shard {p.name} holds tensors {got}, others {schema}")
            schema = schema or got or None
            shards.append(
                {"name": p.name, "n": int(meta.get(b"n", b"0")), "bytes": p.stat().st_size, "sha256": _file_sha256(p)}
            )
        content = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()
        total = sum(s["bytes"] for s in shards)
        _write_json(
            self.dir / MANIFEST,
            {
                **want,
                "complete": True,
                "tensors": schema or {},
                "shards": shards,
                "content_sha256": content,
                "bytes": total,
            },
        )
        log.info("feature cache %s: complete, %d items, %s on disk", self.dir, want["n_items"], human_bytes(total))

    def load(self, verify: bool = False) -> CachedFeatures:
        """Open a finished cache (memory-mapped); errors when it is missing, unfinished, damaged or for another key.

        Every shard's size and item ids are checked against the manifest; ``verify`` also rehashes their bytes.
        """
        m = self.manifest()
        if m is None:
            if (self.dir / BUILD).is_file():
                raise ValueError(
                    f"feature cache {self.dir} is incomplete (an interrupted build?); call build() to resume"
                )
            raise FileNotFoundError(f"no feature cache in {self.dir} (build it first)")
        if m.get("key") != self.key:
            raise ValueError(f"feature cache {self.dir} was built for key {m.get('key')}, not {self.key}")
        if not m.get("complete") or m.get("format") != FORMAT_VERSION:
            raise ValueError(f"feature cache {self.dir} is incomplete or of another format; call build() to rebuild")
        paths = []
        for s in m["shards"]:
            p = self.dir / s["name"]
            if not p.is_file() or p.stat().st_size != s["bytes"]:
                raise ValueError(f"feature cache {self.dir}: {s['name']} is missing or changed; delete it to rebuild")
            if verify and _file_sha256(p) != s["sha256"]:
                raise ValueError(f"feature cache {self.dir}: {s['name']} does not match its hash; delete it to rebuild")
            paths.append(p)
        feats = CachedFeatures(paths, m.get("tensors") or {})
        if _ids_hash(feats.ids) != m["ids_sha256"]:
            raise ValueError(f"feature cache {self.dir}: the shards' item ids differ from the manifest's")
        return feats

    # -- sizes ------------------------------------------------------------------------------------------------
    @staticmethod
    def _row_bytes(rows: list[dict[str, torch.Tensor] | None]) -> float:
        """Mean stored bytes of the good rows (tensor payloads, shapes and ids)."""
        good = [r for r in rows if r is not None]
        total = 0
        for r in good:
            for v in r.values():
                store = _STORE_AS.get(v.dtype, v.dtype)
                total += v.numel() * torch.empty(0, dtype=store).element_size() + 8 * (v.dim() + 2)
        return total / max(len(good), 1) + 32

    def _bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob("shard-*.arrow")) if self.dir.is_dir() else 0

    def _check_size(self, total: float, n_items: int, have: int, measured: bool) -> None:
        how = "measured on the first batch" if measured else "estimated"
        log.info(
            "feature cache %s: %d items, ~%s per item, ~%s in all (%s; %s already on disk)",
            self.dir,
            n_items,
            human_bytes(total / max(n_items, 1)),
            human_bytes(total),
            how,
            human_bytes(have),
        )
        check_disk(self.dir, max(total - have, 0), f"the feature cache {self.dir}")

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
        for name, dtype in sorted(schema.items()):  # one column order in every shard
            store = _STORE_AS.get(getattr(torch, dtype), getattr(torch, dtype))
            np_dtype = torch.empty(0, dtype=store).numpy().dtype
            arrays = [
                r[name].detach().to("cpu", store).contiguous().numpy() if r is not None else np.zeros(0, np_dtype)
                for r in rows
            ]
            flat = [a.reshape(-1).astype(np_dtype, copy=False) for a in arrays]
            offsets = np.concatenate([[0], np.cumsum([len(a) for a in flat])]).astype(np.int64)
            values = np.concatenate(flat) if flat else np.zeros(0, np_dtype)
            cols[name] = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))
            cols[f"{name}__shape"] = pa.array([list(a.shape) for a in arrays], type=pa.list_(pa.int64()))
        table = pa.table(cols).replace_schema_metadata({"tensors": json.dumps(schema), "n": str(len(ids))})
        final = self._shard_path(k)
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, final)  # a shard exists whole or not at all
