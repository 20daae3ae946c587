"""Shared fixtures: Hydra composition helpers and a tiny random CLIP (no downloads anywhere)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import mmel  # noqa: F401 - registers the project's config resolvers (${hsrm_default:...}), as every program does

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

os.environ.setdefault("MMEL_ROOT", str(ROOT))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def shapes_world(tmp_path_factory):
    """The one factory of test worlds: ``shapes_world(seed=..., **generate_kwargs)`` -> the root of a generated
    shapes world (mmel.data.shapes.generate). One world per distinct (seed, settings), made on first use and shared
    by every module that asks for the same one: treat it as read-only (a test that changes files copies it)."""
    from mmel.data.shapes import generate

    made: dict[tuple, Path] = {}

    def make(seed: int, **kwargs) -> Path:
        key = (seed, tuple(sorted(kwargs.items())))
        if key not in made:
            made[key] = generate(tmp_path_factory.mktemp(f"world-seed{seed}"), seed=seed, **kwargs)
        return made[key]

    return make


@pytest.fixture(scope="session")
def micro_clip():
    """A random-weight micro ViT CLIP (32 px, patch 8): fast, frozen, deterministic."""
    from mmel.backbone import load_clip

    torch.manual_seed(0)
    return load_clip("mmel-micro")


@pytest.fixture(autouse=True)
def _no_hydra_leaks():
    """Tests that compose configs set Hydra's global singletons; reset them so no test sees another's config."""
    yield
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None
