"""conf/metrics/*.yaml compose inside `evaluate` and every block builds its metric as plain keyword arguments."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from tests.conftest import CONF_DIR

from mmel.metrics import ClipScorer, DeletionInsertion, EnergyPointingGame, PointingGame, SaliencyIoU


def metrics_cfg(name: str) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[f"metrics={name}"])
    return OmegaConf.to_container(cfg.metrics, resolve=True)


@pytest.mark.parametrize("name", ["default", "grad_eclip_protocol"])
def test_metric_configs_build_every_metric(name, micro_clip):
    m = metrics_cfg(name)
    pg = PointingGame(**m["pointing_game"])
    EnergyPointingGame(**m["energy_pointing_game"])
    iou = SaliencyIoU(**m["saliency_iou"])
    scorer = ClipScorer(micro_clip, ["a red circle", "a blue square"], **m["scorer"])
    di = DeletionInsertion(scorer, pixel_mean=micro_clip.mean, pixel_std=micro_clip.std, **m["deletion_insertion"])
    maps = torch.rand(2, 4, 4)
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 16.0]])] * 2
    pg.update(maps, boxes, torch.tensor([[32, 32]] * 2))
    iou.update(maps, boxes, torch.tensor([[32, 32]] * 2))
    di.update(maps, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert set(di.compute()) == {"deletion_auc", "insertion_auc"}
    if name == "grad_eclip_protocol":
        assert m["deletion_insertion_enabled"] and di.curves()["fractions"].tolist() == pytest.approx(
            [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5]
        )
        assert m["scorer"]["kind"] == "top1" and m["pointing_game"]["tolerance"] == 15
