"""The `evaluate` program (filled in by its issue)."""

from omegaconf import DictConfig


def run(cfg: DictConfig) -> tuple[dict, dict]:
    raise NotImplementedError("evaluate: not built yet")
