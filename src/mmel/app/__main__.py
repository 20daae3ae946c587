"""``python -m mmel.app``: serve the explorer on localhost (public binding and share links only when asked; then
typed paths are confined, :mod:`mmel.app.paths`)."""

from __future__ import annotations

import argparse
import os
import sys

from mmel.app import inputs, models
from mmel.app import samples as sample_sets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``--help`` lists it)."""
    p = argparse.ArgumentParser(prog="python -m mmel.app", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (needs internet)")
    p.add_argument("--logs", default="logs", help="folder searched for trained hsrm.pt files (default logs/)")
    p.add_argument("--checkpoint", action="append", default=[], help="an hsrm.pt to offer (repeatable)")
    p.add_argument("--weights-dir", default=None,
                   help="served beyond localhost (--host not loopback, --share): the only folder whose files the "
                   "page's weights / checkpoint boxes may name (on localhost any path is taken)")  # fmt: skip
    p.add_argument("--data-root", default=None, help="shapes world for samples (default data/shapes; made if absent)")
    p.add_argument("--max-side", type=int, default=inputs.MAX_SIDE, help="larger uploads are downscaled to this")
    p.add_argument("--concurrency", type=int, default=4, help="requests computed at once (default 4)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build the page and serve it until interrupted."""
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline by default: no telemetry calls
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("The explorer needs Gradio: pip install -e '.[app]'", file=sys.stderr)
        return 2
    from mmel.app.paths import PathPolicy
    from mmel.app.ui import build_app, serve

    root = args.data_root or models.repo_root() / "data" / "shapes"
    offered = [*args.checkpoint, *models.find_checkpoints(args.logs)]  # what the page lists (as build_app finds them)
    try:
        policy = PathPolicy.for_server(args.host, args.share, offered, args.weights_dir)
    except NotADirectoryError as e:
        print(e, file=sys.stderr)
        return 2
    if policy.exposed:
        where = f"files in {policy.weights_dir}" if policy.weights_dir else "no weights files (no --weights-dir)"
        print(f"Reachable from other machines: typed paths are limited to the {len(policy.checkpoints)} offered "
              f"checkpoint(s) and {where}.", file=sys.stderr)  # fmt: skip
    demo = build_app(
        models.ModelCache(policy=policy),
        samples=sample_sets.ShapesSamples(root),
        logs=args.logs,
        checkpoints=args.checkpoint,
        max_side=args.max_side,
    )
    serve(demo, args.host, args.port, share=args.share, concurrency=args.concurrency)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
