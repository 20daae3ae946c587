"""Explain one image: python explain.py image=PATH 'prompts=[a red circle, a blue square]' (see README)."""

import os

import hydra
from omegaconf import DictConfig

os.environ.setdefault("MMEL_ROOT", os.path.dirname(os.path.abspath(__file__)))


@hydra.main(version_base="1.3", config_path="conf", config_name="explain")
def main(cfg: DictConfig) -> float | None:
    from mmel.explain import run

    metrics, key = run(cfg)[0], cfg.get("optimized_metric")  # a sweep optimises metrics[key]
    return float(metrics[key]) if key in metrics else None


if __name__ == "__main__":
    main()
