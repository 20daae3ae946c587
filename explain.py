"""Explain one image (image=PATH 'prompts=[a red circle, a blue square]') or a folder (images=DIR); see README."""

import os

import hydra
from omegaconf import DictConfig

os.environ.setdefault("MMEL_ROOT", os.path.dirname(os.path.abspath(__file__)))


@hydra.main(version_base="1.3", config_path="conf", config_name="explain")
def main(cfg: DictConfig) -> float | None:
    from mmel.explain_folder import run  # images=DIR: the folder mode; otherwise mmel.explain.run
    from mmel.utils.runs import optimized_value

    return optimized_value(run(cfg)[0], cfg.get("optimized_metric"))  # what a sweep optimises


if __name__ == "__main__":
    main()
