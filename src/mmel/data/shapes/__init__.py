"""The synthetic shapes world (docs/shapes_world.md): a seeded generator of images with known boxes and captions.

``generate(root, seed=0)`` writes the world under ``root`` as a COCO dataset and as a Flickr30k Entities dataset
(layout in :mod:`mmel.data.shapes.writer`); ``python -m mmel.data.shapes --root data/shapes`` does the same.
Same parameters and seed ⇒ byte-identical files; a second call with the same parameters finds the MANIFEST and
returns at once. It never deletes what is not its own: see :func:`mmel.data.shapes.writer.install_world`.

The world: 1–4 non-overlapping objects per image, 6 colours × 6 shapes (36 COCO categories named
"<colour> <shape>", supercategory = shape), on textured noisy backgrounds; 5 captions per image naming 1–3 of
its objects ("a red circle and a blue square"). :mod:`mmel.data.shapes.world` holds the vocabulary, sampling
and rendering shared with the tiny CLIP's pretraining stream.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mmel.data.shapes.world import CATEGORIES, COLOURS, SHAPES
from mmel.data.shapes.writer import FORMAT_VERSION, SPLITS, install_world, manifest_matches

__all__ = ["CATEGORIES", "COLOURS", "SHAPES", "SPLITS", "generate", "world_params"]

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 64  # the tiny CLIP's input size (mmel-tiny.json)


def world_params(
    seed: int = 0,
    *,
    n_train: int = 2000,
    n_val: int = 500,
    n_test: int = 500,
    image_size: int = DEFAULT_IMAGE_SIZE,
    max_objects: int = 4,
    size_range: tuple[float, float] = (0.22, 0.40),
) -> dict:
    """The full parameter record of a world (what MANIFEST.json stores and caching compares), validated."""
    counts = {"n_train": n_train, "n_val": n_val, "n_test": n_test}
    for key, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"shapes world: {key} must be a non-negative int, got {n!r}.")
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"shapes world: image_size must be an int ≥ 16 pixels, got {image_size!r}.")
    if not 1 <= max_objects <= 4:
        raise ValueError(f"shapes world: max_objects must be in 1..4, got {max_objects!r}.")
    lo, hi = (float(v) for v in size_range)
    if not 0.05 <= lo <= hi <= 0.6:
        raise ValueError(
            f"shapes world: size_range must satisfy 0.05 ≤ lo ≤ hi ≤ 0.6 (fraction of the side), got {size_range!r}."
        )
    return {
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        **counts,
        "image_size": image_size,
        "max_objects": max_objects,
        "size_range": [lo, hi],
    }


def generate(root: str | Path, seed: int = 0, *, overwrite: bool = False, **kwargs) -> Path:
    """Write the shapes world under ``root`` (both formats) and return ``root``.

    Args:
        root: output folder (created).
        seed: the world's seed; each image depends only on (seed, split, index).
        overwrite: regenerate even when ``root`` already holds this exact world.

    Writes only into a missing or empty folder or one holding a shapes world (then only that world's files are
    replaced; a user's other files stay); any other folder raises ``FileExistsError`` naming it.
        **kwargs: :func:`world_params` options (n_train, n_val, n_test, image_size, max_objects, size_range).
    """
    root = Path(root).expanduser()
    params = world_params(seed, **kwargs)
    if not overwrite and manifest_matches(root, params):
        log.info("shapes world: %s is up to date (seed %d)", root, seed)
        return root
    files = install_world(root, params)  # refuses a folder that is neither empty nor a shapes world
    log.info("shapes world: wrote %d files under %s", len(files) + 1, root)
    return root
