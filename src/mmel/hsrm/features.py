"""Cached frozen-CLIP features for HSRM training: CLIP runs once per sample, never again in later epochs.

`CachedFeatureDataModule` wraps a box data module (shapes / COCO / Flickr30k). Before training (in `setup`, on every
rank of a DDP job, each computing its own shards) it computes the HSRM inputs of every transformed (image, prompt)
sample of each stage with one forward and one batched backward per batch (`layer_evidence(paired=True)`), and
stores them **per image** in a :class:`mmel.data.cache.FeatureCache` (one cache item = one image and all its pairs):

| stored | per | shape | dtype |
|---|---|---|---|
| `cosines`: upper triangles of the pooled key cosines (`key_cosines`) | image | [L, T] | `feature_cache.dtype` |
| `patch_tokens` | image | [N, W] | `feature_cache.dtype` |
| `evidence` (signed Grad-ECLIP, per layer) | pair | [K, L, h, w] | float32 |
| `text` | pair | [K, D] | float32 |
| `boxes` (input pixels, the pairs' boxes concatenated), `box_counts` | pair | [M, 4], [K] | float32, int64 |
| `pair_ok` (False: a sample the transform dropped), `input_size` | image | [K0], [2] | bool, int64 |

T = sum_s R_s (R_s + 1) / 2 with R_s windows of s x s patches: what the HSRM reads from the keys, nothing more.
Storing the key cosines instead of the keys [L, N, C] makes an image ~0.5 MB in float16 for ViT-B/16 at 224 px
with 6 layers, against ~1.8 MB for its keys alone; the evidence and text (a few kB per pair) stay float32, so the
Grad-ECLIP baseline read from the cache is exact. `feature_cache.dtype=auto` is float16 for real backbones and
float32 for the project's synthetic `mmel-*` CLIPs (where tests demand cached == online to float precision).

The cache key holds the backbone, its weights, the layers, the HSRM scales, the storage dtype, the input resolution,
the stage's split, the data config and a digest of the dataset's contents (`BoxDataset.content_digest`: every
record's file, prompt and boxes, and each image file's size and mtime), so any change rebuilds; an interrupted
build resumes at its first unfinished shard. Each set of scales has its own folder (``<stage>-<split>-scales1-2-4``),
and a set that is a strict subset of a finished cache's (an ablation dropping a scale) is sliced out of that cache
without a CLIP pass. Batches then carry `evidence`, `cosines` (packed), `patch_tokens`,
`text`, `boxes` and `input_size`, which :class:`mmel.lit_module.HSRMLitModule` consumes without touching CLIP.

Only `resize: fixed` is cached (one input size per stage, so batches stack); keep-size training runs online.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mmel.data.base import Dropped
from mmel.data.cache import FORMAT_VERSION, CachedFeatures, FeatureCache, cache_key, human_bytes
from mmel.data.cache import _ids_hash as cache_ids_hash
from mmel.data.datamodules import StageLoaders, TransformedDataset
from mmel.data.transforms import collate_boxes
from mmel.explainers.memory import budget_bytes, chunk_size
from mmel.hsrm.feature_rows import _Pairs, collate_features  # noqa: F401 - the training items of a cache
from mmel.hsrm.module import HSRMInputs, key_cosines, pack_cosines, unpack_cosines
from mmel.utils.placement import place_clip, trainer_device

log = logging.getLogger(__name__)

IMAGE_FIELDS = ("cosines", "patch_tokens", "pair_ok", "input_size")
PAIR_FIELDS = ("evidence", "text", "boxes", "box_counts")


def storage_dtype(dtype: str, backbone: str) -> torch.dtype:
    """``feature_cache.dtype``: float16 | float32 | auto (float16 unless the backbone is a synthetic mmel-* CLIP)."""
    if dtype == "auto":
        return torch.float32 if backbone.startswith("mmel-") else torch.float16
    if dtype not in ("float16", "float32"):
        raise ValueError(f"feature_cache.dtype must be float16, float32 or auto, got {dtype!r}")
    return getattr(torch, dtype)


class _Groups:
    """The transformed samples of one image per item (what one cache row holds); ``sample_ids``-free sequence."""

    def __init__(self, samples: TransformedDataset, groups: list[list[int]]) -> None:
        self.samples, self.groups = samples, groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, g: int) -> list[dict[str, Any] | Dropped]:
        return [self.samples[i] for i in self.groups[g]]


def scales_tag(scales: list[int]) -> str:
    """The cache folder's suffix for the HSRM scales: each scale set keeps its own cache (ablations alternate)."""
    return "scales" + ("-".join(str(s) for s in scales) if scales else "none")


def image_id(file: str, root: Path) -> str:
    """A cache row's id: the image file relative to the dataset root (absolute when outside it); ``root`` resolved
    (symlinks followed) by the caller, once."""
    path = Path(file).resolve()
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


class CachedFeatureDataModule(StageLoaders):
    """Serve HSRM inputs from a feature cache built once from ``base`` (a box data module) and ``evidence_fn``.

    Args:
        base: the configured data module (its transform must be in ``fixed`` mode).
        evidence_fn: ``(images, prompts, layers=..., paired=True) -> LayerEvidence`` (native Grad-ECLIP).
        layers: block indices the HSRM uses.
        key: what the features depend on besides the per-stage split and contents (backbone, weights, resolution,
            data config).
        cache_dir: root folder; one sub-folder (one cache) per stage.
        compute_batch_size: (image, prompt) pairs per CLIP pass while building.
        scales: the HSRM's window sizes (the stored key cosines are per scale).
        dtype: storage dtype of the image quantities (``float16`` | ``float32`` | ``auto``).
        shard_size: images per shard file.
        clip: the CLIP bundle ``evidence_fn`` runs (optional): ``setup`` moves it to the trainer's device (each DDP
            rank's own) before building, since Lightning sets the data up before it moves the model.
        loader: extra DataLoader settings of the cached loaders (``num_workers``, ``pin_memory``,
            ``persistent_workers``).
    """

    def __init__(
        self,
        base: Any,
        evidence_fn: Any,
        layers: list[int],
        key: dict[str, Any],
        cache_dir: str | Path,
        compute_batch_size: int = 32,
        scales: list[int] | tuple[int, ...] = (1, 2, 4),
        dtype: str = "auto",
        shard_size: int = 256,
        clip: Any = None,
        loader: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.clip, self.loader_kwargs = clip, dict(loader or {})
        if base.transform.mode != "fixed":
            raise ValueError(
                "feature caching needs data.resize=fixed (one input size); use feature_cache.enabled=false"
            )
        self.base, self.evidence_fn, self.layers = base, evidence_fn, list(layers)
        self.scales = [int(s) for s in scales]
        self.dtype = storage_dtype(dtype, str(key.get("backbone", "")))
        self.key, self.cache_dir = dict(key), Path(cache_dir)
        self.compute_batch_size, self.shard_size = int(compute_batch_size), int(shard_size)
        self.features: dict[str, _Pairs] = {}
        self.skipped: Counter = Counter()

    def _cache(self, stage: str) -> FeatureCache:
        split = self.base.splits.get(stage)
        ds = self.base.dataset(stage)
        key = cache_key(
            layers=self.layers,
            scales=self.scales,
            dtype=str(self.dtype).removeprefix("torch."),
            split=split,
            stage=stage,
            content=ds.content_digest(),
            **self.key,
        )
        return FeatureCache(
            self.cache_dir / f"{stage}-{split}-{scales_tag(self.scales)}", key, shard_size=self.shard_size
        )

    def _superset(self, stage: str, cache: FeatureCache, ids: list[str]) -> tuple[FeatureCache, list[int]] | None:
        """A finished cache of this stage whose key differs only by more scales (e.g. the full HSRM's, when an
        ablation drops a scale): the cosines of a subset of scales are a slice of it, so no CLIP pass is needed."""
        split = self.base.splits.get(stage)
        for folder in sorted(self.cache_dir.glob(f"{stage}-{split}-scales*")):
            other = FeatureCache(folder, {}, shard_size=self.shard_size).manifest()
            if not other or not other.get("complete") or other.get("ids_sha256") != cache_ids_hash(ids):
                continue
            theirs = [int(x) for x in other["key"].get("scales", [])]
            same = {k: v for k, v in other["key"].items() if k != "scales"} == {
                k: v for k, v in cache.key.items() if k != "scales"
            }
            if same and set(self.scales) < set(theirs) and other.get("format") == FORMAT_VERSION:
                return FeatureCache(folder, other["key"], shard_size=int(other["shard_size"])), theirs
        return None

    def _derive(self, source: CachedFeatures, theirs: list[int]):
        """compute_fn of a cache build that slices this module's scales out of ``source``'s rows (row indices in)."""

        def compute(rows: list[int]) -> list[dict[str, torch.Tensor] | None]:
            out: list[dict[str, torch.Tensor] | None] = []
            for i in rows:
                row = source[i]
                if row is None:
                    out.append(None)
                    continue
                row = {k: v for k, v in row.items() if k != "id"}
                grid = tuple(int(g) for g in row["evidence"].shape[-2:])
                per_scale = unpack_cosines(row["cosines"], grid, theirs)
                mine = [per_scale[theirs.index(sc)] for sc in self.scales]
                cos = pack_cosines(mine) if mine else row["cosines"].new_zeros(row["cosines"].shape[0], 0)
                out.append({**row, "cosines": cos.to(row["cosines"].dtype)})
            return out

        return compute

    def _compute(self, groups: list[list[dict[str, Any] | Dropped]]) -> list[dict[str, torch.Tensor] | None]:
        """One cache row per image: its quantities once, its pairs' stacked (pairs in chunks of the batch size)."""
        pairs = [(g, j) for g, items in enumerate(groups) for j, it in enumerate(items) if isinstance(it, dict)]
        for items in groups:
            self.skipped.update(it.reason for it in items if isinstance(it, Dropped))
        out: list[dict[str, torch.Tensor] | None] = [None] * len(groups)
        if not pairs:
            return out
        per_pair: dict[str, list] = {f: [] for f in ("evidence", "text", "boxes")}
        image_rows: dict[int, dict[str, torch.Tensor]] = {}
        g0, j0 = pairs[0]
        step = self._pairs_per_pass(tuple(groups[g0][j0]["image"].shape[-2:]))
        for c in range(0, len(pairs), step):
            chunk = pairs[c : c + step]
            batch = collate_boxes([groups[g][j] for g, j in chunk])
            with torch.enable_grad():
                ev = self.evidence_fn(batch["images"], list(batch["prompt"]), layers=self.layers, paired=True)
            x = HSRMInputs.from_evidence(ev)
            per_pair["evidence"].append(x.evidence.float().cpu())
            per_pair["text"].append(x.text.float().cpu())
            per_pair["boxes"] += [torch.as_tensor(b, dtype=torch.float32) for b in batch["boxes"]]
            first = []
            for n, (g, _) in enumerate(chunk):
                if g not in image_rows and all(chunk[m][0] != g for m in first):
                    first.append(n)
            if first:  # image quantities of each image's first pair only
                keys = x.keys[first]  # no scales (propagation off): nothing to store, an empty [L, 0] per image
                cos = (
                    pack_cosines(key_cosines(keys, x.grid, self.scales))
                    if self.scales
                    else keys.new_zeros(len(first), keys.shape[1], 0)
                )
                size = torch.tensor(batch["images"].shape[-2:])
                for n, packed, tokens in zip(first, cos, x.patch_tokens[first], strict=True):
                    image_rows[chunk[n][0]] = {
                        "cosines": packed.to("cpu", self.dtype),
                        "patch_tokens": tokens.to("cpu", self.dtype),
                        "input_size": size,
                    }
        evidence, text = torch.cat(per_pair["evidence"]), torch.cat(per_pair["text"])
        for g, items in enumerate(groups):
            idx = [n for n, (gg, _) in enumerate(pairs) if gg == g]
            if not idx:
                continue
            boxes = [per_pair["boxes"][n] for n in idx]
            out[g] = {
                **image_rows[g],
                "pair_ok": torch.tensor([isinstance(it, dict) for it in items]),
                "evidence": evidence[idx],
                "text": text[idx],
                "boxes": torch.cat(boxes).reshape(-1, 4),
                "box_counts": torch.tensor([len(b) for b in boxes], dtype=torch.int64),
            }
        return out

    def _pairs_per_pass(self, size: tuple[int, int]) -> int:
        """``compute_batch_size``, lowered to what the memory budget of the CLIP's device holds (estimated before
        allocating: :mod:`mmel.explainers.memory`; a pair is one image explained for one prompt)."""
        explainer = getattr(self.evidence_fn, "__self__", None)
        if self.clip is None or explainer is None or not hasattr(explainer, "memory_budget"):
            return self.compute_batch_size
        budget = budget_bytes(self.clip.device, explainer.memory_budget)
        return chunk_size(self.clip, explainer, size, 1, self.compute_batch_size, budget)

    def _estimate(self, stage: str, n_images: int, n_pairs: int):
        """A size function for the cache build: measured on the first computed batch, split per image / pair."""

        def size_fn(rows: list[dict[str, torch.Tensor] | None]) -> float:
            good = [r for r in rows if r is not None]
            img = sum(r[f].numel() * r[f].element_size() for r in good for f in IMAGE_FIELDS) / len(good)
            pair = sum(r[f].numel() * r[f].element_size() for r in good for f in PAIR_FIELDS)
            pair /= sum(int(r["pair_ok"].sum()) for r in good)
            total = img * n_images + pair * n_pairs
            log.info(
                "feature cache %s: %d images, %d (image, prompt) pairs; %s per image (cosines + tokens, %s) + "
                "%s per pair (evidence, text, boxes) = ~%s in all",
                stage,
                n_images,
                n_pairs,
                human_bytes(img),
                str(self.dtype).removeprefix("torch."),
                human_bytes(pair),
                human_bytes(total),
            )
            return total

        return size_fn

    def _build(self, stage: str, rank: int = 0, world_size: int = 1, barrier: Any = None) -> _Pairs:
        ds = self.base.dataset(stage)
        groups = ds.groups_by_image()
        root = Path(getattr(ds, "root", ".")).resolve()
        ids = [image_id(ds.records[g[0]].file, root) for g in groups]
        cache = self._cache(stage)
        source = None if cache.is_complete(ids) else self._superset(stage, cache, ids)
        if source is not None:
            log.info("feature cache %s: slicing scales %s out of %s (scales %s): no CLIP pass", stage, self.scales,
                     source[0].dir, source[1])  # fmt: skip
            src = source[0].load()
            cached = cache.build(list(range(len(ids))), self._derive(src, source[1]), 64, ids=ids, rank=rank,
                                 world_size=world_size, barrier=barrier)  # fmt: skip
        else:
            if not cache.is_complete(ids):
                log.info(
                    "feature cache: computing frozen-CLIP features for %s (%d images, %d samples)",
                    stage,
                    len(groups),
                    len(ds),
                )
            pairs_per_image = len(ds) / max(len(groups), 1)
            cached = cache.build(
                _Groups(TransformedDataset(ds, self.base.transform), groups),
                self._compute,
                max(1, math.ceil(self.compute_batch_size / pairs_per_image)),  # ~compute_batch_size pairs per call
                ids=ids,
                rank=rank,
                world_size=world_size,
                barrier=barrier,
                size_fn=self._estimate(stage, len(groups), len(ds)),
            )
        where = [(0, 0)] * len(ds)
        for g, members in enumerate(groups):
            row = cached.index(ids[g])
            for j, i in enumerate(members):
                where[i] = (row, j)
        return _Pairs(cached, where)

    def _distributed(self) -> tuple[int, int, Any]:
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1:
            return 0, 1, None
        return trainer.global_rank, trainer.world_size, trainer.strategy.barrier

    def prepare_data(self) -> None:
        self.base.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        rank, world_size, barrier = self._distributed()
        trainer = getattr(self, "trainer", None)
        todo = [s for s in ("train", "val", "test") if self.base.splits.get(s) is not None and s not in self.features]
        if not todo:
            return
        place_clip(self.clip, trainer_device(trainer))  # the build computes where the trainer trains
        plugin = getattr(trainer, "precision_plugin", None)
        context = plugin.forward_context() if plugin is not None else contextlib.nullcontext()
        with context:  # the trainer's precision (bf16-mixed: autocast), as in online training
            for s in todo:
                self.features[s] = self._build(s, rank, world_size, barrier)

    def _loader(self, stage: str, shuffle: bool) -> DataLoader:
        workers = int(self.loader_kwargs.get("num_workers", 0))
        return DataLoader(
            self.features[stage],
            batch_size=self.base.batch_size,
            shuffle=shuffle,
            collate_fn=collate_features,
            generator=torch.Generator().manual_seed(self.base.seed) if shuffle else None,
            num_workers=workers,
            pin_memory=bool(self.loader_kwargs.get("pin_memory", False)),
            persistent_workers=workers > 0 and bool(self.loader_kwargs.get("persistent_workers", True)),
        )


def estimate_bytes(
    num_layers: int, grid: tuple[int, int], width: int, embed_dim: int, scales: list[int], dtype_bytes: int = 2
) -> tuple[int, int]:
    """Payload bytes (per image, per pair) of the cache for a ViT of this geometry (boxes: one box per pair)."""
    h, w = grid
    t = sum(r * (r + 1) // 2 for r in (math.ceil(h / s) * math.ceil(w / s) for s in scales))
    per_image = num_layers * t * dtype_bytes + h * w * width * dtype_bytes
    per_pair = (num_layers * h * w + embed_dim) * 4 + 4 * 4 + 8
    return per_image, per_pair
