"""The programs end to end on a small shapes world and the micro CLIP: train -> hsrm.pt -> mmel explainer,
evaluate (with an interrupted run resumed to the same numbers), and the HSRM starting point == Grad-ECLIP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from mmel.backbone import load_clip
from mmel.explainers import build_explainer
from tests.conftest import CONF_DIR

pytestmark = pytest.mark.program  # runs whole programs: `pytest -m "not program"` skips it

N_TEST = 24
WORLD = {"n_train": 48, "n_val": 16, "n_test": N_TEST}


@pytest.fixture(scope="module")
def world(shapes_world) -> Path:
    return shapes_world(seed=3, **WORLD)


def cfg_for(program: str, world: Path, out: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        # the data module (re)generates the configured world: configure exactly the one the fixture wrote
        world_kw = "{" + ",".join(f"{k}:{v}" for k, v in WORLD.items()) + "}"
        data = [f"data.root={world}", "data.seed=3", f"++data.generate_kwargs={world_kw}"]
        cfg = compose(program, overrides=["model=micro", *data, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.log_dir = str(out.parent / "logs")
    return cfg


def test_evaluate_writes_metrics_and_resumes_to_identical_numbers(world, tmp_path):
    from mmel.evaluate import run

    full, _ = run(cfg_for("evaluate", world, tmp_path / "full", []))
    assert full["test/samples"] >= N_TEST  # one sample per (image, category present)
    assert 0 <= full["test/pointing_game/accuracy"] <= 1 and 0 <= full["test/energy_pointing_game"] <= 1
    on_disk = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert on_disk["test/samples"] == full["test/samples"]

    # an interrupted run (stopped after 7 samples), then resumed in its own dir
    part, _ = run(cfg_for("evaluate", world, tmp_path / "part", ["limit=7"]))
    assert part["test/samples"] == 7
    resumed, objs = run(cfg_for("evaluate", world, tmp_path / "other", [f"resume={tmp_path / 'part'}"]))
    assert resumed["test/samples"] == full["test/samples"]
    for k, v in full.items():
        if k.startswith("test/") and isinstance(v, torch.Tensor | float):
            a, b = torch.as_tensor(v), torch.as_tensor(resumed[k])
            assert torch.equal(a.isnan(), b.isnan()) and torch.allclose(a.nan_to_num(), b.nan_to_num(), atol=1e-6), k
    assert not (tmp_path / "other" / "metrics.json").exists()  # results went to the resumed run's dir


def test_train_writes_hsrm_checkpoint_that_the_mmel_explainer_loads(world, tmp_path):
    from mmel.train import run

    common = ["trainer.max_epochs=2", "data.batch_size=16", "logger=csv", f"feature_cache.dir={tmp_path / 'fc'}"]
    metrics, objs = run(cfg_for("train", world, tmp_path / "run", common))
    for key in ("val/pointing_game", "test/pointing_game", "test/grad_eclip_pointing_game", "train/loss"):
        assert key in metrics, key
    ckpt_path = tmp_path / "run" / "hsrm.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert set(ckpt) == {"hsrm", "config"}
    assert not any(k.startswith(("visual.", "transformer.")) for k in ckpt["hsrm"])  # frozen CLIP is not saved
    # training moved the HSRM off its Grad-ECLIP start
    assert ckpt["hsrm"]["d_alpha"].abs().sum() > 0
    clip = objs["clip"]
    explainer = build_explainer("mmel", clip, checkpoint=str(ckpt_path))
    maps = explainer(torch.randn(2, 3, 32, 32), ["a red circle", "a blue square", "a green star"])
    assert maps.shape == (2, 3, 32, 32) and torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    for lightning_ckpt in (tmp_path / "run" / "checkpoints").glob("*.ckpt"):
        sd = torch.load(lightning_ckpt, weights_only=False)["state_dict"]
        assert all(k.startswith(("hsrm.", "metrics.")) for k in sd), "CLIP weights leaked into a checkpoint"


def test_mmel_at_initialisation_is_grad_eclip(micro_clip):
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "two blue squares"]
    ge = build_explainer("grad_eclip", micro_clip, mode="native")(images, prompts)
    mm = build_explainer("mmel", micro_clip, layers=2)(images, prompts)
    torch.testing.assert_close(mm, ge, atol=1e-5, rtol=0)


def test_mmel_checkpoint_errors(micro_clip, tmp_path):
    with pytest.raises(FileNotFoundError, match="hsrm.pt"):
        build_explainer("mmel", micro_clip, checkpoint=str(tmp_path / "hsrm.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nope")
    with pytest.raises(ValueError, match="not an HSRM checkpoint"):
        build_explainer("mmel", micro_clip, checkpoint=str(bad))
    other = load_clip("mmel-micro-quickgelu")
    from mmel.hsrm import HSRM

    torch.save(
        {
            "hsrm": HSRM.for_clip(other.model, 2).state_dict(),
            "config": {"backbone": other.name, "layers": [0, 1], "scales": [1, 2, 4], "tau": 0.1},
        },
        tmp_path / "other.pt",
    )
    with pytest.raises(ValueError, match="trained for backbone 'mmel-micro-quickgelu'"):
        build_explainer("mmel", micro_clip, checkpoint=str(tmp_path / "other.pt"))


@pytest.mark.parametrize("resize", ["fixed", "keep"])
def test_evaluate_with_deletion_insertion(world, tmp_path, resize):
    from mmel.evaluate import run

    over = [
        "limit=3",
        "metrics.deletion_insertion.enabled=true",
        "metrics.deletion_insertion.step=0.25",
        "metrics.scorer=softmax",
        f"data.resize={resize}",
    ]
    res, objs = run(cfg_for("evaluate", world, tmp_path / resize, over))
    for k in ("test/deletion_insertion/deletion_auc", "test/deletion_insertion/insertion_auc"):
        assert 0 <= res[k] <= 1, k
    curves = objs["metrics"]["deletion_insertion"].curves()
    assert curves["deletion"].shape == (3, 5) and curves["insertion"].shape == (3, 5)


def test_cached_training_equals_online_training_and_needs_no_clip_pass(world, tmp_path, monkeypatch):
    """Epochs read frozen-CLIP features from the cache; the result equals training with CLIP in the loop."""
    from mmel.explainers.grad_eclip import GradECLIP
    from mmel.train import run

    common = [
        "trainer.max_epochs=2",
        "data.batch_size=16",
        "logger=csv",
        "callbacks=none",
        "test=false",
        f"feature_cache.dir={tmp_path / 'fc'}",
    ]
    online, _ = run(cfg_for("train", world, tmp_path / "online", [*common, "feature_cache.enabled=false"]))
    cached, _ = run(cfg_for("train", world, tmp_path / "cached", common))  # builds the cache
    a = torch.load(tmp_path / "online" / "hsrm.pt", weights_only=True)["hsrm"]
    b = torch.load(tmp_path / "cached" / "hsrm.pt", weights_only=True)["hsrm"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4, msg=k)
    assert abs(float(online["val/pointing_game"]) - float(cached["val/pointing_game"])) < 1e-6

    calls = []
    original = GradECLIP.layer_evidence
    monkeypatch.setattr(GradECLIP, "layer_evidence", lambda *a, **k: calls.append(1) or original(*a, **k))
    again, _ = run(cfg_for("train", world, tmp_path / "again", common))  # reads the finished cache
    assert calls == [], "a CLIP pass happened although every feature was cached"
    assert float(again["val/pointing_game"]) == float(cached["val/pointing_game"])


def test_ddp_test_metrics_equal_single_process(world, tmp_path):
    """Two gloo processes (Lightning DDP, CPU) report the same test metrics as one process (metric states sync)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    world_kw = "{" + ",".join(f"{k}:{v}" for k, v in WORLD.items()) + "}"
    results = {}
    for trainer in ("cpu", "ddp"):
        out = tmp_path / trainer
        cmd = [
            sys.executable,
            str(ROOT / "train.py"),
            "model=micro",
            f"trainer={trainer}",
            "train=false",
            "feature_cache.enabled=false",
            "logger=csv",
            "callbacks=none",
            f"data.root={world}",
            "data.seed=3",
            f"++data.generate_kwargs={world_kw}",
            "data.subset=20",
            "data.batch_size=4",
            f"hydra.run.dir={out}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if trainer == "ddp":
            assert "MEMBER: 2/2" in (out / "train.log").read_text()
        results[trainer] = json.loads((out / "metrics.json").read_text())
    # untrained (train=false): the HSRM is at its start, so its maps are the logged Grad-ECLIP baseline's
    cpu = results["cpu"]
    assert cpu["test/pointing_game"] == cpu["test/grad_eclip_pointing_game"]
    assert cpu["test/energy"] == pytest.approx(cpu["test/grad_eclip_energy"], abs=1e-6)
    keys = [k for k in results["cpu"] if k.startswith("test/")]
    assert "test/pointing_game" in keys and "test/energy" in keys
    for k in keys:
        assert results["ddp"][k] == pytest.approx(results["cpu"][k], abs=1e-6), k


def test_optuna_sweep_runs_trials_and_reports_the_best(world, tmp_path):
    """`train.py -m hparams_search=hsrm_optuna`: one run dir with metrics.json per trial; Optuna gets a number."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    world_kw = "{" + ",".join(f"{k}:{v}" for k, v in WORLD.items()) + "}"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "hparams_search=hsrm_optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=1",
        "model=micro",
        "trainer.max_epochs=1",
        "test=false",
        "feature_cache.enabled=false",
        f"data.root={world}",
        "data.seed=3",
        f"++data.generate_kwargs={world_kw}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Best value:" in proc.stdout + proc.stderr
    trials = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(trials) == 2
    for t in trials:
        assert 0 <= json.loads(t.read_text())["val/pointing_game"] <= 1


def test_ablated_hsrm_trains_from_the_cache_and_its_checkpoint_loads(world, tmp_path):
    """No propagation (scales=[]) and no gate: the cache stores no cosines, training and loading still work."""
    from mmel.train import run

    over = ["trainer.max_epochs=1", "data.batch_size=16", "logger=csv", "callbacks=none", "hsrm.scales=[]",
            "hsrm.gate=false", f"feature_cache.dir={tmp_path / 'fc'}"]  # fmt: skip
    metrics, objs = run(cfg_for("train", world, tmp_path / "run", over))
    assert 0 <= float(metrics["test/pointing_game"]) <= 1
    e = build_explainer("mmel", objs["clip"], checkpoint=str(tmp_path / "run" / "hsrm.pt"))
    assert e.hsrm.scales == [] and not e.hsrm.use_gate
    assert e(torch.randn(1, 3, 32, 32), ["a red circle"]).shape == (1, 1, 32, 32)
