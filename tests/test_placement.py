"""One owner of placement: the trainer. The frozen CLIP (kept out of the HSRM module's sub-modules and checkpoints),
the HSRM, its metrics and the feature-cache build all go where the trainer puts the run.

No GPU is needed: the trainer's device is simulated with the ``meta`` device (shapes without storage), which is as
foreign to the CPU-loaded CLIP as a GPU would be. What is checked is where the placement code puts things.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from mmel.backbone import load_clip
from tests.conftest import CONF_DIR

META = torch.device("meta")


class _Stop(Exception):
    """Raised by the spy once it has seen where the first cache batch is computed."""


def fake_trainer(device: torch.device) -> SimpleNamespace:
    """What the placement code may read of a Lightning trainer: its strategy's root device, rank and world size."""
    strategy = SimpleNamespace(root_device=device, barrier=lambda *a, **k: None)
    return SimpleNamespace(strategy=strategy, world_size=1, global_rank=0, local_rank=0, current_epoch=0)


@pytest.fixture
def clip():
    torch.manual_seed(0)
    return load_clip("mmel-micro")  # fresh per test: the meta move destroys its weights


def train_cfg(world, out, overrides=()):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        data = [f"data.root={world}", "data.seed=5", "++data.generate_kwargs={n_train:8,n_val:4,n_test:4}"]
        cfg = compose("train", overrides=["model=micro", *data, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.feature_cache.dir = str(out / "fc")
    return cfg


def test_moving_the_hsrm_module_moves_the_frozen_clip_and_the_metrics(clip):
    """Lightning places a LightningModule with ``module.to(strategy.root_device)``: the CLIP must follow."""
    from mmel.lit_module import HSRMLitModule

    module = HSRMLitModule(clip, layers=2, scales=(1,))
    module.to(META)
    assert next(module.hsrm.parameters()).device == META
    assert module.clip.device == META, "the frozen CLIP stayed behind when the module moved"
    states = [t for m in module.metrics.modules() for t in m.buffers()] + [
        getattr(m, s) for m in module.metrics.modules() for s in getattr(m, "_defaults", {})
    ]
    assert all(t.device == META for t in states if isinstance(t, torch.Tensor))


def test_the_cache_build_runs_on_the_trainers_device(clip, shapes_world, tmp_path):
    """Lightning calls the data module's ``setup`` (where the feature cache is built) before it moves the model:
    the build itself must put CLIP on the trainer's device first (under DDP: each rank's own)."""
    from hydra.utils import instantiate

    from mmel.train import cached_features
    from mmel.utils.runs import build_datamodule

    world = shapes_world(seed=5, n_train=8, n_val=4, n_test=4)
    cfg = train_cfg(world, tmp_path)
    base = build_datamodule(cfg, clip)
    module = instantiate(cfg.hsrm)(clip=clip)
    dm = cached_features(cfg, clip, base, module)
    seen = []

    def spy(images, prompts, **kw):
        seen.append(clip.device)
        raise _Stop

    dm.evidence_fn = spy
    dm.trainer = fake_trainer(META)
    with pytest.raises(_Stop):
        dm.setup("fit")
    assert seen == [META], f"the feature cache was computed with CLIP on {seen[0]}, not on the trainer's device"


def test_a_model_device_that_disagrees_with_the_trainer_is_an_error_naming_what_to_set(shapes_world, tmp_path):
    from mmel.train import run

    world = shapes_world(seed=5, n_train=8, n_val=4, n_test=4)
    cfg = train_cfg(world, tmp_path, ["trainer=gpu", "model.device=cpu"])
    with pytest.raises(ValueError, match=r"model.device=cpu disagrees with trainer.accelerator=gpu.*model.device=null"):
        run(cfg)
    cfg = train_cfg(world, tmp_path, ["trainer=cpu", "model.device=cuda"])
    with pytest.raises(ValueError, match=r"model.device=cuda .*trainer=gpu"):
        run(cfg)
    # the shipped model configs leave the device to the trainer
    for name in ("tiny", "micro", "vitb16", "vitb32", "vitl14"):
        assert train_cfg(world, tmp_path, [f"model={name}"]).model.device is None


def test_precision_names_and_cpu_autocast():
    from mmel.utils.placement import autocast, autocast_dtype, precision_key

    assert precision_key("32-true") is precision_key("fp32") is precision_key(None) is None  # float32 keys unchanged
    assert precision_key("bf16-mixed") == "bf16-mixed" and precision_key("bf16-true") == "bf16-true"
    assert autocast_dtype("32-true") is None and autocast_dtype("fp32") is None
    assert autocast_dtype("bf16-mixed") == autocast_dtype("bf16") == torch.bfloat16
    assert autocast_dtype("16-mixed") == torch.float16
    with pytest.raises(ValueError, match="precision='bf32'"):
        autocast_dtype("bf32")
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast("cpu", "bf16-mixed"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("cpu", "32-true"):
        assert (a @ b).dtype == torch.float32
    with pytest.raises(ValueError, match="needs a GPU"), autocast("cpu", "16-mixed"):
        pass


def _pearson(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    x, y = torch.cat(a).flatten(1).double(), torch.cat(b).flatten(1).double()
    x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    return (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1)).clamp_min(1e-12)


SLOW_EXPLAINERS = ("rise", "m2ib")  # thousands of forwards / an optimisation per map: the slow test below


def _bf16_agrees(clip, name: str) -> None:
    from mmel.explainers import build_explainer
    from mmel.utils.placement import autocast

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = [["a red circle", "a cat"], ["a dog"], ["a car", "a boat", "a sun"]]
    e = build_explainer(name, clip)
    fp32 = e.explain_batch(images, prompts)
    with autocast("cpu", "bf16-mixed"):
        bf16 = e.explain_batch(images, prompts)
    assert not torch.equal(torch.cat(fp32), torch.cat(bf16)), f"{name}: bf16 autocast did not reach the explainer"
    assert _pearson(fp32, bf16).min() > 0.995, name


def test_explainers_run_under_cpu_bf16_autocast_and_agree_with_fp32(micro_clip):
    """The precision switch reaches the explainers (the maps change) and the maths allows it (they agree)."""
    from mmel.explainers import available

    for name in available():
        if name not in SLOW_EXPLAINERS:
            _bf16_agrees(micro_clip, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_EXPLAINERS)
def test_sampling_explainers_under_cpu_bf16_autocast(micro_clip, name):
    _bf16_agrees(micro_clip, name)


@pytest.mark.slow
def test_programs_honour_the_trainers_precision(shapes_world, tmp_path):
    """train (cache build and steps) and evaluate run under trainer.precision=bf16-mixed on the CPU; the mixed-
    precision cache is its own cache and the evaluate fingerprint records the precision."""
    import json

    from mmel.evaluate import run as evaluate
    from mmel.train import run as train

    world = shapes_world(seed=5, n_train=8, n_val=4, n_test=4)
    common = ["trainer.max_epochs=1", "data.batch_size=4", "callbacks=none", "logger=csv"]
    res32, _ = train(train_cfg(world, tmp_path / "t32", [*common, "test=false"]))
    res16, _ = train(train_cfg(world, tmp_path / "t16", [*common, "test=false", "trainer.precision=bf16-mixed"]))
    keys = [json.loads(p.read_text())["key"] for p in (tmp_path / "t16" / "fc").rglob("cache.json")]
    assert keys and all(k.get("precision") == "bf16-mixed" for k in keys)
    assert all(
        "precision" not in json.loads(p.read_text())["key"] for p in (tmp_path / "t32" / "fc").rglob("cache.json")
    )
    assert 0 <= float(res16["val/pointing_game"]) <= 1 and 0 <= float(res32["val/pointing_game"]) <= 1

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        data = [f"data.root={world}", "data.seed=5", "++data.generate_kwargs={n_train:8,n_val:4,n_test:4}"]
        cfg = compose("evaluate", overrides=["model=micro", *data, "trainer.precision=bf16-mixed", "figure_samples=0"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "e16")
    res, _ = evaluate(cfg)
    assert res["test/samples"] > 0
    assert json.loads((tmp_path / "e16" / "run.json").read_text())["fingerprint"]["precision"] == "bf16-mixed"


def test_evaluates_module_moves_the_explainers_models_and_the_metrics(clip, tmp_path):
    """evaluate's Lightning module: the explainer's CLIP (and e.g. the MMEL explainer's HSRM) and the metrics go
    where the trainer puts the module."""
    from mmel.evaluation.engine import EvalModule
    from mmel.explainers import build_explainer
    from mmel.metrics import PointingGame

    explainer = build_explainer("mmel", clip, layers=2)
    module = EvalModule(explainer, {"pointing_game": PointingGame()}, None, [], [], keep=False, pad_multiple=1,
                        out=tmp_path)  # fmt: skip
    module.to(META)
    assert clip.device == META
    assert all(p.device == META for m in vars(explainer).values() if isinstance(m, torch.nn.Module)
               for p in m.parameters())  # fmt: skip
    pg = module.metrics["pointing_game"]
    states = [getattr(pg, s) for s in pg._defaults if isinstance(getattr(pg, s), torch.Tensor)]
    assert states and all(t.device == META for t in states)
