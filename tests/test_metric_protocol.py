"""Every metric follows the per-item protocol (mmel.metrics.protocol): it declares what it needs and outputs, its
per-item records replayed through ``update(records=...)`` give the state ``update`` on the maps gives, and its
declared outputs are exactly the keys ``compute()`` returns. The engine, the replay and the paper tables rely on
nothing else."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from mmel.evaluate import build_metrics
from mmel.metrics import ClipScorer
from mmel.metrics.protocol import CONTEXT, ItemContext, Output, output_of, outputs_of
from tests.conftest import CONF_DIR

PROMPTS = ["a red circle", "a blue square", "a green star"]


def _all_metrics(clip) -> dict:
    """Every metric of conf/metrics/default.yaml, each enabled (what a new metric's config entry joins)."""
    cfg = OmegaConf.load(CONF_DIR / "metrics" / "default.yaml")
    for node in cfg.values():
        if OmegaConf.is_dict(node) and "enabled" in node:
            node.enabled = True
    cfg.deletion_insertion.step = 0.25  # few forwards: this is about bookkeeping, not the curve
    return build_metrics(cfg, clip)


def _context(clip, n: int = 6, seed: int = 0) -> ItemContext:
    g = torch.Generator().manual_seed(seed)
    size = clip.image_size[0]
    maps = torch.rand(n, size // 4, size // 4, generator=g) ** 3
    xy = torch.rand(n, 2, generator=g) * size * 0.6
    boxes = [torch.cat([p, p + size / 3])[None] for p in xy]
    others_boxes = [torch.tensor([[0.0, 0.0, size / 4, size / 4]]) if k % 2 else torch.zeros(0, 4) for k in range(n)]
    steps = ["head", "block 0"]
    randomised = [[torch.rand(size, size, generator=g) for _ in range(n)] for _ in steps]
    absent = [(PROMPTS[2], torch.rand(size, size, generator=g), k % 3 == 0) for k in range(n)]
    return ItemContext(
        maps=torch.nn.functional.interpolate(maps[:, None], size=(size, size), mode="bilinear")[:, 0],
        ids=[f"s{k}" for k in range(n)],
        boxes=boxes,
        sizes=torch.tensor([[size, size]] * n),
        images=torch.randn(n, 3, size, size, generator=g),
        prompts=[PROMPTS[k % 2] for k in range(n)],
        categories=[PROMPTS[k % 2][2:] for k in range(n)],
        difficult=torch.tensor([k % 2 == 0 for k in range(n)]),
        scorer=ClipScorer(clip, PROMPTS),
        others=lambda: [
            (b, ["green star"] if len(b) else [], torch.cat([boxes[k], b])) for k, b in enumerate(others_boxes)
        ],  # fmt: skip
        absent=lambda seed: absent,
        randomised=lambda mode, seed: (steps, randomised),
    )


@pytest.fixture(scope="module")
def metrics_and_records(micro_clip):
    metrics = _all_metrics(micro_clip)
    ctx = _context(micro_clip)
    records = {name: m.item_values(ctx) for name, m in metrics.items()}
    return metrics, ctx, records


def test_every_metric_declares_needs_and_outputs(metrics_and_records):
    metrics, _, _ = metrics_and_records
    assert {
        "pointing_game",
        "energy_pointing_game",
        "saliency_iou",
        "deletion_insertion",
        "prompt_specificity",
        "prompt_randomisation",
        "model_randomisation",
    } <= set(metrics)  # and whatever is added: all checked
    for name, m in metrics.items():
        assert m.needs and m.needs <= CONTEXT, name
        assert all(isinstance(o, Output) for o in m.outputs), name
        with pytest.raises(ValueError, match="provides no"):  # a missing context entry is named, not a KeyError
            m.item_values(ItemContext(maps=torch.zeros(1, 4, 4)))


def test_records_are_json_and_replay_to_the_declared_outputs(metrics_and_records, micro_clip):
    """Records survive JSON (items.jsonl); replaying them into a fresh metric gives exactly the keys it declares,
    and every declared per-item field is the mean of the items' values (for outputs that are plain means)."""
    metrics, ctx, records = metrics_and_records
    fresh = _all_metrics(micro_clip)
    for name, m in fresh.items():
        recs = json.loads(json.dumps(records[name]))
        assert len(recs) == len(ctx)
        m.update(records=recs)
        out = m.compute()
        keys = set(out) if isinstance(out, dict) else {""}
        assert {o.name for o in m.outputs} == keys, name
        for o in m.outputs:
            vals = [v for v in (o.item_value(r) for r in recs) if v is not None]
            if o.field is not None and vals:
                got = out[o.name] if o.name else out
                assert float(got) == pytest.approx(float(torch.tensor(vals).double().nanmean()), abs=1e-5), (name, o)
        # what evaluate writes into metrics.json reads back as the same declarations
        for key, d in json.loads(json.dumps(outputs_of({name: m}, "test"))).items():
            assert output_of(d) in m.outputs and d["metric"] == name and key.startswith(f"test/{name}")


@pytest.mark.parametrize("name", ["pointing_game", "energy_pointing_game", "saliency_iou", "deletion_insertion"])
def test_replay_equals_update_on_the_maps(metrics_and_records, micro_clip, name):
    """update(records=item_values(ctx)) == update on the same maps (the direct torchmetrics form)."""
    _, ctx, records = metrics_and_records
    direct, replayed = _all_metrics(micro_clip)[name], _all_metrics(micro_clip)[name]
    if name == "pointing_game":
        direct.update(ctx.maps, ctx.boxes, ctx.sizes, ctx.categories, ctx.difficult)
    elif name == "deletion_insertion":
        targets = torch.tensor([ctx.scorer.index(p) for p in ctx.prompts])
        direct.update(ctx.maps, ctx.images, targets, ctx.scorer)
    else:
        direct.update(ctx.maps, ctx.boxes, ctx.sizes)
    replayed.update(records=records[name])
    a, b = direct.compute(), replayed.compute()
    for k in a if isinstance(a, dict) else [None]:
        x, y = (a[k], b[k]) if k is not None else (a, b)
        torch.testing.assert_close(y.float(), x.float(), atol=1e-6, rtol=0, equal_nan=True, msg=str(k))
    assert replayed._update_count == 1  # through torchmetrics' own update (no hand-set bookkeeping)
