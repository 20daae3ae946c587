"""The explain program: overlay PNGs + metrics.json from Hydra and from Python; unusual and bad inputs."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from PIL import Image

from mmel.explain import explain_image, input_size, load_image, run
from mmel.explainers import build_explainer
from tests.test_configs import compose_cfg as _compose

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture
def png(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
    return path


def compose_cfg(name, overrides, tmp_path):
    """Compose like a real run, with Hydra's runtime output dir pointing into tmp_path."""
    cfg = _compose(name, overrides, tmp_path)
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "out")
    HydraConfig.instance().set_config(cfg)
    return cfg


def _is_png(path):
    with Image.open(path) as im:
        return im.format == "PNG" and im.size[0] > 0


@pytest.mark.parametrize(
    ("explainer", "resize"),
    [("grad_eclip", "keep"), ("grad_eclip_official", "keep"), ("gradcam", "model"), ("mmel", "model")],
)
def test_program_writes_overlays_grid_tokens_and_metrics(png, tmp_path, explainer, resize):
    cfg = compose_cfg(
        "explain",
        [
            f"image={png}",
            f"prompts=[{', '.join(PROMPTS)}]",
            "model=micro",
            f"explainer={explainer}",
            f"resize={resize}",
        ],
        tmp_path,
    )
    metrics, objects = run(cfg)
    out = tmp_path / "out"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["prompts"][0]["prompt"] == PROMPTS[0] and len(saved["prompts"]) == 2
    assert saved["input_size"] == ([40, 64] if resize == "keep" else [32, 32]) and saved["image_size"] == [40, 60]
    files = [saved["files"]["grid"], *saved["files"]["overlays"]] + (
        [saved["files"]["tokens"]] if "tokens" in saved["files"] else []
    )
    assert len(files) == 3 + (explainer.startswith("grad_eclip"))
    for f in files:
        assert _is_png(out / f)
    with Image.open(out / saved["files"]["overlays"][0]) as im:
        assert im.size == (60, 40)  # overlays at the original image size
    # the reported score is the unscaled cosine of the explained input
    for entry in saved["prompts"]:
        assert -1 <= entry["score"] <= 1
    if explainer.startswith("grad_eclip"):
        ws = [w for _, w in saved["prompts"][1]["token_weights"]]
        assert [t for t, _ in saved["prompts"][1]["token_weights"]] == ["two", "blue", "squares"]
        assert min(ws) >= 0 and abs(sum(ws) - 1) < 1e-5
        assert saved["mode"] == ("official" if "official" in explainer else "native")


def test_python_function_and_pil_input(micro_clip, tmp_path):
    img = Image.fromarray(np.full((24, 40, 3), 128, dtype=np.uint8))
    e = build_explainer("attention", micro_clip)
    m = explain_image(img, ["x"], micro_clip, e, out_dir=tmp_path, resize="keep")
    assert m["input_size"] == [24, 40] and (tmp_path / m["files"]["grid"]).is_file()


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P", "LA"])
def test_unusual_image_modes_are_converted(tmp_path, mode):
    rng = np.random.default_rng(1)
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    if mode == "I;16":
        arr = np.full((16, 16), 65535, dtype=np.uint16)
        arr[:8] = 257 * 100
        Image.fromarray(arr).save(path)
    elif mode == "RGBA":
        arr = rng.integers(0, 255, (16, 16, 4), dtype=np.uint8)
        arr[..., 3] = 0  # fully transparent: composited on white
        Image.fromarray(arr, "RGBA").save(path)
    else:
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).convert(mode).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (16, 16)
    a = np.asarray(img)
    if mode == "I;16":  # 16-bit is scaled, not clipped: 65535 -> 255, 25700 -> 100
        assert (a[8:] == 255).all() and (a[:8] == 100).all()
    if mode == "RGBA":
        assert (a == 255).all()


def test_missing_and_unreadable_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        load_image(tmp_path / "nothere.png")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="cannot read .*bad.png"):
        load_image(bad)


def test_empty_prompts_missing_fields_and_bad_resize(png, tmp_path, micro_clip):
    cfg = compose_cfg("explain", [f"image={png}", "prompts=[]", "model=micro"], tmp_path)
    with pytest.raises(ValueError, match="prompts: the list is empty"):
        run(cfg)
    cfg = compose_cfg("explain", ["prompts=[a]", "model=micro"], tmp_path)
    with pytest.raises(ValueError, match="image: missing; pass image=PATH"):
        run(cfg)
    e = build_explainer("attention", micro_clip)
    with pytest.raises(ValueError, match="resize='crop'"):
        explain_image(png, ["a"], micro_clip, e, out_dir=tmp_path, resize="crop")


def test_long_prompt_truncated_is_logged_and_recorded(png, tmp_path, micro_clip, caplog, monkeypatch):
    monkeypatch.setattr("mmel.backbone._TOLD_TRUNCATED", set())  # logged once per process: as if first
    e = build_explainer("grad_eclip", micro_clip)
    long = " ".join(["blue"] * 30)  # micro's context is 16 tokens
    with caplog.at_level(logging.WARNING, logger="mmel.backbone"):
        m = explain_image(png, [long, "a red circle"], micro_clip, e, out_dir=tmp_path)
    cut = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(cut) == 1 and "16 of its 32 tokens kept" in cut[0]  # once, though tokenised several times
    assert len(m["prompts"][0]["token_weights"]) == 14  # context minus start and end tokens
    assert m["prompts"][0]["prompt_tokens"] == {"kept": 16, "total": 32, "truncated": True}
    assert m["prompts"][1]["prompt_tokens"] == {"kept": 5, "total": 5, "truncated": False}


def test_keep_size_rounds_each_side_to_the_patch_grid(micro_clip):
    assert input_size((60, 40), micro_clip, "keep") == (40, 64)
    assert input_size((3, 2), micro_clip, "keep") == (8, 8)  # at least one patch
    assert input_size((60, 40), micro_clip, "model") == (32, 32)
    assert torch.Size(input_size((100, 12), micro_clip, "keep")) == torch.Size([16, 104])
