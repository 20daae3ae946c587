"""The training items of a feature cache: one item per (image, prompt) sample served out of the memory-mapped
image rows (:class:`_Pairs`), and their collation into an HSRM batch (:func:`collate_features`). The cache itself is
built and opened by :mod:`mmel.hsrm.features`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mmel.data.cache import CachedFeatures

STACKED = ("evidence", "text", "cosines", "patch_tokens")  # a cached batch's fixed-size tensors, stacked


class _Pairs(Dataset):
    """A cache of image rows served as one training item per sample, in the dataset's sample order (so that the
    loader's shuffling and batching equal those of online training); ``None`` for samples that could not be made.

    Where each sample's rows lie in its image's stacked pair tensors is read once, here; a loader's batch is then
    fetched by :meth:`__getitems__` with one copy per tensor for the whole batch (no per-item tensor calls).
    """

    PAIR = ("evidence", "text", "boxes")  # the sample's own rows of the image's stacked pair tensors
    IMAGE = ("cosines", "patch_tokens")  # the image's own

    def __init__(self, cached: CachedFeatures, where: list[tuple[int, int]]) -> None:
        """``where``: sample -> (image row, position among the image's samples)."""
        self.cached = cached
        # sample -> (id, input size, {field: read-only numpy view into the mapped cache; boxes: a tensor}), or None;
        # the views hold no data (the cache stays memory-mapped), so a batch is one copy per field out of the mapping
        self.at: list[tuple[str, torch.Tensor, dict[str, Any]] | None] = []
        rows: dict[int, dict[str, Any] | None] = {}
        for row, j in where:
            if row not in rows:
                rows[row] = self._image(row) if cached.ok[row] else None
            image = rows[row]
            if image is None or not image["pair_ok"][j]:
                self.at.append(None)
                continue
            k = int(image["pair_ok"][:j].sum())  # index among the image's stored pairs
            lo, n = int(image["box_counts"][:k].sum()), int(image["box_counts"][k])
            views = {name: image[name] for name in self.IMAGE}
            views["evidence"], views["text"] = image["evidence"][k], image["text"][k]
            # the few boxes of a pair are copied out now, once (a batch then makes no per-item tensors)
            views["boxes"] = torch.from_numpy(np.array(image["boxes"][lo : lo + n])).to(cached.dtype("boxes"))
            self.at.append((f"{cached.ids[row]}#{j}", image["input_size"], views))

    def _image(self, row: int) -> dict[str, Any]:
        c = self.cached
        out: dict[str, Any] = {name: c.array(row, name) for name in (*self.PAIR, *self.IMAGE, "pair_ok", "box_counts")}
        out["input_size"] = torch.from_numpy(np.array(c.array(row, "input_size")))
        return out

    def __len__(self) -> int:
        return len(self.at)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any] | None]:
        """The items of a batch: each fixed-size field is copied out of the cache for all of them at once."""
        c, at = self.cached, [self.at[i] for i in indices]
        good = [a for a in at if a is not None]
        if not good:
            return [None] * len(at)
        stacked = {n: torch.from_numpy(np.stack([a[2][n] for a in good])).to(c.dtype(n)) for n in STACKED}
        out = _Fetched(stacked)
        g = 0
        for a in at:
            if a is None:
                out.append(None)
                continue
            item = {name: t[g] for name, t in stacked.items()}
            item["id"], item["input_size"], item["boxes"] = a[0], a[1], a[2]["boxes"]
            out.append(item)
            g += 1
        return out


class _Fetched(list):
    """The items of one :meth:`_Pairs.__getitems__` call, with their fixed-size tensors already stacked (in the
    order of the non-None items), so that collating them copies nothing again."""

    def __init__(self, stacked: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.stacked = stacked


def collate_features(rows: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Stack cached pairs (one image per pair, B = P): `evidence` [P, L, h, w], `cosines` packed [P, L, T] (unpacked
    by the HSRM), `patch_tokens` [P, N, W] float32, `text` [P, D], `boxes` list of [M, 4], `input_size` (H, W)."""
    stacked = rows.stacked if isinstance(rows, _Fetched) else None
    rows = [r for r in rows if r is not None]
    if not rows:
        return None
    if stacked is None:
        stacked = {n: torch.stack([r[n] for r in rows]) for n in STACKED}
    batch: dict[str, Any] = {n: stacked[n] for n in ("evidence", "cosines", "text")}
    batch["patch_tokens"] = stacked["patch_tokens"].float()
    batch["boxes"] = [r["boxes"] for r in rows]
    batch["input_size"] = tuple(int(s) for s in rows[0]["input_size"])
    batch["sample_id"] = [r["id"] for r in rows]
    return batch
