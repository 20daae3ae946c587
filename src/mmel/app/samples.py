"""The explorer's boxes mode: shapes-world samples with their ground-truth boxes (generated on first use), and the
per-item scores of a map against them (the library's functional metrics, at the shapes world's pointing tolerance)."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmel.app.inputs import InputError
from mmel.locations import config_dir


def item_metrics(heat: np.ndarray, boxes: np.ndarray, tolerance: float, ties: str = "all") -> dict[str, float]:
    """Per-item localisation of one [H, W] map against its boxes [M, 4] (xyxy, image pixels), by the library's
    functional metrics: pointing-game hit (0/1), energy pointing game (mass in the boxes) and IoU (mean rule)."""
    from mmel.metrics import energy_pointing_game, pointing_game, saliency_iou

    maps = torch.from_numpy(np.asarray(heat, dtype=np.float32))[None]  # [1, H, W]
    b = [torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)]
    return {
        "pointing": float(pointing_game(maps, b, tolerance=tolerance, ties=ties)["accuracy"]),
        "energy": float(energy_pointing_game(maps, b)),
        "iou": float(saliency_iou(maps, b)["miou"]),
    }


def pointing_tolerance(conf_dir: str | os.PathLike | None = None, default: float = 15.0) -> float:
    """The shapes world's pointing tolerance in pixels (``conf/metrics/shapes.yaml``), else ``default``."""
    from omegaconf import OmegaConf

    f = Path(conf_dir or config_dir()) / "metrics" / "shapes.yaml"
    if f.is_file():
        v = OmegaConf.select(OmegaConf.load(f), "pointing_game.tolerance")
        if v is not None:
            return float(v)
    return default


# --------------------------------------------------------------------------------------------------- samples


@dataclass
class Sample:
    """An image from a dataset split with its ground truth: prompt -> boxes [M, 4] xyxy (image pixels)."""

    image: Image.Image
    label: str
    boxes: dict[str, np.ndarray] = field(default_factory=dict)


class ShapesSamples:
    """Images of the shapes world (COCO format) under ``root``, generated there on first use when absent.

    Generation only happens into a root holding no world at all: an existing world of other parameters is read
    as it is and never regenerated (regenerating would delete its files).
    """

    def __init__(self, root: str | os.PathLike, seed: int = 0, **generate_kwargs: Any) -> None:
        self.root = Path(root).expanduser()
        self.seed = seed
        self.generate_kwargs = generate_kwargs  # e.g. n_train=0 for a small world in tests
        self._datasets: dict[str, Any] = {}
        self._lock = threading.RLock()  # one generation at a time; dataset() holds it around ensure()

    def ensure(self) -> str | None:
        """Make sure the world is there; returns a note when it was generated now."""
        with self._lock:
            if (self.root / "coco" / "annotations").is_dir():
                return None
            if any((self.root / n).exists() for n in ("coco", "flickr30k", "MANIFEST.json")):
                raise InputError(f"Samples: {self.root} holds an incomplete shapes world (no coco/annotations).")
            from mmel.data.shapes import generate

            t = time.perf_counter()
            generate(self.root, seed=self.seed, **self.generate_kwargs)
        return f"Generated the shapes world (seed {self.seed}) under {self.root} in {time.perf_counter() - t:.0f} s."

    def dataset(self, split: str):
        """The COCO-format dataset of ``split`` (train / val / test), indexed once."""
        from mmel.data import CocoBoxes, DatasetError

        with self._lock:
            self.ensure()
            if split not in self._datasets:
                try:
                    self._datasets[split] = CocoBoxes(self.root / "coco", split)
                except (DatasetError, FileNotFoundError, ValueError) as e:
                    raise InputError(f"Samples: cannot read split '{split}' of {self.root / 'coco'} ({e}).") from e
            return self._datasets[split]

    def count(self, split: str) -> int:
        """Number of images in ``split``."""
        return len(self.dataset(split).groups_by_image())

    def sample(self, split: str, index: int) -> Sample:
        """Image ``index`` of ``split`` with one prompt per category present and its boxes."""
        ds = self.dataset(split)
        groups = ds.groups_by_image()
        if not 0 <= int(index) < len(groups):
            raise InputError(f"Samples: index {index} out of range; split '{split}' has {len(groups)} images.")
        idx = groups[int(index)]
        first = ds[idx[0]]
        if first is None:
            raise InputError(f"Samples: the image of item {idx[0]} in '{split}' cannot be read.")
        boxes = {ds.records[i].prompt: ds.records[i].boxes.copy() for i in idx}
        return Sample(first["image"], f"{split} #{index} ({Path(first['file']).name})", boxes)
