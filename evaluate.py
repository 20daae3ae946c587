"""Score an explainer: python evaluate.py model=tiny data=shapes explainer=grad_eclip (see README)."""

import os

import hydra
from omegaconf import DictConfig

os.environ.setdefault("MMEL_ROOT", os.path.dirname(os.path.abspath(__file__)))


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    from mmel.evaluate import run

    metrics, key = run(cfg)[0], cfg.get("optimized_metric")  # a sweep optimises metrics[key]
    return float(metrics[key]) if key in metrics else None


if __name__ == "__main__":
    main()
