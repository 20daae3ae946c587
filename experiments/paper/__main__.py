"""``python -m experiments.paper [shapes|coco|PATH.yaml] [--results DIR]``: every paper table from one command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import ROOT, Paper, load_spec, per_backbone


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.paper", description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default="shapes", help="a spec name under experiments/paper/ or a YAML path")
    ap.add_argument("--results", default=None, help="output folder (default: results/<spec name>)")
    ap.add_argument("--plan", action="store_true", help="list every run (configs composed, nothing run) and exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    spec = load_spec(args.spec)
    results = Path(args.results) if args.results else ROOT / "results" / spec.name
    for sub, out in per_backbone(spec, results):
        if args.plan:
            runs = Paper(sub, out).plan()
            for run in runs:
                print(f"{run.command}  # -> {run.out.relative_to(out.parent)} (config {run.config_hash})")
            print(f"{len(runs)} runs for {sub.display_title}", flush=True)
            continue
        report = Paper(sub, out).build()
        print(f"report: {report}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
