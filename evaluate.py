"""Score an explainer: python evaluate.py model=tiny data=shapes explainer=grad_eclip (see README)."""

import os

import hydra
from omegaconf import DictConfig

import mmel  # noqa: F401 - registers the config resolvers before Hydra composes (also for --cfg job --resolve)

os.environ.setdefault("MMEL_ROOT", os.path.dirname(os.path.abspath(__file__)))


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    from mmel.evaluate import run
    from mmel.utils.runs import optimized_value

    return optimized_value(run(cfg)[0], cfg.get("optimized_metric"))  # what a sweep optimises


if __name__ == "__main__":
    main()
