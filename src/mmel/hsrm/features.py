"""Cached frozen-CLIP features for HSRM training: CLIP runs once per sample, never again in later epochs.

`CachedFeatureDataModule` wraps a box data module (shapes / COCO / Flickr30k). In `prepare_data` (rank 0 only under
DDP) it computes, for every transformed (image, prompt) sample of each stage, the HSRM inputs — per-layer
Grad-ECLIP evidence [L, h, w], keys [L, N, C], last-block patch tokens [N, W] and the text embedding [D] — with
one forward and one batched backward per batch of images (`layer_evidence(paired=True)`), and stores them with the
sample's boxes (input pixels) in a :class:`mmel.data.cache.FeatureCache`. The cache key holds the backbone, its
weights, the layers, the input resolution, the stage's split and the data config, so any change rebuilds; an
interrupted build resumes at its first unfinished shard. Batches then carry `evidence`, `keys`, `patch_tokens`,
`text`, `boxes` and `input_size`, which :class:`mmel.lit_module.HSRMLitModule` consumes without touching CLIP.

Only `resize: fixed` is cached (one input size per stage, so batches stack); keep-size training runs online.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from mmel.data.base import Dropped
from mmel.data.cache import CachedFeatures, FeatureCache, cache_key
from mmel.data.datamodules import StageLoaders, TransformedDataset
from mmel.data.transforms import collate_boxes
from mmel.hsrm.module import HSRMInputs

log = logging.getLogger(__name__)


class _Rows(Dataset):
    """A cache's rows as training items (None for samples that could not be made)."""

    def __init__(self, cached: CachedFeatures) -> None:
        self.cached = cached

    def __len__(self) -> int:
        return len(self.cached)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        return self.cached[i]


def collate_features(rows: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Stack cached rows: the HSRM inputs (:meth:`HSRMInputs.fields`) [P, ...], `boxes` list of [M, 4],
    `input_size` (H, W)."""
    rows = [r for r in rows if r is not None]
    if not rows:
        return None
    inputs = HSRMInputs.stack(rows)
    batch: dict[str, Any] = {k: getattr(inputs, k) for k in HSRMInputs.fields()}
    batch["boxes"] = [r["boxes"] for r in rows]
    batch["input_size"] = tuple(int(s) for s in rows[0]["input_size"])
    batch["sample_id"] = [r["id"] for r in rows]
    return batch


class CachedFeatureDataModule(StageLoaders):
    """Serve HSRM inputs from a feature cache built once from ``base`` (a box data module) and ``evidence_fn``.

    Args:
        base: the configured data module (its transform must be in ``fixed`` mode).
        evidence_fn: ``(images, prompts, layers=..., paired=True) -> LayerEvidence`` (native Grad-ECLIP).
        layers: block indices the HSRM uses.
        key: what the features depend on besides the per-stage split (backbone, weights, resolution, data config).
        cache_dir: root folder; one sub-folder (one cache) per stage.
        compute_batch_size: images per CLIP pass while building.
    """

    def __init__(
        self,
        base: Any,
        evidence_fn: Any,
        layers: list[int],
        key: dict[str, Any],
        cache_dir: str | Path,
        compute_batch_size: int = 32,
    ) -> None:
        super().__init__()
        if base.transform.mode != "fixed":
            raise ValueError(
                "feature caching needs data.resize=fixed (one input size); use feature_cache.enabled=false"
            )
        self.base, self.evidence_fn, self.layers = base, evidence_fn, list(layers)
        self.key, self.cache_dir = dict(key), Path(cache_dir)
        self.compute_batch_size = int(compute_batch_size)
        self.features: dict[str, CachedFeatures] = {}
        self.skipped: Counter = Counter()

    def _cache(self, stage: str) -> FeatureCache:
        split = self.base.splits.get(stage)
        key = cache_key(layers=self.layers, split=split, stage=stage, **self.key)
        return FeatureCache(self.cache_dir / f"{stage}-{split}", key)

    def _compute(self, items: list[dict[str, Any] | Dropped]) -> list[dict[str, torch.Tensor] | None]:
        good = [i for i, it in enumerate(items) if not isinstance(it, Dropped) and it is not None]
        for it in items:
            if isinstance(it, Dropped):
                self.skipped[it.reason] += 1
        out: list[dict[str, torch.Tensor] | None] = [None] * len(items)
        if not good:
            return out
        batch = collate_boxes([items[i] for i in good])
        with torch.enable_grad():
            ev = self.evidence_fn(batch["images"], list(batch["prompt"]), layers=self.layers, paired=True)
        size = torch.tensor(batch["images"].shape[-2:])
        for j, (i, row) in enumerate(zip(good, HSRMInputs.from_evidence(ev).to("cpu").rows(), strict=True)):
            out[i] = {**row, "boxes": torch.as_tensor(batch["boxes"][j], dtype=torch.float32), "input_size": size}
        return out

    def prepare_data(self) -> None:
        self.base.prepare_data()
        for stage in ("train", "val", "test"):
            if self.base.splits.get(stage) is None:
                continue
            ds = self.base.dataset(stage)
            cache = self._cache(stage)
            if not cache.is_complete(ds.sample_ids):
                log.info("feature cache: computing frozen-CLIP features for %s (%d samples)", stage, len(ds))
            cache.build(
                TransformedDataset(ds, self.base.transform), self._compute, self.compute_batch_size, ids=ds.sample_ids
            )

    def setup(self, stage: str | None = None) -> None:
        for s in ("train", "val", "test"):
            if self.base.splits.get(s) is not None and s not in self.features:
                self.features[s] = self._cache(s).load()

    def _loader(self, stage: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            _Rows(self.features[stage]),
            batch_size=self.base.batch_size,
            shuffle=shuffle,
            collate_fn=collate_features,
            generator=torch.Generator().manual_seed(self.base.seed) if shuffle else None,
        )
