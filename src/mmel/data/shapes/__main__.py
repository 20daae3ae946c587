"""Command line: ``python -m mmel.data.shapes --root data/shapes --seed 0`` writes the shapes world."""

from __future__ import annotations

import argparse
import logging

from mmel.data.shapes import generate, world_params


def main(argv: list[str] | None = None) -> None:
    defaults = world_params()
    p = argparse.ArgumentParser(prog="python -m mmel.data.shapes", description=__doc__)
    p.add_argument("--root", default="data/shapes", help="output folder (default: data/shapes)")
    p.add_argument("--seed", type=int, default=0)
    for key in ("n_train", "n_val", "n_test", "image_size", "max_objects"):
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int, default=defaults[key])
    p.add_argument("--size-range", type=float, nargs=2, default=defaults["size_range"], metavar=("LO", "HI"))
    p.add_argument("--overwrite", action="store_true", help="regenerate even if the MANIFEST matches")
    args = vars(p.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root, seed = args.pop("root"), args.pop("seed")
    args["size_range"] = tuple(args["size_range"])
    print(generate(root, seed, **args))


if __name__ == "__main__":
    main()
