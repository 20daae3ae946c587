"""Check a dataset on disk: ``python -m mmel.data.check data=coco data.root=/data/coco [verify=true]``.

Composes the project's config (``conf/train.yaml`` with the given overrides), builds ``cfg.data``, indexes every
split and prints per split: images, samples, and each skip / adjustment reason with its count. ``verify=true``
also decodes every image (finds corrupt files; slow on full COCO). Exit status 1 when a split has no sample, 2 when
the data is not there or a file is unusable (the message names it). It only reads: a shapes world that is missing
or made with other settings is reported, not generated.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import open_dict

from mmel.locations import config_dir


def conf_dir() -> Path:
    """The Hydra configs mmel ships: the checkout's ``conf/``, or the installed package ``mmel.conf``."""
    return config_dir()


def main(argv: list[str] | None = None) -> int:
    """Print per-split counts for the ``data`` config selected by Hydra-style overrides; returns the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(sys.argv[1:] if argv is None else argv)
    verify = False
    for o in list(overrides):
        if o.split("=")[0] == "verify":
            verify = o.split("=", 1)[1].lower() in ("1", "true", "yes")
            overrides.remove(o)
    GlobalHydra.instance().clear()  # callable more than once in a process (tests, notebooks)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.data.verify_images = verify
    dm = instantiate(cfg.data)
    if hasattr(dm, "read_only"):
        dm.read_only = True  # a checker reads: it never generates (nor deletes) a world
    try:
        dm.prepare_data()
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{cfg.data._target_} root={dm.root} verify_images={verify}")
    rc = 0
    seen: dict[str, object] = {}
    for stage, split in dm.splits.items():
        if split is None:
            continue
        if split in seen:  # e.g. COCO's test = val2017: index once
            print(f"{stage:5s} split={split}: same as {seen[split]}")
            continue
        try:
            ds = dm.dataset(stage)
        except (FileNotFoundError, ValueError) as e:  # a missing or unusable file (DatasetError too): named
            print(f"error: {stage} split={split}: {e}", file=sys.stderr)
            return 2
        seen[split] = stage
        print(f"{stage:5s} split={split}: {ds.report()}")
        rc |= int(len(ds) == 0)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
