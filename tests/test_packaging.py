"""mmel as an installed tool: console scripts in the metadata, configs found in the package, user configs first.

These need mmel installed (``make install``: editable); ``make wheel-check`` does the same from a built wheel.
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata, resources
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from mmel.cli import PROGRAMS, program
from mmel.locations import CONFIG_PACKAGE, CONFIG_SEARCH_PATH
from tests.conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = {"mmel-train", "mmel-evaluate", "mmel-explain", "mmel-paper", "mmel-app"}


def test_console_scripts_are_declared_installed_and_callable():
    declared = PYPROJECT["project"]["scripts"]
    assert set(declared) == SCRIPTS
    installed = {ep.name: ep for ep in metadata.distribution("mmel").entry_points if ep.group == "console_scripts"}
    # a stale install (pyproject changed since) would show here: `make install` reinstalls on a pyproject change
    assert {name: ep.value for name, ep in installed.items()} == declared
    for name, ep in installed.items():
        assert callable(ep.load()), f"{name} -> {ep.value} is not callable"


def test_the_package_list_names_every_package_under_src():
    # pyproject lists packages by hand (package-dir maps conf/ and experiments/ into mmel): a new subpackage of
    # src/mmel/ missing from the list would be missing from the wheel
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])

    def packages(folder: Path, prefix: str) -> set[str]:
        return {".".join([prefix, *f.parent.relative_to(folder).parts]) for f in folder.rglob("__init__.py")}

    on_disk = packages(ROOT / "src" / "mmel", "mmel") | packages(ROOT / "experiments", "mmel.experiments")
    assert listed == on_disk | {"mmel.conf"}


def test_the_packaged_configs_are_the_repository_conf_folder():
    packaged = Path(str(resources.files(CONFIG_PACKAGE)))
    assert (packaged / "train.yaml").is_file() and (packaged / "model" / "tiny.yaml").is_file()
    import mmel.experiments.paper as paper  # the paper runner installed under mmel, its specs beside it

    assert (Path(paper.__file__).parent / "shapes.yaml").is_file()


@pytest.mark.parametrize("name", PROGRAMS)
def test_every_primary_config_composes_from_the_package_search_path(name):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
        cfg = compose(name, return_hydra_config=True)
    assert cfg.task_name == name and cfg.model.name == "mmel-tiny"
    sources = {(s.provider, s.schema, s.path) for s in cfg.hydra.runtime.config_sources}
    assert ("main", "pkg", CONFIG_PACKAGE) in sources  # found in the package ...
    assert not any(schema == "file" for _, schema, _ in sources), sources  # ... not through a folder on disk


def _printed_job(capsys, monkeypatch, prog: str, *args: str) -> dict:
    """Run ``mmel-<prog> ARGS --cfg job`` in process (Hydra prints the composed config and runs nothing)."""
    monkeypatch.setattr(sys, "argv", [f"mmel-{prog}", *args, "--cfg", "job"])
    program(prog, CONFIG_SEARCH_PATH)()
    return yaml.safe_load(capsys.readouterr().out)


def test_a_user_config_dir_overrides_the_packaged_configs(tmp_path, capsys, monkeypatch):
    # Hydra searches --config-dir / hydra.searchpath after the package: a user's folder adds options and primary
    # configs that override the packaged ones (docs/contracts.md, "Configs")
    user = tmp_path / "myconf"
    (user / "model").mkdir(parents=True)
    packaged = yaml.safe_load((Path(str(resources.files(CONFIG_PACKAGE))) / "model" / "tiny.yaml").read_text())
    (user / "model" / "mine.yaml").write_text(yaml.safe_dump({**packaged, "device": "cuda:7"}))
    (user / "my_eval.yaml").write_text("defaults:\n  - evaluate\n  - override model: mine\n  - _self_\n\nlimit: 8\n")

    plain = _printed_job(capsys, monkeypatch, "evaluate")
    assert (
        plain["model"]["device"] is None and plain["limit"] is None
    )  # the packaged evaluate.yaml, model/tiny (the trainer places)
    cfg = _printed_job(capsys, monkeypatch, "evaluate", "--config-dir", str(user), "model=mine")
    assert cfg["model"]["device"] == "cuda:7" and cfg["model"]["name"] == packaged["name"]
    cfg = _printed_job(capsys, monkeypatch, "evaluate", f"hydra.searchpath=[file://{user}]", "model=mine")
    assert cfg["model"]["device"] == "cuda:7"
    # a primary config of the user's extends the packaged one and overrides its defaults and values
    cfg = _printed_job(capsys, monkeypatch, "evaluate", "--config-dir", str(user), "--config-name", "my_eval")
    assert cfg["model"]["device"] == "cuda:7" and cfg["limit"] == 8 and cfg["task_name"] == "evaluate"


def test_runs_write_under_mmel_root_or_the_current_directory_and_configs_come_from_the_checkout(tmp_path, monkeypatch):
    from mmel.locations import checkout_root, config_dir, work_root

    assert checkout_root() == ROOT and config_dir() == ROOT / "conf"  # a clone reads its own conf/
    monkeypatch.delenv("MMEL_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert work_root() == tmp_path
    monkeypatch.setenv("MMEL_ROOT", str(tmp_path / "elsewhere"))
    assert work_root() == tmp_path / "elsewhere"
