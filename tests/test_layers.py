"""The package's import layers (docs/architecture.md) hold, and the contract really catches an upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[dev]')")


def _lint(cwd: Path, src: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}  # this tree's mmel first, whatever is installed
    return subprocess.run(
        [str(LINT), "--config", str(cwd / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_layers_contract_is_kept():
    res = _lint(ROOT, ROOT / "src")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 kept, 0 broken" in res.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """A copy of the package where the explainers import the HSRM (a layer above them) fails the lint."""
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    base = tmp_path / "src" / "mmel" / "explainers" / "base.py"
    base.write_text(base.read_text() + "\nfrom mmel.hsrm import HSRM  # noqa: E402, F401 - deliberately upward\n")
    res = _lint(tmp_path, tmp_path / "src")
    assert res.returncode != 0, res.stdout
    assert "BROKEN" in res.stdout and "mmel.explainers.base -> mmel.hsrm" in res.stdout, res.stdout
