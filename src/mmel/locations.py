"""Where mmel finds its Hydra configs and where a run may write (never into the installed package).

The configs are the repository's ``conf/`` folder, shipped in the wheel as the package ``mmel.conf`` (pyproject's
``package-dir`` maps the one onto the other without moving it), so Hydra finds them at ``pkg://mmel.conf`` both in
a clone (editable install) and from a wheel. Outputs, the shapes world and caches go under :func:`work_root`:
``$MMEL_ROOT`` (the repository shims set it to the checkout) or else the current working directory.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

CONFIG_PACKAGE = "mmel.conf"
CONFIG_SEARCH_PATH = f"pkg://{CONFIG_PACKAGE}"


def checkout_root() -> Path | None:
    """The source checkout this ``mmel`` is imported from (a clone or an editable install), None for a wheel.

    A checkout is recognised by its ``pyproject.toml`` and ``conf/`` next to ``src/``; a wheel's site-packages has
    neither, so nothing is ever written there by mistake."""
    root = Path(__file__).resolve().parents[2]  # <root>/src/mmel/locations.py
    return root if (root / "pyproject.toml").is_file() and (root / "conf").is_dir() else None


def work_root() -> Path:
    """Where runs write ``logs/``, ``data/``, ``results/`` and ``.cache/``: ``$MMEL_ROOT``, else the current directory
    (as ``conf/paths/default.yaml`` does for the Hydra programs)."""
    return Path(os.environ.get("MMEL_ROOT") or Path.cwd()).expanduser()


def config_dir() -> Path:
    """The Hydra config folder as a path (for ``initialize_config_dir`` and plain YAML reads).

    From a checkout its own ``conf/`` (so a clone imported via ``PYTHONPATH=src`` never reads another install's
    configs); otherwise the installed package ``mmel.conf``."""
    root = checkout_root()
    if root is not None:
        return root / "conf"
    try:
        path = Path(str(resources.files(CONFIG_PACKAGE)))
    except ModuleNotFoundError as e:
        raise FileNotFoundError(
            f"mmel's configs (package {CONFIG_PACKAGE}) are not installed with mmel at {Path(__file__).parent}: "
            "reinstall mmel (pip install mmel, or `make install` in a clone)"
        ) from e
    if not (path / "train.yaml").is_file():
        raise FileNotFoundError(f"{path}: expected mmel's Hydra configs (train.yaml, ...) in package {CONFIG_PACKAGE}")
    return path
