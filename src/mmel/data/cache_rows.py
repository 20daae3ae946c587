"""Read side of a built feature cache (:mod:`mmel.data.cache`): rows sliced straight out of the memory-mapped
Arrow shard files, without per-row decoding or copies until a tensor is asked for.

The build side (shards, manifest, resume, disk checks) stays in :mod:`mmel.data.cache`; this module only knows the
column layout a shard has: ``id``, ``ok`` and per tensor ``t`` a flat list column ``t`` plus ``t__shape``.
"""

from __future__ import annotations

import bisect
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch


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

    Rows are sliced straight out of the memory-mapped Arrow files (no per-row decoding).
    """

    def __init__(self, shards: list[Path], tensors: dict[str, str]) -> None:
        tables = [pa.ipc.open_file(pa.memory_map(str(p), "r")).read_all() for p in shards]
        table = pa.concat_tables(tables) if tables else None
        self.tensors = tensors  # name -> torch dtype name
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
        for name in self.tensors:
            out[name] = self.tensor(index, name)
        return out

    def array(self, index: int, name: str, first: slice | None = None) -> np.ndarray:
        """A read-only numpy view of one stored tensor of row ``index`` (a good row, index in range), in its stored
        dtype (bfloat16 rows as float32): nothing is copied out of the mapping. ``first`` selects a contiguous
        range of its first dimension (e.g. one pair of an image's stacked pairs)."""
        shape = self._cols[f"{name}__shape"][index].tolist()
        values = self._cols[name][index]
        if first is not None:
            start, stop, step = first.indices(shape[0])
            if step != 1:
                raise ValueError("CachedFeatures.tensor: only contiguous slices of the first dimension")
            per = math.prod(shape[1:])
            values = values[start * per : max(start, stop) * per]
            shape = [max(stop - start, 0), *shape[1:]]
        return values.reshape(shape)

    def dtype(self, name: str) -> torch.dtype:
        """The torch dtype a stored tensor had when it was computed (what :meth:`tensor` returns)."""
        return getattr(torch, self.tensors[name])

    def tensor(self, index: int, name: str, first: slice | None = None) -> torch.Tensor:
        """One stored tensor of row ``index`` (a good row, index in range), copied out of the read-only mapping;
        ``first`` as in :meth:`array` (only that part is copied)."""
        out = torch.from_numpy(np.array(self.array(index, name, first)))
        return out.to(self.dtype(name))
