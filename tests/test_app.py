"""The explorer's non-UI functions (mmel.app.core, mmel.app.ui.run_request): inputs, caching, rendering, metrics.

No browser and no Gradio here (tests/test_app_browser.py drives the page); models are the random micro CLIPs.
"""

from __future__ import annotations

import json
import threading
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from mmel.app import core, inputs, models
from mmel.app import samples as sample_sets
from mmel.app.inputs import InputError
from mmel.app.models import BackboneSpec, ModelCache
from mmel.app.ui import run_request

PROMPTS = ["a red circle", "a blue square"]
SPECS = {
    "micro": BackboneSpec("micro", "mmel-micro", None),
    "microq": BackboneSpec("microq", "mmel-micro-quickgelu", None),
}


@pytest.fixture(scope="module")
def cache():
    torch.manual_seed(0)
    return ModelCache(dict(SPECS))


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))


def test_parse_prompts_one_per_line_and_errors():
    assert inputs.parse_prompts("  a red circle \n\n a blue square\n") == PROMPTS
    for bad in ("", "  \n \n", None):
        with pytest.raises(InputError, match="at least one prompt"):
            inputs.parse_prompts(bad)
    with pytest.raises(InputError, match="at most"):
        inputs.parse_prompts("\n".join(f"p{i}" for i in range(inputs.MAX_PROMPTS + 1)))


def test_read_upload_reads_images_and_names_bad_files(tmp_path):
    rgba = tmp_path / "x.png"
    Image.new("RGBA", (10, 8), (255, 0, 0, 0)).save(rgba)
    img = inputs.read_upload(rgba)
    assert img.mode == "RGB" and img.size == (10, 8)
    assert img.getpixel((0, 0)) == (255, 255, 255)  # transparent -> composited on white (the library's loader)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(InputError, match="'notes.txt' is not a readable image"):
        inputs.read_upload(text)
    with pytest.raises(InputError, match="none given"):
        inputs.read_upload(None)


def test_fit_image_downscales_only_large_images_and_says_so():
    big = Image.new("RGB", (3000, 1500), (10, 20, 30))
    small, note = inputs.fit_image(big, max_side=600)
    assert small.size == (600, 300) and "3000×1500" in note and "600×300" in note
    same, note = inputs.fit_image(Image.new("L", (64, 48)), max_side=600)
    assert same.size == (64, 48) and same.mode == "RGB" and note is None


def test_peak_and_render_mark_the_maximum_and_boxes(image):
    heat = np.zeros((40, 56), np.float32)
    heat[30, 10] = 1.0
    assert core.peak(heat) == (10, 30)
    out = core.render(image, heat, alpha=0.0, boxes=np.array([[0, 0, 20, 20]], np.float32), min_side=80)
    f = 2  # ceil(80 / 40)
    assert out.size == (56 * f, 40 * f)
    arr = np.asarray(out)
    # alpha 0: far from the marks the pixels are the image's own, enlarged by nearest neighbour
    np.testing.assert_array_equal(arr[60, 100], np.asarray(image)[30, 50])
    assert tuple(arr[10, 0]) == (0, 255, 0)  # the box's left edge is green
    cx, cy = int((10 + 0.5) * f), int((30 + 0.5) * f)
    assert tuple(arr[cy, cx]) == (0, 0, 0)  # the black cross at the peak's centre
    moved = heat.copy()
    moved[30, 10], moved[5, 50] = 0.0, 1.0
    assert not np.array_equal(
        np.asarray(core.render(image, moved, 0.0, None, 80)), np.asarray(core.render(image, heat, 0.0, None, 80))
    )


def test_item_metrics_on_hand_made_maps():
    boxes = np.array([[10, 10, 20, 20]], np.float32)
    inside = np.zeros((32, 32), np.float32)
    inside[10:20, 10:20] = 1.0  # exactly the box
    m = sample_sets.item_metrics(inside, boxes, tolerance=0)
    assert m == pytest.approx({"pointing": 1.0, "energy": 1.0, "iou": 1.0})
    outside = np.zeros((32, 32), np.float32)
    outside[0:5, 25:32] = 1.0
    m = sample_sets.item_metrics(outside, boxes, tolerance=2)
    assert m["pointing"] == 0.0 and m["energy"] == 0.0 and m["iou"] == 0.0
    half = np.zeros((32, 32), np.float32)
    half[10:20, 10:30] = 1.0  # twice the box: half of the mass inside
    assert sample_sets.item_metrics(half, boxes, tolerance=0)["energy"] == pytest.approx(0.5)


def test_explain_reuses_cached_models_and_matches_the_library(cache, image):
    from mmel.explain import explain_maps
    from mmel.explainers import build_explainer

    r = core.explain(cache, "micro", "grad_eclip", image, PROMPTS)
    assert r.maps.shape == (2, 40, 56) and r.maps.min() >= 0 and r.maps.max() <= 1
    assert r.tokens is not None and [t for t, _ in r.tokens[0]] and r.resize == "model"
    assert sum(w for _, w in r.tokens[1]) == pytest.approx(1.0, abs=1e-4)
    clip = cache.clip("micro")
    ref = explain_maps(image, PROMPTS, clip, build_explainer("grad_eclip", clip))
    np.testing.assert_allclose(r.maps, ref["maps"].numpy(), atol=1e-6)
    np.testing.assert_allclose(r.scores, ref["scores"], atol=1e-6)
    before = cache.loaded()
    e = cache.explainer("micro", "grad_eclip")
    r2 = core.explain(cache, "micro", "rollout", image, PROMPTS)
    assert cache.explainer("micro", "grad_eclip") is e and cache.clip("micro") is clip
    assert r2.tokens is None  # no text side
    assert set(cache.loaded()) - set(before) == {("explainer", "micro", None, "rollout", None)}


def test_model_cache_builds_once_under_concurrent_requests(monkeypatch):
    import mmel.backbone

    calls = []
    real = mmel.backbone.load_clip

    def slow_load(*a, **k):
        calls.append(a)
        threading.Event().wait(0.2)  # the window in which a second thread would load it again without the lock
        return real(*a, **k)

    monkeypatch.setattr(mmel.backbone, "load_clip", slow_load)
    fresh = ModelCache(dict(SPECS))
    got = []
    threads = [threading.Thread(target=lambda: got.append(fresh.clip("micro"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and all(g is got[0] for g in got)


def test_checkpoint_errors_are_input_errors(cache, tmp_path):
    from mmel.explainers import build_explainer

    with pytest.raises(InputError, match="Checkpoint:.*not found"):
        cache.explainer("micro", f"mmel{models.CHECKPOINT_SEP}{tmp_path / 'nope' / 'hsrm.pt'}")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="Checkpoint:.*junk.pt"):
        cache.explainer("micro", f"mmel{models.CHECKPOINT_SEP}{junk}")
    e = build_explainer("mmel", cache.clip("micro"))
    ckpt = tmp_path / "hsrm.pt"
    config = {"backbone": "mmel-micro", "layers": e.layers, "scales": [1, 2, 4], "tau": 0.1}
    torch.save({"hsrm": e.hsrm.state_dict(), "config": config}, ckpt)
    assert cache.explainer("micro", f"mmel{models.CHECKPOINT_SEP}{ckpt}") is not None  # its own backbone: fine
    with pytest.raises(InputError, match="Checkpoint:.*mmel-micro"):
        cache.explainer("microq", f"mmel{models.CHECKPOINT_SEP}{ckpt}")


def test_explainer_choices_follow_the_registry(monkeypatch, tmp_path):
    import mmel.explainers as ex

    monkeypatch.setitem(ex._REGISTRY, "zz_later", object)  # registered after the app module was imported
    choices = models.explainer_choices([tmp_path / "a" / "hsrm.pt"])
    assert set(ex.available()) <= set(choices) and "zz_later" in choices
    assert choices[-1] == f"mmel @ {tmp_path / 'a' / 'hsrm.pt'}"
    assert models.parse_explainer_choice(choices[-1]) == ("mmel", str(tmp_path / "a" / "hsrm.pt"))
    assert models.parse_explainer_choice("grad_eclip") == ("grad_eclip", None)


def test_find_checkpoints_newest_first(tmp_path):
    import os

    a, b = tmp_path / "train/runs/a/hsrm.pt", tmp_path / "train/runs/b/hsrm.pt"
    for i, p in enumerate((a, b)):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
        os.utime(p, (1000 + i, 1000 + i))
    (tmp_path / "train/runs/a/other.pt").write_bytes(b"x")
    assert models.find_checkpoints(tmp_path) == [b, a]
    assert models.find_checkpoints(tmp_path / "missing") == []


def test_backbone_specs_and_missing_weights(tmp_path):
    specs = models.backbone_specs()
    assert next(iter(specs)) == "tiny"
    assert (specs["tiny"].name, specs["tiny"].pretrained) == ("mmel-tiny", "shapes")
    assert specs["tiny"].cache_dir.endswith("weights")
    assert specs["vitb16"].name == "ViT-B-16-quickgelu"
    assert models.missing_weights(specs["tiny"]) is None  # the committed weights
    assert models.missing_weights(SPECS["micro"]) is None  # random init
    offline = BackboneSpec("vitb16", "ViT-B-16-quickgelu", "openai", str(tmp_path / "empty"))
    assert "not on this machine" in models.missing_weights(offline)
    assert "not found" in models.missing_weights(offline, str(tmp_path / "w.safetensors"))
    (tmp_path / "w.safetensors").write_bytes(b"")
    assert models.missing_weights(offline, str(tmp_path / "w.safetensors")) is None
    with pytest.raises(InputError, match="not on this machine"):
        ModelCache({"vitb16": offline}).clip("vitb16")  # refused at once, no minute-long download retries
    with pytest.raises(InputError, match="unknown config"):
        ModelCache(dict(SPECS)).clip("nope")


def test_shapes_samples_generate_only_into_an_empty_root(tmp_path):
    s = sample_sets.ShapesSamples(tmp_path / "shapes", n_train=0, n_val=0, n_test=3)
    assert "Generated" in s.ensure() and s.ensure() is None
    assert s.count("test") == 3
    sample = s.sample("test", 1)
    assert sample.image.size == (64, 64) and sample.boxes
    for prompt, boxes in sample.boxes.items():
        assert prompt.startswith("a photo of a") and boxes.shape[1] == 4 and (boxes[:, 2:] > boxes[:, :2]).all()
    with pytest.raises(InputError, match="out of range"):
        s.sample("test", 3)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "MANIFEST.json").write_text("{}")
    with pytest.raises(InputError, match="incomplete"):
        sample_sets.ShapesSamples(partial).ensure()
    assert (partial / "MANIFEST.json").read_text() == "{}"  # nothing deleted, nothing written


def test_overlays_zip_holds_every_overlay_and_the_scores(cache, image, tmp_path):
    rs = [core.explain(cache, "micro", n, image, PROMPTS) for n in ("grad_eclip", "rollout")]
    boxes = {PROMPTS[0]: np.array([[0, 0, 10, 10]], np.float32)}
    metrics = {(r.explainer, PROMPTS[0]): sample_sets.item_metrics(r.maps[0], boxes[PROMPTS[0]], 4) for r in rs}
    path = core.overlays_zip(image, rs, 0.7, tmp_path / "o.zip", boxes, metrics)
    with zipfile.ZipFile(path) as z:
        pngs = [n for n in z.namelist() if n.endswith(".png")]
        assert len(pngs) == 4 and {n.split("/")[0] for n in pngs} == {"grad-eclip", "rollout"}
        res = json.loads(z.read("results.json"))
        with z.open(pngs[0]) as f:
            assert Image.open(f).size == (56 * 7, 40 * 7)  # enlarged to at least 256 px
    assert res["opacity"] == 0.7 and len(res["results"]) == 4
    assert res["results"][0]["score"] == pytest.approx(rs[0].scores[0])
    assert "token_weights" in res["results"][0] and "token_weights" not in res["results"][2]
    assert set(res["results"][0]["metrics"]) == {"pointing", "energy", "iou"} and "metrics" not in res["results"][1]


def test_run_request_turns_bad_input_into_messages(cache, image, tmp_path):
    src = {"image": image, "label": "img.png", "boxes": None, "note": "downscaled note"}
    args = dict(weights="", boxes_mode=False, alpha=0.5, tolerance=4, out_dir=tmp_path)

    def run(source, text, choices, ckpts="", backbone="micro", **kw):
        return run_request(cache, source, text, choices, ckpts, backbone, **{**args, **kw})

    msg, items, *_ = run(None, "a", ["grad_eclip"])
    assert "Image: none given" in msg and items == []
    assert "at least one prompt" in run(src, " \n", ["grad_eclip"])[0]
    assert "choose at least one" in run(src, "a", [])[0]
    assert "Backbone" in run(src, "a", ["rollout"], backbone="nope")[0]
    # one bad checkpoint: its message, and the other explainer's results still shown
    msg, items, info, zip_path, state = run(src, "\n".join(PROMPTS), ["rollout"], ckpts=str(tmp_path / "x.pt"))
    assert "Checkpoint:" in msg and "downscaled note" in msg and len(items) == 2
    assert "rollout · a red circle" in items[0][1] and zip_path.endswith(".zip") and state["results"]
    assert "<table" in info and "a blue square" in info
    msg = run(src, "a", ["rollout"], boxes_mode=True)[0]
    assert "no ground truth" in msg


def test_one_backbone_busy_does_not_block_another(cache, image):
    """Explanations hold only their own backbone's lock: with 'micro' busy, 'microq' still computes."""
    cache.explainer("microq", "rollout")  # built beforehand: the test is about computing, not loading
    cache.explainer("micro", "rollout")
    done = threading.Event()

    def other():
        core.explain(cache, "microq", "rollout", image, PROMPTS)
        done.set()

    with cache.compute_lock("micro"):
        t = threading.Thread(target=other)
        t.start()
        assert done.wait(60), "an explanation on another backbone waited for the busy one"
        blocked = threading.Thread(target=lambda: core.explain(cache, "micro", "rollout", image, PROMPTS))
        blocked.start()
        blocked.join(0.5)
        assert blocked.is_alive()  # the same backbone waits for the lock holder
    blocked.join(60)
    t.join()
    assert not blocked.is_alive()


def test_command_line_binds_localhost_unless_asked():
    from mmel.app.__main__ import parse_args

    a = parse_args([])
    assert (a.host, a.share, a.port) == ("127.0.0.1", False, 7860)
    a = parse_args(["--host", "0.0.0.0", "--share", "--checkpoint", "x/hsrm.pt"])
    assert (a.host, a.share, a.checkpoint) == ("0.0.0.0", True, ["x/hsrm.pt"])
