"""The HSRM feature cache in the programs: its key follows the annotation contents, and the real-data paths
(`python train.py model=vitb16 data=coco|flickr30k model.pretrained=FILE data.root=...`) run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import CONF_DIR, ROOT

pytestmark = pytest.mark.program  # runs whole programs: `pytest -m "not program"` skips it

SPLITS = "data.splits={train:train,val:val,test:test}"  # the shapes world's split names


@pytest.fixture(scope="module")
def small_world(shapes_world) -> Path:
    return shapes_world(seed=5, n_train=8, n_val=4, n_test=12)


def _run_test_only(world: Path, out: Path, extra: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from mmel.train import run

    over = ["model=micro", "data=coco", f"data.root={world / 'coco'}", SPLITS, "train=false", "data.num_workers=0"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*over, *extra])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.log_dir = str(out.parent / "logs")
    metrics, _ = run(cfg)
    return {k: float(v) for k, v in metrics.items() if k.startswith("test/")}


def test_editing_boxes_in_place_rebuilds_the_cache_and_matches_uncached(small_world, tmp_path, monkeypatch):
    """The cache key covers the annotation contents: same files, same ids, other boxes -> rebuilt."""
    from mmel.explainers.grad_eclip import GradECLIP

    fc = [f"feature_cache.dir={tmp_path / 'fc'}"]
    before = _run_test_only(small_world, tmp_path / "a", fc)

    ann = small_world / "coco" / "annotations" / "instances_test.json"
    data = json.loads(ann.read_text())
    for a in data["annotations"]:  # every test box moved to the top-left corner, where no object is drawn
        a["bbox"] = [0.0, 0.0, 3.0, 3.0]
        a["area"] = 9.0
    ann.write_text(json.dumps(data))

    calls: list[int] = []
    original = GradECLIP.layer_evidence
    monkeypatch.setattr(GradECLIP, "layer_evidence", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    after = _run_test_only(small_world, tmp_path / "b", fc)
    assert calls, "the edited annotations were served from the old cache"
    uncached = _run_test_only(small_world, tmp_path / "c", ["feature_cache.enabled=false"])
    for k in ("test/pointing_game", "test/energy", "test/grad_eclip_pointing_game"):
        assert after[k] == pytest.approx(uncached[k], abs=1e-6), k
    assert after["test/pointing_game"] < before["test/pointing_game"], "the edit must change the numbers"


def test_a_scale_subset_is_sliced_from_the_full_cache_without_clip(small_world, tmp_path, monkeypatch):
    """An ablation that drops a scale reads the full HSRM's cache (its cosines are a slice of it): no CLIP pass,
    the same numbers as online features, and both caches stay (ablations alternate between scale sets)."""
    from mmel.explainers.grad_eclip import GradECLIP

    fc = [f"feature_cache.dir={tmp_path / 'fc'}"]
    _run_test_only(small_world, tmp_path / "full", fc)  # scales [1, 2, 4]: computed through CLIP
    calls: list[int] = []
    original = GradECLIP.layer_evidence
    monkeypatch.setattr(GradECLIP, "layer_evidence", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    for scales in ("[2,4]", "[]"):
        sliced = _run_test_only(small_world, tmp_path / f"s{scales}", [*fc, f"hsrm.scales={scales}"])
        assert not calls, f"hsrm.scales={scales} ran CLIP instead of slicing the full cache"
        online = _run_test_only(small_world, tmp_path / f"o{scales}", ["feature_cache.enabled=false",
                                                                        f"hsrm.scales={scales}"])  # fmt: skip
        for k in ("test/pointing_game", "test/energy", "test/grad_eclip_pointing_game"):
            assert sliced[k] == pytest.approx(online[k], abs=1e-6), (scales, k)
        calls.clear()
    folders = sorted(p.name for p in (tmp_path / "fc").iterdir())
    assert [f for f in folders if f.startswith("test-")] == ["test-test-scales1-2-4", "test-test-scales2-4",
                                                              "test-test-scalesnone"], folders  # fmt: skip


@pytest.fixture(scope="module")
def vitb16_weights(tmp_path_factory) -> Path:
    """A ViT-B/16-architecture weight file (random weights), as a user would pass with model.pretrained=PATH."""
    from safetensors.torch import save_file

    from mmel.backbone import load_clip

    torch.manual_seed(0)
    clip = load_clip("ViT-B-16-quickgelu")
    path = tmp_path_factory.mktemp("weights") / "vitb16-random.safetensors"
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def world_224(shapes_world) -> Path:
    return shapes_world(seed=1, image_size=224, n_train=4, n_val=2, n_test=2)


@pytest.mark.slow  # ~2 min each on 2 shared cores (the ViT-B/16 load and its CLIP passes)
@pytest.mark.parametrize("data", ["coco", "flickr30k"])
def test_train_vitb16_on_real_format_data_end_to_end(data, vitb16_weights, world_224, tmp_path):
    """`python train.py model=vitb16 data=...` with a local weight file and COCO- / Flickr30k-format data."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "model=vitb16",
        f"data={data}",
        f"model.pretrained={vitb16_weights}",
        f"data.root={world_224 / data}",
        SPLITS,
        "data.num_workers=0",
        "data.batch_size=4",
        "data.subset=4",  # samples per split: 12 (image, prompt) pairs through ViT-B/16 in all
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        f"feature_cache.dir={tmp_path / 'fc'}",
        f"hydra.run.dir={run_dir}",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for k in ("test/pointing_game", "test/grad_eclip_pointing_game", "train/loss"):
        assert k in metrics, k
    assert 0 <= metrics["test/pointing_game"] <= 1
    cfg = torch.load(run_dir / "hsrm.pt", weights_only=True)["config"]
    assert cfg["backbone"] == "ViT-B-16-quickgelu" and len(cfg["layers"]) == 6
    # the cache of a real backbone stores its image quantities in float16, once per image
    manifests = sorted((tmp_path / "fc").glob("*/cache.json"))
    assert {m.parent.name.split("-")[0] for m in manifests} == {"train", "val", "test"}
    m = json.loads(manifests[0].read_text())
    assert m["key"]["dtype"] == "float16" and m["tensors"]["cosines"] == "float16"
    assert m["tensors"]["evidence"] == "float32"
