"""The Hydra programs as console scripts: ``mmel-train``, ``mmel-evaluate``, ``mmel-explain`` (pyproject.toml).

Each composes ``<program>.yaml`` from the configs shipped in the package (``pkg://mmel.conf``), calls
``mmel.<program>.run(cfg)`` and returns what a sweep optimises. The repository's ``train.py`` / ``evaluate.py`` /
``explain.py`` are the same entry code pointed at the checkout's own ``conf/`` (:func:`program` with
``config_path``). A user's config folder joins with ``--config-dir DIR`` or ``hydra.searchpath=[file://DIR]``; Hydra
searches it after the package, so it adds options (``model=mine``) and primary configs (``--config-name my_eval``
extending ``evaluate``) rather than shadowing packaged files (docs/contracts.md, "Configs").
``mmel-paper`` and ``mmel-app`` point straight at ``mmel.experiments.paper.__main__`` and ``mmel.app.__main__``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from mmel.locations import CONFIG_SEARCH_PATH

PROGRAMS = ("train", "evaluate", "explain")
# the module whose run(cfg) each program calls (explain: the folder mode dispatches one image to mmel.explain)
RUNS = {"train": "mmel.train", "evaluate": "mmel.evaluate", "explain": "mmel.explain_folder"}


def program(name: str, config_path: str = CONFIG_SEARCH_PATH) -> Callable[[], float | None]:
    """The Hydra main of ``mmel.<name>``: parses the command line, composes ``<name>.yaml`` found at ``config_path``
    (``pkg://...`` or an absolute folder), runs, and returns the sweep's optimised value."""
    if name not in PROGRAMS:
        raise ValueError(f"unknown program {name!r}; expected one of {PROGRAMS}")

    @hydra.main(version_base="1.3", config_path=config_path, config_name=name)
    def main(cfg: DictConfig) -> float | None:
        from mmel.utils.runs import optimized_value  # imported at run time: `--help` stays fast

        run = importlib.import_module(RUNS[name]).run
        return optimized_value(run(cfg)[0], cfg.get("optimized_metric"))  # what a sweep optimises

    return main


def train() -> None:
    """``mmel-train``: learn the HSRM against a frozen CLIP (``conf/train.yaml``)."""
    program("train")()  # from the command line Hydra returns nothing (the exit status is 0)


def evaluate() -> None:
    """``mmel-evaluate``: score one explainer on a dataset split (``conf/evaluate.yaml``)."""
    program("evaluate")()


def explain() -> None:
    """``mmel-explain image=PATH 'prompts=[...]'``: overlay PNGs for one image (``conf/explain.yaml``)."""
    program("explain")()
