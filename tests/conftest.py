"""Shared fixtures: Hydra composition helpers and a tiny random CLIP (no downloads anywhere)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

os.environ.setdefault("MMEL_ROOT", str(ROOT))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def micro_clip():
    """A random-weight micro ViT CLIP (32 px, patch 8): fast, frozen, deterministic."""
    from mmel.backbone import load_clip

    torch.manual_seed(0)
    return load_clip("mmel-micro")
