"""The `train` program (filled in by its issue)."""

from omegaconf import DictConfig


def run(cfg: DictConfig) -> tuple[dict, dict]:
    raise NotImplementedError("train: not built yet")
