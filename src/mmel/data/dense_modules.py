"""Data modules of the dense / labelled benchmarks: ImageNet-S masks, OpenImages V7 points, ImageNet val
(``data=imagenet_s | openimages_points | imagenet``, and ``data=shapes_<name>``: the shapes world in that layout).

Each is a :class:`mmel.data.datamodules.BoxDataModule` over its dataset (only a ``test`` split: these are
evaluation sets). With ``world`` set (``{root, seed, generate_kwargs, split}``), ``prepare_data`` first makes the
shapes world there and writes it in the benchmark's layout (:mod:`mmel.data.shapes.benchmarks`) under
``<world root>/benchmarks``; ``root`` then points into that folder. With ``read_only`` (the dataset checker)
nothing is written: a missing world or layout is reported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmel.data.datamodules import BoxDataModule, _plain
from mmel.data.imagenet import ImageNetVal
from mmel.data.imagenet_s import ImageNetS
from mmel.data.openimages import OpenImagesPoints


class WorldBackedModule(BoxDataModule):
    """A BoxDataModule whose data may be the shapes world written in the dataset's layout (``world``)."""

    def __init__(self, root: str | os.PathLike, world: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.world = dict(_plain(world)) if world else None
        self.read_only = False
        self._prepared = self.world is None

    def prepare_data(self) -> None:
        if self.world is None:
            return
        from mmel.data.shapes import generate, world_params
        from mmel.data.shapes.benchmarks import write_benchmarks
        from mmel.data.shapes.writer import manifest_matches

        wroot = Path(str(self.world["root"])).expanduser()
        seed, kw = int(self.world.get("seed", 0)), dict(self.world.get("generate_kwargs") or {})
        if self.read_only:
            if not manifest_matches(wroot, world_params(seed, **kw)) or not (wroot / "benchmarks").is_dir():
                raise FileNotFoundError(
                    f"{wroot} holds no shapes world with seed={seed} written in the benchmark "
                    "layouts; nothing was written (run any evaluate with this data= first)"
                )
        else:
            generate(wroot, seed=seed, **kw)
            write_benchmarks(wroot, wroot / "benchmarks", split=str(self.world.get("split", "test")))
        self._prepared = True

    def make_dataset(self, split: str):
        if not self._prepared:
            self.prepare_data()
        return super().make_dataset(split)


class ImageNetSDataModule(WorldBackedModule):
    """ImageNet-S validation masks (:class:`mmel.data.imagenet_s.ImageNetS`; ``variant`` 50 / 300 / 919)."""

    dataset_cls = ImageNetS

    def default_splits(self) -> dict[str, str | None]:
        return {"train": None, "val": None, "test": "validation"}


class OpenImagesPointsDataModule(WorldBackedModule):
    """OpenImages V7 point labels (:class:`mmel.data.openimages.OpenImagesPoints`)."""

    dataset_cls = OpenImagesPoints

    def default_splits(self) -> dict[str, str | None]:
        return {"train": None, "val": None, "test": "validation"}


class ImageNetDataModule(WorldBackedModule):
    """ImageNet val in class folders (:class:`mmel.data.imagenet.ImageNetVal`)."""

    dataset_cls = ImageNetVal

    def default_splits(self) -> dict[str, str | None]:
        return {"train": None, "val": None, "test": "val"}
