"""On a CUDA device every metric gives the CPU numbers (run with -m gpu on a machine with a GPU)."""

from __future__ import annotations

import pytest
import torch

from mmel.metrics import deletion_insertion, energy_pointing_game, pointing_game, saliency_iou

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_gpu_equals_cpu():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 7, 9, generator=g) ** 3
    boxes = [torch.tensor([[1.0 + i, 2.0, 20.0 + i, 15.0], [0.0, 0.0, 4.0, 4.0]]) for i in range(6)]
    sizes = torch.tensor([[24, 36]] * 6)
    images = torch.rand(6, 3, 16, 16, generator=g)
    cats = ["a", "b", "a", "c", "b", "a"]
    diff = torch.arange(6) % 2 == 0

    def score(x):
        return x[:, 0, :8, :8].mean((1, 2))

    def run(device):
        dev_boxes = [b.to(device) for b in boxes]
        out = {f"pg/{k}": v for k, v in pointing_game(maps.to(device), dev_boxes, sizes, cats, diff.to(device)).items()}
        out["epg"] = energy_pointing_game(maps.to(device), dev_boxes, sizes)
        out |= {f"iou/{k}": v for k, v in saliency_iou(maps.to(device), dev_boxes, sizes, rule="otsu").items()}
        di = deletion_insertion(maps.to(device), images.to(device), score, step=0.1, fill=("noise", "blur"))
        out |= {f"di/{k}": v for k, v in di.items()}
        return {k: v.cpu() for k, v in out.items()}

    cpu, gpu = run("cpu"), run("cuda")
    for k in cpu:
        torch.testing.assert_close(gpu[k], cpu[k], equal_nan=True, atol=1e-5, rtol=1e-5, msg=k)
