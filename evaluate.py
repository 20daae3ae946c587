"""Score an explainer: python evaluate.py model=tiny data=shapes explainer=grad_eclip (see README)."""

import os

import hydra
from omegaconf import DictConfig

os.environ.setdefault("MMEL_ROOT", os.path.dirname(os.path.abspath(__file__)))


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    from mmel.evaluate import run

    metrics, _ = run(cfg)
    value = metrics.get(cfg.get("optimized_metric", ""))  # what a sweeper optimises
    return None if value is None else float(value)


if __name__ == "__main__":
    main()
