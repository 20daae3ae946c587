"""The programs' one wrapper (mmel.utils.task): run dir, seeds, and the wandb run finished whatever happens."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from omegaconf import OmegaConf

from mmel.utils import task as task_mod


def _cfg(tmp_path, **extra):
    return OmegaConf.create({"seed": 7, "paths": {"output_dir": str(tmp_path / "run")}, **extra})


def test_body_gets_the_run_dir_and_seeded_generators(tmp_path):
    @task_mod.task("demo")
    def run(cfg, out):
        return out, torch.rand(3), random.random()

    a, b = run(_cfg(tmp_path)), run(_cfg(tmp_path))
    assert a[0] == tmp_path / "run"
    assert torch.equal(a[1], b[1]) and a[2] == b[2]  # same seed, same draws
    assert run(_cfg(tmp_path, resume=str(tmp_path / "old")))[0] == tmp_path / "old"  # resume: that run's dir


def test_failure_is_logged_with_its_run_dir_and_wandb_is_finished(tmp_path, monkeypatch, caplog):
    finished = []
    monkeypatch.setattr(task_mod, "finish_wandb", lambda: finished.append(True))

    @task_mod.task("demo")
    def run(cfg, out):
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="mmel.utils.task"), pytest.raises(RuntimeError, match="boom"):
        run(_cfg(tmp_path))
    assert finished == [True] and str(tmp_path / "run") in caplog.text
