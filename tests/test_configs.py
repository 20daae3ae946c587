"""Every option of every config group composes, and every `_target_` in it instantiates."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from tests.conftest import CONF_DIR

PRIMARY = ["train", "evaluate", "explain"]
# groups that hold objects to build; real-weight models are built with pretrained=None (no downloads)
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in {"hydra", "local"})
# groups that are global overlays (`# @package _global_`), composed with `+group=option`
OVERLAYS = {"experiment", "hparams_search", "debug"}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_cfg(config_name: str, overrides: list[str], tmp_path: Path) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.paths.log_dir = str(tmp_path / "logs")
    HydraConfig.instance().set_config(cfg)
    return cfg


def resolve_all(cfg: DictConfig) -> dict:
    """Resolve every interpolation outside Hydra's own node (which needs a live job)."""
    return {
        k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig) else cfg[k]
        for k in cfg
        if k != "hydra"
    }


def test_every_group_has_options():
    for g in GROUPS:
        assert options(g), f"conf/{g}/ is empty"


@pytest.mark.parametrize("primary", PRIMARY)
def test_primary_configs_compose_and_resolve(primary, tmp_path):
    over = ["image=x.png", "prompts=[a]"] if primary == "explain" else []
    cfg = compose_cfg(primary, over, tmp_path)
    container = resolve_all(cfg)
    assert container["task_name"] == primary
    assert "model" in container and container["model"]["_target_"] == "mmel.backbone.load_clip"


def _cases():
    for primary in PRIMARY:
        root = OmegaConf.load(CONF_DIR / f"{primary}.yaml")
        groups = set()
        for d in root.defaults:
            if isinstance(d, str):
                continue
            for k in d:
                groups.add(k.replace("optional ", ""))
        for g in sorted(groups & set(GROUPS)):
            for opt in options(g):
                yield primary, g, opt


@pytest.mark.parametrize(("primary", "group", "option"), list(_cases()))
def test_every_option_composes_and_instantiates(primary, group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if primary == "explain":
        overrides += ["image=x.png", "prompts=[a]"]
    if group == "hparams_search":
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_cfg(primary, overrides, tmp_path)
    resolve_all(cfg)  # every interpolation resolves
    node = cfg if group in OVERLAYS else cfg.get(group)
    if group == "trainer" and node.get("accelerator") == "gpu":
        import torch

        if not torch.cuda.is_available():
            pytest.skip("trainer=gpu composes (checked above); instantiating it needs a CUDA device")
    if group == "model" and str(cfg.model.name).startswith("hf:"):
        # a Hugging Face model brings its weights: with none here (an empty HF_HOME, offline) the load fails clearly
        import os
        from unittest import mock

        from hydra.errors import InstantiationException

        env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
        with mock.patch.dict(os.environ, env), pytest.raises(InstantiationException, match="Could not obtain the Hug"):
            instantiate(cfg.model)
        return
    if group == "model":
        with open_dict(cfg):
            cfg.model.pretrained = None  # real weights are not downloadable in tests
        import open_clip

        hub = ((open_clip.get_model_config(str(cfg.model.name)) or {}).get("text_cfg") or {}).get("hf_tokenizer_name")
        if hub:  # a tokenizer on the Hugging Face hub (SigLIP, EVA, PE): loads from the cache, else the clear error
            from unittest import mock

            import huggingface_hub.constants
            from hydra.errors import InstantiationException

            # offline here: the hub's offline switch answers at once (an unreachable hub takes ~45 s to say so; the
            # environment variable is read when huggingface_hub is imported, so the constant is what counts)
            try:
                with mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True):
                    clip = instantiate(cfg.model)
            except InstantiationException as e:
                assert "is read from the Hugging Face hub and is not in the local cache" in str(e), e
                return
        else:
            clip = instantiate(cfg.model)
        assert not any(p.requires_grad for p in clip.model.parameters())
        assert not clip.model.training
        return
    _instantiate_targets(node, group)


def _instantiate_targets(node, where: str) -> None:
    """Instantiate each `_target_` found in node (recursively); fail loudly naming the config path."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            if str(node._target_).startswith("hydra_plugins") or node._target_ == "mmel.backbone.load_clip":
                return
            if "enabled" in node:  # a program-level switch (see mmel.evaluate.build_metrics), not a kwarg
                node = OmegaConf.create({k: v for k, v in node.items() if k != "enabled"})
            try:
                obj = instantiate(node)
            except Exception as e:  # pragma: no cover - the message is the point
                raise AssertionError(f"{where}: cannot instantiate {node._target_}: {e}") from e
            assert obj is not None
            return
        for k, v in node.items():
            if k != "hydra":
                _instantiate_targets(v, f"{where}.{k}")


def test_train_composes_no_explainer_and_refuses_one_given(tmp_path):
    """Training reads native Grad-ECLIP evidence only: `explainer=...` does not compose, and `+explainer=...` (which
    would be silently ignored) is refused with a message that says so."""
    from hydra.errors import ConfigCompositionException

    from mmel.train import run

    assert "explainer" not in compose_cfg("train", [], tmp_path)
    with pytest.raises(ConfigCompositionException):
        compose_cfg("train", ["explainer=legrad"], tmp_path)
    with pytest.raises(ValueError, match="no effect here"):
        run(compose_cfg("train", ["+explainer=legrad"], tmp_path))


def test_hsrm_defaults_resolve_in_place_as_the_cli_resolves(tmp_path):
    """`python train.py --cfg job --resolve` resolves the config in place: list-valued defaults must survive it."""
    cfg = compose_cfg("train", [], tmp_path)
    hsrm = OmegaConf.create(OmegaConf.to_container(cfg.hsrm))
    OmegaConf.resolve(hsrm)
    assert list(hsrm.scales) == [1, 2, 4] and hsrm.layers == 6
