"""Which file paths typed into the explorer's page the server may open.

The page has two path boxes: "Weights file" (read by :func:`mmel.backbone.load_clip`, which runs ``torch.jit.load``
on TorchScript archives) and "HSRM checkpoints" (``mmel @ <path>`` explainer choices, read by ``torch.load``). On
localhost the visitor is the machine's user, so any path is taken, as before. Served beyond localhost (``--host``
not a loopback address, or ``--share``) a visitor could make the server open any file on the machine, so paths are
confined to what was named at start-up:

* checkpoints: the files given by ``--checkpoint`` and those found under ``--logs`` (the ones the page offers), and
  any file under ``--weights-dir``;
* weights: files under ``--weights-dir`` (a relative name is taken inside it); without ``--weights-dir`` none.

Paths are compared after :meth:`pathlib.Path.resolve`, so ``..`` and symbolic links cannot lead outside; the
resolved path is what gets opened. Anything else is refused with a message in the page (:class:`InputError`).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mmel.app.inputs import InputError

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_exposed(host: str, share: bool = False) -> bool:
    """Whether a server bound to ``host`` (with a share link when ``share``) is reachable from other machines: every
    address but a loopback one (``127.0.0.0/8``, ``::1``, ``localhost``) is, and so is any share link."""
    if share:
        return True
    name = (host or "").strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return False
    try:
        return not ipaddress.ip_address(name).is_loopback
    except ValueError:
        return True  # another host name: it may resolve to any interface, so treat it as public


def _resolve(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


@dataclass(frozen=True)
class PathPolicy:
    """What the page's path boxes may name (see the module docstring). ``exposed=False``: anything, unchanged."""

    exposed: bool = False
    checkpoints: frozenset[Path] = field(default_factory=frozenset)
    weights_dir: Path | None = None

    @classmethod
    def for_server(
        cls,
        host: str,
        share: bool,
        checkpoints: Iterable[str | os.PathLike] = (),
        weights_dir: str | os.PathLike | None = None,
    ) -> PathPolicy:
        """The policy of a server bound to ``host`` / ``share``, allowing the start-up ``checkpoints`` and the files
        under ``weights_dir`` (resolved now; a missing folder is an error, so a typo is not a silent lock-out)."""
        wdir = None
        if weights_dir is not None:
            wdir = _resolve(weights_dir)
            if not wdir.is_dir():
                raise NotADirectoryError(f"--weights-dir {weights_dir}: no such folder (give the folder of the weight "
                                         "files the page may load)")  # fmt: skip
        return cls(is_exposed(host, share), frozenset(_resolve(p) for p in checkpoints), wdir)

    def _inside_weights_dir(self, p: Path) -> bool:
        return self.weights_dir is not None and p.is_relative_to(self.weights_dir)

    def weights(self, value: str | None) -> str | None:
        """The weights box's value as the path to open (None when empty); refused when exposed and not a file under
        ``--weights-dir``."""
        value = (value or "").strip() or None
        if value is None or not self.exposed:
            return value
        if self.weights_dir is None:
            raise InputError(
                "Weights file: this server is reachable from other machines, and its owner named no weights folder, "
                "so it loads no weights files; use the configured backbones (or start it with --weights-dir DIR)."
            )
        p = (self.weights_dir / Path(value).expanduser()).resolve()  # an absolute value replaces the folder
        if not self._inside_weights_dir(p) or not p.is_file():
            raise InputError(
                f"Weights file: '{value}' is not a file in this server's weights folder; give the name of one of "
                f"the files in {self.weights_dir}."
            )
        return str(p)

    def checkpoint(self, value: str | None) -> str | None:
        """An HSRM checkpoint path as the path to open; refused when exposed and neither offered at start-up nor a
        file under ``--weights-dir``."""
        if value is None or not self.exposed:
            return value
        p = _resolve(value)
        if p in self.checkpoints or (self._inside_weights_dir(p) and p.is_file()):
            return str(p)
        raise InputError(
            f"Checkpoint: '{value}' is not one of the checkpoints this server offers; it is reachable from other "
            "machines, so it opens only the checkpoints listed under Explainers"
            + (f" and the files in {self.weights_dir}." if self.weights_dir else ".")
        )
