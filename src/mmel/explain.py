"""The `explain` program (filled in by its issue)."""

from omegaconf import DictConfig


def run(cfg: DictConfig) -> tuple[dict, dict]:
    raise NotImplementedError("explain: not built yet")
