"""The runs of a paper spec: each ``train`` / ``evaluate`` run composed from ``conf/``, made in its own folder and
reused when its program and overrides are unchanged (never overwritten when they are not)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from mmel.locations import config_dir, work_root

log = logging.getLogger(__name__)
# where results/, data/ and .cache/ go: $MMEL_ROOT, else the current directory (`make demo` runs in the checkout);
# never this file's folder, which is site-packages/mmel/experiments when installed
ROOT = work_root()
RUN_RECORD = "paper_run.json"


# -------------------------------------------------------------------------------------------------- runs
def config_hash(cfg: DictConfig) -> str:
    """A short hash of the resolved config (what the report cites next to each command)."""
    resolved = {
        k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig) else cfg[k]
        for k in cfg
        if k not in ("hydra", "paths")  # where a run writes does not change its numbers
    }
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:12]


def compose_run(program: str, overrides: Sequence[str], out: Path) -> DictConfig:
    """Compose ``conf/<program>.yaml`` with ``overrides`` and its run dir at ``out``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(program, overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(out)
        cfg.paths.log_dir = str(out.parent)
    return cfg


@dataclass
class Run:
    """A finished run: where it is, how it was made, what it measured."""

    program: str
    overrides: list[str]
    out: Path
    metrics: dict[str, Any]
    config_hash: str

    @property
    def command(self) -> str:
        return f"python {self.program}.py " + " ".join(self.overrides)

    def items(self) -> list[dict[str, Any]]:
        """Scored per-item records (skipped items left out), in dataset order."""
        path = self.out / "items.jsonl"
        if not path.is_file():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in rows if "skip" not in r]


def run_program(program: str, overrides: Sequence[str], out: Path, runner: Callable | None = None) -> Run:
    """Make (or reuse) one run of ``train`` / ``evaluate`` in ``out``.

    A folder holding a finished run with the same program and overrides is reused; one with other overrides is an
    error (never overwritten: delete it yourself). ``runner`` replaces ``mmel.<program>.run`` (tests)."""
    overrides = [str(o) for o in overrides]
    record_path = out / RUN_RECORD
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["program"] != program or record["overrides"] != overrides:
            raise ValueError(
                f"{out} holds a run of `{record['program']} {' '.join(record['overrides'])}`, not "
                f"`{program} {' '.join(overrides)}`: remove it (or change results dir) to remake it"
            )
        if (out / "metrics.json").is_file() and record.get("finished"):
            metrics = json.loads((out / "metrics.json").read_text())
            return Run(program, overrides, out, metrics, record["config_hash"])
    cfg = compose_run(program, overrides, out)
    if program == "evaluate" and (out / "run.json").is_file():
        with open_dict(cfg):
            cfg.resume = str(out)  # an interrupted evaluation continues where it stopped
    out.mkdir(parents=True, exist_ok=True)
    chash = config_hash(cfg)
    record = {"program": program, "overrides": overrides, "config_hash": chash, "finished": False}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=False))
    if runner is None:
        import importlib

        runner = importlib.import_module(f"mmel.{program}").run
    log.info("paper: %s %s -> %s", program, " ".join(overrides), out)
    metrics = runner(cfg)[0]
    record["finished"] = True
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    saved = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else metrics
    return Run(program, overrides, out, saved, chash)
