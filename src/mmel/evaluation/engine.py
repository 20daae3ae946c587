"""The evaluation engine: a LightningModule whose test loop explains chunks of samples and scores every item.

Each batch is one chunk (records.py): its images are explained together with :meth:`Explainer.explain_batch`
(one forward of the images and, for gradient explainers, one batched VJP over every image's prompts). Each
(image, prompt) item is scored with the metrics' functional forms, which give per-item values (hit, difficult flag,
energy, IoU and its threshold sweep, deletion / insertion curves and AUCs, the map's peak); the values go to this
process's item file (fsync'ed per batch) and into the process's torchmetrics objects (synced across processes at the
end, a cross-check). The final numbers are the metrics rebuilt from the merged records (:func:`replay`), so an
interrupted-and-resumed run and a DDP run report exactly what one uninterrupted process reports.

Chunks are assigned to processes round-robin (no DistributedSampler: nothing is padded or duplicated; a duplicated
record would still be dropped by the merge, which keeps one per sample id).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mmel.data.base import Dropped
from mmel.data.transforms import collate_boxes
from mmel.evaluation.context import TRUST_NEEDS, BatchTrust, SplitObjects
from mmel.evaluation.records import ItemWriter
from mmel.metrics import ClipScorer, difficult_flags
from mmel.metrics._common import resize_group, resize_maps, size_groups
from mmel.metrics.protocol import ItemContext, records_of
from mmel.utils.progress import SparseProgressBar

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- data
class IndexedItems(Dataset):
    """Transformed samples by dataset index; bad ones become :class:`Dropped` (carrying their index)."""

    def __init__(self, transformed: Dataset) -> None:
        self.transformed = transformed

    def __len__(self) -> int:
        return len(self.transformed)

    def __getitem__(self, index: int) -> dict[str, Any] | tuple[int, Dropped]:
        item = self.transformed[index]
        if isinstance(item, Dropped):
            return (index, item)
        return {**item, "index": index}


class Chunks(torch.utils.data.Sampler):
    """Yields this process's chunks (lists of dataset indices), round-robin over ``world`` processes."""

    def __init__(self, chunk_list: Sequence[tuple[int, list[int]]], rank: int = 0, world: int = 1) -> None:
        self.mine = list(chunk_list)[rank::world]

    def __iter__(self):
        return iter([idx for _, idx in self.mine])

    def __len__(self) -> int:
        return len(self.mine)


def make_collate(pad_multiple: int, chunk_of: dict[int, int]):
    """collate_boxes that also keeps the dropped samples (index, reason, file) and the chunk id."""

    def collate(items: list) -> dict[str, Any]:
        dropped = [d for d in items if isinstance(d, tuple)]
        kept = [it for it in items if isinstance(it, dict)]
        batch = collate_boxes([d for _, d in dropped] + kept, pad=True, pad_multiple=pad_multiple, keep_empty=True)
        batch["dropped"] = [(i, d.reason, d.sample_id, d.file) for i, d in dropped]
        first = (kept[0]["index"] if kept else dropped[0][0]) if items else -1
        batch["chunk"] = chunk_of.get(first, -1)
        return batch

    return collate


def image_groups(batch: dict[str, Any]) -> list[list[int]]:
    """Indices of consecutive batch entries that share an image (one entry of an explainer batch each)."""
    ids = batch["image_id"]
    groups, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            groups.append(list(range(start, i)))
            start = i
    return groups


# ------------------------------------------------------------------------------------------ per-item values
def needs_of(metrics: dict[str, Any]) -> frozenset[str]:
    """Every context entry some metric needs (:mod:`mmel.metrics.protocol`)."""
    return frozenset().union(*(m.needs for m in metrics.values()))


def item_values(metrics: dict[str, Any], ctx: ItemContext) -> list[dict[str, Any]]:
    """Per-item record fields of every metric for the context's N items -> N dicts {metric name: its fields}."""
    out: list[dict[str, Any]] = [{} for _ in range(len(ctx))]
    for name, m in metrics.items():
        for k, v in enumerate(m.item_values(ctx)):
            out[k][name] = v
    return out


def _starts(groups: list[list[int]]) -> list[int]:
    out, s = [], 0
    for g in groups:
        out.append(s)
        s += len(g)
    return out


def peaks(maps: Tensor, sizes: Tensor) -> list[list[int]]:
    """(y, x) of each map's maximum (first in raster order) in the scored frame: maps [K, h, w], sizes [K, 2]."""
    out: list[list[int]] = [[0, 0]] * len(sizes)
    for (h, w), idx in size_groups([tuple(int(v) for v in s) for s in sizes.tolist()]).items():
        flat = resize_group(maps[idx], (h, w)).flatten(1).argmax(1).tolist()  # one argmax per size
        for i, f in zip(idx, flat, strict=True):
            out[i] = [f // w, f % w]
    return out


def replay(metrics: dict[str, Any], records: Sequence[dict[str, Any]]) -> None:
    """Update ``metrics`` with the per-item fields of the scored ``records`` (in the given order)."""
    for name, m in metrics.items():
        m.update(records=records_of(records, name))


# ------------------------------------------------------------------------------------------------ module
class ItemsProgressBar(SparseProgressBar):
    """The sparse bar with items/s (scored (image, prompt) pairs per second) in its postfix; tqdm adds the ETA."""

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        rate = getattr(pl_module, "items_per_second", None)
        if rate and self.test_progress_bar is not None:  # set before the base class decides to redraw
            self.test_progress_bar.set_postfix({"items": pl_module.items_done, "items/s": f"{rate:.2f}"}, refresh=False)
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)


class EvalModule(pl.LightningModule):
    """Test loop of the evaluate program (see the module docstring).

    Args:
        explainer: any :class:`mmel.explainers.base.Explainer`.
        metrics: name -> torchmetrics Metric (from the metrics config).
        transformed: the split's dataset, transformed for the model (``TransformedDataset``).
        records: the split's :class:`mmel.data.base.Record` s (all, for prompt counts and the scorer's prompts).
        todo: (chunk id, dataset indices) still to do, in order.
        keep: keep-size mode (score maps resized to the original image against the original boxes).
        pad_multiple: keep mode pads a batch to a multiple of the patch.
        out: the run dir (per-rank item files, maps).
        scorer_kind: deletion / insertion scorer (cosine | softmax | top1).
        save_maps: write each map (float16, in the scored frame) to ``maps/chunk_<id>.npz`` keyed by sample id.
        explainer_factory: ``factory(clip=...) -> explainer`` (model randomisation rebuilds the explainer).
        transform: the data module's BoxTransform (trust metrics map other objects' boxes into the scored frame).
        pin_memory: the loader's page-locked batches (``data.pin_memory``; GPUs).
    """

    def __init__(
        self,
        explainer,
        metrics: dict[str, Any],
        transformed: Dataset,
        records: Sequence[Any],
        todo: Sequence[tuple[int, list[int]]],
        keep: bool,
        pad_multiple: int,
        out: Path,
        scorer_kind: str = "cosine",
        save_maps: bool = False,
        num_workers: int = 0,
        explainer_factory=None,
        transform=None,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.explainer = explainer
        self.pin_memory = bool(pin_memory)
        # registered so that Lightning moves the frozen model (and e.g. the HSRM) to the device
        self.frozen = nn.ModuleDict(
            {k: v for k, v in vars(explainer).items() if isinstance(v, nn.Module) and k != "visual"}
        )
        self.metrics = nn.ModuleDict(metrics)
        self.transformed, self.records, self.todo = transformed, records, list(todo)
        self.keep, self.pad_multiple, self.out = keep, pad_multiple, Path(out)
        self.scorer_kind, self.save_maps, self.num_workers = scorer_kind, save_maps, num_workers
        self.prompts_per_image = Counter(str(r.image_id) for r in records)
        # a labelled dataset's whole label set (ImageNet's classes; mmel.data.imagenet), for zero-shot metrics
        self.classes = getattr(getattr(transformed, "dataset", None), "classes", None)
        self.scorer: ClipScorer | None = None
        self.writer: ItemWriter | None = None
        self.items_done = 0
        self.items_per_second: float | None = None
        self.live: dict[str, Any] = {}
        self.needs = needs_of(metrics)
        self._token_counts: dict[str, tuple[int, int] | None] = {}  # prompt -> (kept, total) tokens, see _truncation
        clip = getattr(explainer, "clip", None)
        if "randomised" in self.needs and (explainer_factory is None or clip is None):
            raise ValueError("evaluate: model randomisation needs the explainer factory and the model")
        # the split's objects per image, only when a trust metric reads them
        self.split = (
            SplitObjects(records, transform, keep, explainer_factory, clip) if self.needs & TRUST_NEEDS else None
        )

    def test_dataloader(self) -> DataLoader:
        chunk_of = {i: c for c, idx in self.todo for i in idx}
        sampler = Chunks(self.todo, self.global_rank, self.trainer.world_size if self._trainer else 1)
        return DataLoader(
            IndexedItems(self.transformed),
            batch_sampler=sampler,
            collate_fn=make_collate(self.pad_multiple, chunk_of),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,  # on a GPU: batches copied to the device asynchronously
        )

    def on_test_start(self) -> None:
        if "scorer" in self.needs:  # built here: the model is on its device now
            # and a relational item's swapped words (what the "model knows" test scores)
            prompts = sorted({r.prompt for r in self.records} | {r.extra["swapped"] for r in self.records
                                                                 if "swapped" in r.extra})  # fmt: skip
            self.scorer = ClipScorer(self.explainer.clip, prompts, kind=self.scorer_kind)
        self.writer = ItemWriter(self.out / f"items_rank{self.global_rank}.jsonl")
        self._t0 = time.perf_counter()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        chunk = batch["chunk"]
        records = [
            {"sample_id": str(sid), "index": int(i), "chunk": chunk, "file": str(f), "skip": reason}
            for i, reason, sid, f in batch["dropped"]
        ]
        if "images" in batch:
            records += self._score(batch, chunk)
        self.writer.write(records)  # on disk before the next batch starts
        self.items_done += sum("skip" not in r for r in records)
        self.items_per_second = self.items_done / max(time.perf_counter() - self._t0, 1e-9)

    def _score(self, batch: dict[str, Any], chunk: int) -> list[dict[str, Any]]:
        groups = image_groups(batch)
        images = []
        for idx in groups:
            image = batch["images"][idx[0]]
            if "valid" in batch and self.keep:  # crop the padding of keep-size batches away
                rows, cols = batch["valid"][idx[0]].any(1).nonzero(), batch["valid"][idx[0]].any(0).nonzero()
                image = image[:, : int(rows.max()) + 1, : int(cols.max()) + 1]
            images.append(image)
        maps = self._explain(images, [[batch["prompt"][i] for i in idx] for idx in groups])
        # per item: its map, boxes and size in the scored frame, the image the model saw, the difficult flag
        order = [i for idx in groups for i in idx]
        item_maps = [m.float().cpu()[k] for idx, m in zip(groups, maps, strict=True) for k in range(len(idx))]
        item_images = [im for idx, im in zip(groups, images, strict=True) for _ in idx]
        key = "boxes_orig" if self.keep else "boxes"
        boxes = [torch.as_tensor(batch[key][i], dtype=torch.float32).cpu() for i in order]
        if self.keep:
            sizes = torch.tensor([list(batch["size"][i]) for i in order])
        else:
            sizes = torch.tensor([list(m.shape[-2:]) for m in item_maps])
        difficult = torch.cat(
            [
                difficult_flags(boxes[s : s + len(idx)], sizes[s : s + len(idx)],
                                self.prompts_per_image[str(batch["image_id"][idx[0]])] > 1)
                for s, idx in zip(_starts(groups), groups, strict=True)
            ]
        )  # fmt: skip
        prompts = [batch["prompt"][i] for i in order]
        # dense targets and a relational item's other boxes (mmel.data.dense), in the scored frame
        dense = {name: self._dense(batch, name, order) for name in ("mask", "points", "lookalikes", "mentioned")}
        swapped = [str(batch["swapped"][i]) for i in order] if "swapped" in batch else None
        cfs = [batch["counterfactual_image"][i] for i in order] if "counterfactual_image" in batch else None
        labels = torch.tensor([int(batch["label"][i]) for i in order]) if "label" in batch else None
        categories = [str(batch["category"][i]) for i in order] if "category" in batch else None
        trust = None
        if self.split is not None:
            explain = lambda e, ims, ps: self._explain(ims, ps, e)  # noqa: E731
            trust = BatchTrust(self.split, batch, groups, images, self.explainer, explain)
        # one context per map shape (all items of a fixed-size batch at once)
        by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
        for j, m in enumerate(item_maps):
            by_shape[tuple(m.shape)].append(j)
        values: list[dict[str, Any]] = [{}] * len(order)
        pk: list[list[int]] = [[0, 0]] * len(order)
        for js in by_shape.values():
            ims = [item_images[j] for j in js]
            m = torch.stack([item_maps[j] for j in js])
            ctx = ItemContext(
                maps=m,
                ids=[str(batch["sample_id"][order[j]]) for j in js],
                boxes=[boxes[j] for j in js],
                sizes=sizes[js],
                images=torch.stack(ims) if len({tuple(im.shape) for im in ims}) == 1 else None,
                prompts=[prompts[j] for j in js],
                categories=[categories[j] for j in js] if categories is not None else None,
                difficult=difficult[js],
                scorer=self.scorer,
                masks=[dense["mask"][j] for j in js] if dense["mask"] is not None else None,
                points=[dense["points"][j] for j in js] if dense["points"] is not None else None,
                labels=labels[js] if labels is not None else None,
                classes=self.classes,
                lookalikes=[dense["lookalikes"][j] for j in js] if dense["lookalikes"] is not None else None,
                mentioned=[dense["mentioned"][j] for j in js] if dense["mentioned"] is not None else None,
                swapped=[swapped[j] for j in js] if swapped is not None else None,
                counterfactuals=[cfs[j] for j in js] if cfs is not None else None,
            )
            if trust is not None:
                ctx = trust.context(ctx, js)
            for j, v, p in zip(js, item_values(self.metrics, ctx), peaks(m, sizes[js]), strict=True):
                values[j], pk[j] = v, p
        out, saved = [], {}
        for j, i in enumerate(order):
            sid = str(batch["sample_id"][i])
            image_id = batch["image_id"][i]
            out.append(
                {
                    "sample_id": sid,
                    "index": int(batch["index"][i]),
                    "chunk": chunk,
                    "image_id": image_id if isinstance(image_id, int) else str(image_id),
                    "file": str(batch["file"][i]),
                    "prompt": prompts[j],
                    "category": str(batch["category"][i]) if "category" in batch else None,
                    "n_boxes_cropped_out": int(batch["n_boxes_cropped_out"][i])
                    if "n_boxes_cropped_out" in batch
                    else 0,
                    "peak": {"y": pk[j][0], "x": pk[j][1]},
                    "metrics": values[j],
                    **self._truncation(prompts[j]),
                }
            )
            if self.save_maps:
                saved[sid] = self._scored_map(item_maps[j], sizes[j])
        if saved:
            self._write_maps(chunk, saved)
        replay(self.metrics, out)  # the live, per-process torchmetrics (synced at the end)
        return out

    def _dense(self, batch: dict[str, Any], name: str, order: list[int]) -> list[Tensor] | None:
        """The items' mask / points in the scored frame (the originals in keep-size mode), or None."""
        key = f"{name}_orig" if self.keep else name
        return [torch.as_tensor(batch[key][i]).cpu() for i in order] if key in batch else None

    def _truncation(self, prompt: str) -> dict[str, Any]:
        """``{"prompt_tokens": {"kept": n, "total": m}}`` for a prompt the text tower's context cuts, else {}."""
        if prompt not in self._token_counts:
            counter = getattr(self.explainer.clip, "token_counts", None)
            self._token_counts[prompt] = counter(prompt) if counter else None
        counts = self._token_counts[prompt]
        return {"prompt_tokens": {"kept": counts[0], "total": counts[1]}} if counts and counts[0] < counts[1] else {}

    def _explain(self, images: list[Tensor], prompts: list[list[str]], explainer=None) -> list[Tensor]:
        """Explain images (possibly of different sizes: one explain_batch per size) -> maps [K_b, h_b, w_b]
        (with ``explainer``, or the run's)."""
        explainer = self.explainer if explainer is None else explainer
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for b, im in enumerate(images):
            by_size[tuple(im.shape[-2:])].append(b)
        maps: list[Tensor | None] = [None] * len(images)
        for members in by_size.values():
            stacked = torch.stack([images[b] for b in members])
            with torch.enable_grad() if explainer.needs_grad else torch.no_grad():
                result = explainer.explain_batch(stacked, [prompts[b] for b in members])
            for b, m in zip(members, result, strict=True):
                maps[b] = m.detach()
        return maps  # type: ignore[return-value]

    @staticmethod
    def _scored_map(m: Tensor, size: Tensor) -> np.ndarray:
        return resize_maps(m[None], [tuple(int(v) for v in size.tolist())])[0].numpy().astype(np.float16)

    def _write_maps(self, chunk: int, saved: dict[str, np.ndarray]) -> None:
        folder = self.out / "maps"
        folder.mkdir(exist_ok=True)
        tmp = folder / f"chunk_{chunk:06d}.tmp.npz"
        np.savez_compressed(tmp, **saved)
        tmp.replace(folder / f"chunk_{chunk:06d}.npz")  # before the records: a recorded chunk has its maps

    def on_test_epoch_end(self) -> None:
        # every process takes part in the sync; the result is the new items of this session over all processes.
        # Only when every process had work: a process without batches may not reach this hook (no deadlock).
        if len(self.todo) >= self.trainer.world_size:
            self.live = {name: m.compute() for name, m in self.metrics.items()}

    def on_test_end(self) -> None:
        if self.writer is not None:
            self.writer.close()
