"""LightningDataModules for the shapes world, COCO and Flickr30k Entities (``data=shapes|coco|flickr30k``).

Built by Hydra as ``instantiate(cfg.data, image_size=..., mean=..., std=..., patch_size=...)`` with the loaded
CLIP's values. Constructors only store arguments; disk work happens in ``prepare_data`` (generating the shapes
world) and ``setup`` (reading annotations). Outside a Trainer call ``dm.prepare_data(); dm.setup()`` first.

Batches come from :func:`mmel.data.transforms.collate_boxes`: ``images`` [B, 3, H, W], ``valid`` [B, H, W] (real
pixels, all True in fixed-size mode), ``n_dropped`` / ``skipped`` (bad items left out of this batch, so B may be
smaller than the batch size) and lists ``boxes`` ([M_i, 4] in the input's pixels), ``prompt``, ``sample_id``, ...
A batch whose items were all bad is skipped by :class:`BoxDataLoader`; ``dm.skipped`` sums every count.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Sampler

from mmel.data.base import BoxDataset, Dropped
from mmel.data.coco import DEFAULT_TEMPLATE, CocoBoxes
from mmel.data.flickr30k import Flickr30kEntities
from mmel.data.order import EpochOrder, process_group
from mmel.data.transforms import CLIP_MEAN, CLIP_STD, BoxTransform, collate_boxes

log = logging.getLogger(__name__)

STAGES = ("train", "val", "test")


def _plain(x: Any) -> Any:
    """Hydra passes DictConfig / ListConfig; keep plain containers (picklable, comparable)."""
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig | ListConfig) else x


class TransformedDataset(Dataset):
    """``transform(dataset.load(i))``; an item that cannot be made becomes a :class:`Dropped` marker (counted by the
    collate, so the count reaches the main process from any worker)."""

    def __init__(self, dataset: BoxDataset, transform: BoxTransform) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any] | Dropped:
        item = self.dataset.load(index)
        if isinstance(item, Dropped):
            return item
        out = self.transform(item)
        return out if out is not None else Dropped("sample_cropped_out", item["sample_id"], item["file"])


class BoxDataLoader(DataLoader):
    """A DataLoader that never yields an empty batch and counts what was dropped, in the main process.

    ``skipped`` (a Counter, shared with the data module) is reset at the start of each pass and then holds the
    pass's per-sample drop reasons (``corrupt_image``, ``missing_image``, ``size_mismatch``, ``sample_cropped_out``)
    and ``box_cropped_out``. A batch whose items were all dropped is counted and skipped. ``len()`` still counts such
    batches (an upper bound). Built with ``collate_boxes(..., keep_empty=True)``.
    """

    def __init__(self, *args: Any, skipped: Counter | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skipped = skipped if skipped is not None else Counter()

    def __iter__(self):
        self.skipped.clear()
        for batch in super().__iter__():
            if batch is None:  # a collate without keep_empty
                continue
            self.skipped.update(batch.get("skipped", {}))
            if "images" in batch:
                yield batch


class StageLoaders(pl.LightningDataModule):
    """train/val/test loaders from one ``_loader(stage, shuffle)`` (only training data is shuffled).

    Whatever sampler ``_loader`` chose, the loaders Lightning gets read in :class:`mmel.data.order.EpochOrder`'s
    order: training in a permutation fixed by (``order_seed``, epoch) with global batches split over DDP
    processes, evaluation in dataset order (every W-th sample per process under DDP).
    """

    #: the run's seed for the training order (``train.py`` sets ``cfg.seed``); None: Lightning's global seed
    order_seed: int | None = None

    def _loader(self, stage: str, shuffle: bool) -> DataLoader:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self._ordered(self._loader("train", shuffle=True), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._ordered(self._loader("val", shuffle=False), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._ordered(self._loader("test", shuffle=False), shuffle=False)

    def _ordered(self, loader: DataLoader, shuffle: bool) -> DataLoader:
        rank, world = process_group()
        if not shuffle and world == 1:
            return loader  # one process reads evaluation data in dataset order already
        seed = self.order_seed if self.order_seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = EpochOrder(
            len(loader.dataset), seed=seed, shuffle=shuffle, batch_size=loader.batch_size if shuffle else None
        )
        # Lightning makes a resumed run's first iterator before its set_epoch call (worker processes fetch
        # indices at once): start at the trainer's epoch so that iterator reads the right order too
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            sampler.set_epoch(trainer.current_epoch)
        return with_sampler(loader, sampler, sampler.per_process_batch or loader.batch_size)


def with_sampler(loader: DataLoader, sampler: Sampler, batch_size: int | None) -> DataLoader:
    """A loader of the same class and settings as ``loader`` that reads ``sampler``'s indices in batches of
    ``batch_size`` (no shuffle, no drop_last: the sampler decides). Works for DataLoader subclasses whose extra
    constructor arguments are stored under their own names (e.g. :class:`BoxDataLoader`'s ``skipped``)."""
    names: list[str] = []
    for cls in type(loader).__mro__:
        sig = inspect.signature(cls.__init__).parameters.values()
        names += [p.name for p in sig if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if cls is DataLoader:
            break
    skip = {"sampler", "batch_sampler", "shuffle", "drop_last", "batch_size"}
    kwargs = {n: getattr(loader, n) for n in names if n not in skip and hasattr(loader, n)}
    return type(loader)(**kwargs, sampler=sampler, batch_size=batch_size, shuffle=False, drop_last=False)


class BoxDataModule(StageLoaders):
    """Shared machinery: one :class:`BoxDataset` per stage, transformed for CLIP, batched by ``collate_boxes``.

    Args:
        root: dataset folder.
        splits: stage -> split name (``{"train": ..., "val": ..., "test": ...}``); a stage mapped to null has no
            loader.
        batch_size, num_workers, pin_memory, persistent_workers: DataLoader settings (persistent workers: kept
            between epochs when ``num_workers > 0``).
        image_size, patch_size, mean, std: the CLIP model's input settings (the programs pass them).
        resize: ``"fixed"`` (224-style centre crop) or ``"keep"`` (aspect kept, sides multiple of the patch).
        max_side: keep mode only: cap on the longer side.
        subset: samples per split for quick runs (None = all), drawn with ``seed``.
        verify_images: decode every image in ``setup`` and drop unreadable ones (exact skip counts; slow on real
            data).
        dataset_kwargs: passed to the dataset class (prompt template, box filters, ...).
    """

    dataset_cls: type[BoxDataset] = BoxDataset

    def __init__(
        self,
        root: str | os.PathLike,
        splits: dict[str, str | None] | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        image_size: int = 224,
        patch_size: int = 16,
        mean: tuple[float, ...] = CLIP_MEAN,
        std: tuple[float, ...] = CLIP_STD,
        resize: str = "fixed",
        max_side: int | None = None,
        subset: int | None = None,
        seed: int = 0,
        verify_images: bool = False,
        **dataset_kwargs: Any,
    ) -> None:
        super().__init__()
        self.root = Path(str(root)).expanduser()
        self.splits = dict(_plain(splits)) if splits is not None else self.default_splits()
        unknown = set(self.splits) - set(STAGES)
        if unknown:
            raise ValueError(f"splits keys must be among {STAGES}, got {sorted(unknown)}")
        self.batch_size, self.num_workers, self.pin_memory = int(batch_size), int(num_workers), bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.subset, self.seed, self.verify_images = subset, int(seed), bool(verify_images)
        self.transform = BoxTransform(resize, image_size, patch_size, max_side, tuple(_plain(mean)), tuple(_plain(std)))
        self.dataset_kwargs = {k: _plain(v) for k, v in dataset_kwargs.items()}
        self.datasets: dict[str, BoxDataset] = {}
        # per stage: what the loaders dropped in their last pass (counted in the main process, see BoxDataLoader)
        self.loading_skipped: dict[str, Counter] = {}

    def default_splits(self) -> dict[str, str | None]:
        return {"train": "train", "val": "val", "test": "test"}

    def dataset_root(self) -> Path:
        return self.root

    def make_dataset(self, split: str) -> BoxDataset:
        return self.dataset_cls(
            self.dataset_root(), split, subset=self.subset, seed=self.seed, **dict(self.dataset_kwargs)
        )

    def setup(self, stage: str | None = None) -> None:
        """Index the splits a stage needs (all when ``stage`` is None); logs each split's counts."""
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for s in wanted.get(stage, STAGES) if stage else STAGES:
            if self.splits.get(s) is not None:
                self.dataset(s)

    def dataset(self, stage: str) -> BoxDataset:
        """The untransformed dataset of a stage (items with PIL images and original-pixel boxes)."""
        if stage not in self.datasets:
            split = self.splits.get(stage)
            if split is None:
                raise ValueError(f"{type(self).__name__} has no '{stage}' split (splits={self.splits})")
            ds = self.make_dataset(split)
            if self.verify_images:
                ds.verify()
            self.datasets[stage] = ds
            log.info("%s", ds.report())
        return self.datasets[stage]

    def _loader(self, stage: str, shuffle: bool) -> BoxDataLoader:
        collate = functools.partial(
            collate_boxes,
            pad=True,
            pad_multiple=self.transform.patch_size if self.transform.mode == "keep" else 1,
            keep_empty=True,
        )
        return BoxDataLoader(
            TransformedDataset(self.dataset(stage), self.transform),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0 and self.persistent_workers,
            # the training order is EpochOrder's (see StageLoaders); a generator of our own keeps the loader from
            # drawing its worker base seed from the global RNG
            generator=torch.Generator().manual_seed(self.seed),
            skipped=self.loading_skipped.setdefault(stage, Counter()),
        )

    @property
    def skipped(self) -> Counter:
        """Everything skipped or adjusted so far, over the stages set up.

        Plain keys were found when indexing (image problems per file, box problems per box, ``sample_*`` per
        sample); ``loading/<reason>`` keys count samples (and ``loading/box_cropped_out`` boxes) the loaders
        dropped in their last pass, from every worker process.
        """
        total: Counter = Counter()
        for ds in self.datasets.values():
            total.update(ds.skipped)
        for counts in self.loading_skipped.values():
            total.update({f"loading/{k}": v for k, v in counts.items() if v})
        return total

    def teardown(self, stage: str | None = None) -> None:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()) if v) or "none"
        log.info("%s skipped/adjusted (main process): %s", type(self).__name__, counts)


class CocoDataModule(BoxDataModule):
    """COCO 2017 instances: ``<root>/annotations/instances_<split>.json`` + ``<root>/<split>/`` images.

    COCO's test split has no public boxes, so ``test`` defaults to ``val2017``. Dataset options (``image_dir``,
    ``prompt_template``, ``include_crowd``, ``min_box_area``, ``captions``) go to :class:`CocoBoxes`.
    """

    dataset_cls = CocoBoxes

    def __init__(self, root: str | os.PathLike, prompt_template: str = DEFAULT_TEMPLATE, **kwargs: Any) -> None:
        super().__init__(root, prompt_template=prompt_template, **kwargs)

    def default_splits(self) -> dict[str, str | None]:
        return {"train": "train2017", "val": "val2017", "test": "val2017"}


class Flickr30kDataModule(BoxDataModule):
    """Flickr30k Entities with the official train/val/test split files (options go to :class:`Flickr30kEntities`)."""

    dataset_cls = Flickr30kEntities


class ShapesDataModule(BoxDataModule):
    """The synthetic shapes world (docs/shapes_world.md), generated under ``root`` on first use.

    Args:
        root: where the world lives (``<root>/coco``, ``<root>/flickr30k``, ``<root>/MANIFEST.json``).
        seed: the generator's seed (also the subset seed).
        format: ``"coco"`` (category prompts) or ``"flickr30k"`` (caption phrases) — same images, two formats.
        generate_kwargs: extra arguments of ``mmel.data.shapes.generate`` (image count, size, ...).
        prompt_template: None = the format's default (``"a photo of a {}."`` for coco, ``"{}"`` for flickr30k).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        seed: int = 0,
        format: str = "coco",
        generate_kwargs: dict[str, Any] | None = None,
        prompt_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        if format not in ("coco", "flickr30k"):
            raise ValueError(f"format must be 'coco' or 'flickr30k', got {format!r}")
        if prompt_template is None:
            prompt_template = DEFAULT_TEMPLATE if format == "coco" else "{}"
        super().__init__(root, seed=seed, prompt_template=prompt_template, **kwargs)
        self.format = format
        self.dataset_cls = CocoBoxes if format == "coco" else Flickr30kEntities
        self.generate_kwargs = dict(_plain(generate_kwargs) or {})
        self.read_only = False  # True: never write the world (prepare_data checks it instead)
        self._prepared = False

    def dataset_root(self) -> Path:
        return self.root / self.format

    def prepare_data(self) -> None:
        """Make sure ``root`` holds the world these settings describe: the generator returns at once when its
        MANIFEST.json matches (seed and parameters), and regenerates the world when it does not — only into a
        missing or empty folder or over a shapes world of ours (anything else raises ``FileExistsError``).
        With ``read_only`` set (the dataset checker), a missing or different world raises instead."""
        from mmel.data.shapes import generate, world_params
        from mmel.data.shapes.writer import manifest_matches

        if self.read_only:
            if not manifest_matches(self.root, world_params(self.seed, **self.generate_kwargs)):
                raise FileNotFoundError(
                    f"{self.root} holds no complete shapes world with seed={self.seed} and generate_kwargs="
                    f"{self.generate_kwargs}; nothing was written. Make it with `python -m mmel.data.shapes "
                    f"--root {self.root} --seed {self.seed}` (or any program, e.g. python train.py)"
                )
        else:
            generate(self.root, seed=self.seed, **self.generate_kwargs)
        self._prepared = True

    def make_dataset(self, split: str) -> BoxDataset:
        if not self._prepared:
            self.prepare_data()  # convenience outside a Trainer (single process); cheap when the world is there
        return super().make_dataset(split)
