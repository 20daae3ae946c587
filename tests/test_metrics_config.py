"""conf/metrics/*.yaml compose inside `evaluate`, and `evaluate.build_metrics` builds every metric from them."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class
from omegaconf import DictConfig, open_dict

from mmel.evaluate import build_metrics
from mmel.metrics import ClipScorer, DeletionInsertion, EnergyPointingGame, PointingGame, SaliencyIoU
from tests.conftest import CONF_DIR


def metrics_cfg(name: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[f"metrics={name}"])
    return cfg.metrics


@pytest.mark.parametrize("name", ["default", "grad_eclip_protocol"])
def test_metric_configs_build_every_metric(name, micro_clip):
    cfg = metrics_cfg(name)
    with open_dict(cfg):
        cfg.deletion_insertion.enabled = True
    built = build_metrics(cfg)
    types = {"pointing_game": PointingGame, "energy_pointing_game": EnergyPointingGame}
    types |= {"saliency_iou": SaliencyIoU, "deletion_insertion": DeletionInsertion}
    assert {k: type(built[k]) for k in types} == types
    for key, m in built.items():  # and any metric added since: the class its config entry names
        assert type(m) is get_class(cfg[key]._target_), key
    scorer = ClipScorer(micro_clip, ["a red circle", "a blue square"], kind=cfg.scorer)
    maps = torch.rand(2, 4, 4)
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 16.0]])] * 2
    for key, m in built.items():
        if key == "deletion_insertion":
            m.update(maps, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), scorer=scorer)
        else:
            m.update(maps, boxes, torch.tensor([[32, 32]] * 2))
        assert m.compute() is not None
    if name == "grad_eclip_protocol":
        fractions = built["deletion_insertion"].curves()["fractions"]
        assert fractions.tolist() == pytest.approx([0.05 * i for i in range(11)])
        assert cfg.scorer == "top1" and built["deletion_insertion"].options.fill == ("noise", "zeros")


def test_deletion_insertion_is_off_by_default():
    built = set(build_metrics(metrics_cfg("default")))
    assert "deletion_insertion" not in built  # (2 / step + 1) forwards per pair: on only when asked
    assert {"pointing_game", "energy_pointing_game", "saliency_iou", "saliency_ap"} <= built
