"""The explain program's folder mode: counts, broken files, prompts per image, list files, imagefolder, re-runs,
maps equal to the one-image path, and the errors a command line needs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from PIL import Image

from mmel.data.shapes.world import sample_scene
from mmel.evaluation.records import ITEMS
from mmel.explain import explain_maps
from mmel.explain_folder import explain_folder, list_images, prompts_of, run
from mmel.explainers import build_explainer
from tests.test_configs import compose_cfg as _compose

pytestmark = pytest.mark.program  # runs whole programs: `pytest -m "not program"` skips it

PROMPTS = ["a red circle", "a blue square"]
GOOD = ["a.png", "b_grey.png", "c_rgba.png", "sub/d.jpg", "sub/e_palette.png"]
BROKEN = {"truncated.png": "corrupt_image", "text.jpg": "not_an_image", "empty.png": "not_an_image"}


@pytest.fixture(scope="module")
def tiny_clip():
    """The project's tiny CLIP trained on the shapes world (64 px, patch 8; committed weights)."""
    from mmel.backbone import load_clip

    return load_clip("mmel-tiny", pretrained="shapes")


def _scene(seed: int, size: int = 64) -> np.ndarray:
    return sample_scene(np.random.default_rng(seed), size=size).pixels  # [size, size, 3] uint8


@pytest.fixture
def folder(tmp_path):
    """5 shapes images (modes RGB, L, RGBA, P; PNG and JPEG; one in a subfolder; sizes 64 and 80) + 3 broken."""
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(_scene(0)).save(d / "a.png")
    Image.fromarray(_scene(1)).convert("L").save(d / "b_grey.png")
    Image.fromarray(_scene(2, 80)).convert("RGBA").save(d / "c_rgba.png")
    Image.fromarray(_scene(3)).save(d / "sub" / "d.jpg", quality=95)
    Image.fromarray(_scene(4)).convert("P").save(d / "sub" / "e_palette.png")
    data = (d / "a.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    (d / "text.jpg").write_text("not a jpeg")
    (d / "empty.png").write_bytes(b"")
    (d / ".DS_Store").write_bytes(b"\0")  # hidden: not the researcher's image, not counted
    return d


def compose_cfg(overrides, tmp_path, out="out"):
    cfg = _compose("explain", ["model=tiny", *overrides], tmp_path)
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / out)
    HydraConfig.instance().set_config(cfg)
    return cfg


def _journal(out):
    return [json.loads(line) for line in (out / ITEMS).read_text().splitlines()]


def test_folder_counts_equal_what_was_written_and_broken_files_are_counted(folder, tmp_path, capsys):
    cfg = compose_cfg([f"images={folder}", f"prompts=[{', '.join(PROMPTS)}]", "batch_size=2"], tmp_path)
    metrics, _ = run(cfg)
    out = tmp_path / "out"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["images"]["total"] == 8 and saved["images"]["done"] == 5 == saved["images"]["done_this_run"]
    assert saved["images"]["skipped_by_reason"] == {"corrupt_image": 1, "not_an_image": 2}
    assert sorted(f for fs in saved["images"]["skipped_files"].values() for f in fs) == sorted(BROKEN)
    assert saved["items"] == 10 and saved["images_per_s"] > 0
    table = pq.read_table(out / "results.parquet").to_pylist()
    with open(out / "results.csv") as f:
        assert sum(1 for _ in f) == len(table) + 1  # + header: the CSV is the same table
    assert len(table) == 5 * 2 + 3
    ok = [r for r in table if r["status"] == "ok"]
    assert sorted({r["image"] for r in ok}) == sorted(GOOD)
    assert {r["image"]: r["status"] for r in table if r["status"] != "ok"} == BROKEN
    for r in ok:
        assert r["prompt"] == PROMPTS[r["index"]] and -1 <= r["score"] <= 1
        assert (r["map_h"], r["map_w"]) == (64, 64)  # resize=auto -> model: the tiny model's 64 px square
        assert 0 <= r["peak_y"] < 64 and 0 <= r["peak_x"] < 64 and r["tokens_kept"] == r["tokens"] == 3
        with Image.open(out / r["overlay"]) as im:
            assert im.format == "PNG" and im.size == (r["image_w"], r["image_h"])  # overlay at the image's size
        with np.load(out / r["maps_file"]) as z:
            m = z[r["image"]]
            assert m.dtype == np.float32 and m.shape == (2, 64, 64)
            assert m[r["index"]].argmax() == r["peak_y"] * 64 + r["peak_x"]
    assert len([p for p in (out / "overlays").rglob("*.png") if p.is_file()]) == 10
    assert sum(len(np.load(p).files) for p in (out / "maps").glob("*.npz")) == 5
    assert next(r for r in ok if r["image"] == "c_rgba.png")["image_w"] == 80
    assert "explained 5 of 8 files" in capsys.readouterr().out


def test_rerun_skips_done_images_without_rewriting_them_and_a_cut_journal_loses_one_image(folder, tmp_path):
    cfg = compose_cfg([f"images={folder}", f"prompts=[{', '.join(PROMPTS)}]", "batch_size=2"], tmp_path)
    run(cfg)
    out = tmp_path / "out"
    stamps = {p: p.stat().st_mtime_ns for p in (out / "overlays").rglob("*.png")}
    n_ok = sum(r["status"] == "ok" for r in _journal(out))
    Image.fromarray(_scene(9)).save(folder / "f_new.png")
    metrics, _ = run(compose_cfg([f"images={folder}", f"prompts=[{', '.join(PROMPTS)}]", f"resume={out}"], tmp_path))
    assert metrics["images"]["done_this_run"] == 1 and metrics["images"]["done"] == 6
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # done images: not rewritten
    assert sum(r["status"] == "ok" for r in _journal(out)) == n_ok + 2
    # a kill in the middle of a write: the last record is cut; only its image is redone
    lines = (out / ITEMS).read_text().splitlines(keepends=True)
    last_ok = max(i for i, line in enumerate(lines) if '"status": "ok"' in line)
    (out / ITEMS).write_text("".join(lines[:last_ok]) + lines[last_ok][:20])
    again, _ = run(compose_cfg([f"images={folder}", f"prompts=[{', '.join(PROMPTS)}]"], tmp_path))  # same dir
    assert again["images"]["done_this_run"] == 1 and again["images"]["done"] == 6 and again["items"] == 12
    # other settings into the same dir are refused, naming the key
    with pytest.raises(ValueError, match="resize"):
        run(compose_cfg([f"images={folder}", "prompts=[a]", "resize=keep"], tmp_path))


def test_per_image_prompts_from_jsonl_and_images_without_prompts(folder, tmp_path, tiny_clip):
    lines = [{"image": "a.png", "prompts": ["a red circle"]}, {"image": "sub/d.jpg", "prompts": PROMPTS + ["a star"]}]
    pf = tmp_path / "prompts.jsonl"
    pf.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = compose_cfg([f"images={folder}", f"prompts_file={pf}"], tmp_path)
    metrics, _ = run(cfg)
    assert metrics["images"]["done"] == 2 and metrics["images"]["skipped_by_reason"] == {
        "no_prompts": 6
    }  # not decoded: not asked for
    table = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    got = {}
    for r in table:
        if r["status"] == "ok":
            got.setdefault(r["image"], []).append((r["index"], r["prompt"]))
    assert got == {"a.png": [(0, "a red circle")], "sub/d.jpg": list(enumerate(PROMPTS + ["a star"]))}
    # shared prompts are the default for images the file does not name
    entries = list_images(str(folder))
    table = prompts_of(entries, ["x"], {"a.png": ["y"]})
    assert table["a.png"] == ["y"] and table["b_grey.png"] == ["x"]


def test_list_file_relative_to_its_folder_and_absolute_paths(folder, tmp_path, tiny_clip):
    lst = tmp_path / "lists" / "some.txt"
    lst.parent.mkdir()
    lst.write_text(f"# two images\n../imgs/a.png\n\n{folder / 'sub' / 'd.jpg'}\n../imgs/missing.png\n")
    entries = list_images(str(lst))
    assert [e.key for e in entries] == ["../imgs/a.png", str(folder / "sub" / "d.jpg"), "../imgs/missing.png"]
    e = build_explainer("grad_eclip", tiny_clip)
    res = explain_folder(entries, prompts_of(entries, PROMPTS, {}), tiny_clip, e, tmp_path / "o", progress=False)
    assert res["images"]["done"] == 2 and res["images"]["skipped_by_reason"] == {"missing": 1}
    assert all(".." not in p.parts for p in (tmp_path / "o" / "overlays").rglob("*"))  # stays inside the run dir


def test_imagefolder(folder, tmp_path, tiny_clip):
    entries = list_images(f"imagefolder:{folder}", cache_dir=str(tmp_path / "hf"))
    assert sorted(e.key for e in entries) == sorted(GOOD + list(BROKEN))  # datasets lists image extensions only
    e = build_explainer("grad_eclip", tiny_clip)
    res = explain_folder(entries, prompts_of(entries, PROMPTS, {}), tiny_clip, e, tmp_path / "o", progress=False)
    assert res["images"]["done"] == 5 and res["images"]["skipped"] == 3


@pytest.mark.parametrize(
    ("name", "kw", "resize"),
    [("grad_eclip", {}, "model"), ("grad_eclip", {}, "keep"), ("grad_eclip", {"mode": "official"}, "keep"),
     ("maskclip", {}, "model")],
)  # fmt: skip
def test_maps_and_scores_equal_the_one_image_path(folder, tmp_path, tiny_clip, name, kw, resize):
    # official Grad-ECLIP and MaskCLIP alter the forward: their scores must still be the stock CLIP's
    e = build_explainer(name, tiny_clip, **kw)
    entries = [x for x in list_images(str(folder)) if x.key in GOOD]
    prompts = {x.key: PROMPTS[: 1 + i % 2] for i, x in enumerate(entries)}  # ragged: 1 or 2 prompts per image
    explain_folder(entries, prompts, tiny_clip, e, tmp_path / "o", resize=resize, batch_size=4, progress=False)
    rows = pq.read_table(tmp_path / "o" / "results.parquet").to_pylist()
    for x in entries:
        r = next(r for r in rows if r["image"] == x.key)
        with np.load(tmp_path / "o" / r["maps_file"]) as z:
            stored = torch.from_numpy(z[x.key])
        img = Image.open(x.path)
        one = explain_maps(img.convert("RGB"), prompts[x.key], tiny_clip, e, resize=resize)
        # the stored maps are at the input size; resized as the one-image path resizes them
        full = torch.nn.functional.interpolate(stored[None], size=one["maps"].shape[-2:], mode="bilinear")[0]
        # batched and one-image forwards differ only in float rounding (explain_batch's own test: 1e-5)
        torch.testing.assert_close(full.clamp(0, 1), one["maps"], atol=1e-5, rtol=0)
        for k, score in enumerate(one["scores"]):  # 1e-5: the forwards differ by float rounding only
            assert next(q for q in rows if q["image"] == x.key and q["index"] == k)["score"] == pytest.approx(
                score, abs=1e-5
            )


def test_errors_name_what_is_wrong(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="images: .*nothere not found"):
        run(compose_cfg([f"images={tmp_path / 'nothere'}", "prompts=[a]"], tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        run(compose_cfg([f"images={tmp_path / 'empty'}", "prompts=[a]"], tmp_path))
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"image": "a.png", "prompts": ["a"]}\n{"image": "b_grey.png", "prompt": ["a"]}\n')
    with pytest.raises(ValueError, match=r"p.jsonl line 2: expected \{\"image\""):
        run(compose_cfg([f"images={folder}", f"prompts_file={bad}"], tmp_path))
    with pytest.raises(ValueError, match="image=.* and images=.* are both given"):
        run(compose_cfg([f"images={folder}", f"image={folder / 'a.png'}", "prompts=[a]"], tmp_path))
    with pytest.raises(ValueError, match="prompts: missing"):
        run(compose_cfg([f"images={folder}"], tmp_path))
    with pytest.raises(ValueError, match="for one image use image="):
        run(compose_cfg([f"images={folder / 'a.png'}", "prompts=[a]"], tmp_path))


def test_a_batch_too_big_for_the_device_is_split_and_an_image_too_big_alone_is_skipped(folder, tmp_path, tiny_clip,
                                                                                       monkeypatch):  # fmt: skip
    import mmel.explain

    # memory model for the test: batch x pixels bytes, 6000 free -> 64x64 images fit one at a time, 80x80 never
    monkeypatch.setattr(mmel.explain, "estimate_bytes", lambda clip, e, size, k, batch=1: batch * size[0] * size[1])
    monkeypatch.setattr(mmel.explain, "available_bytes", lambda device: 6000)
    e = build_explainer("grad_eclip", tiny_clip)
    entries = list_images(str(folder))
    res = explain_folder(entries, prompts_of(entries, PROMPTS, {}), tiny_clip, e, tmp_path / "o", resize="keep",
                         batch_size=4, progress=False)  # fmt: skip
    assert res["images"]["done"] == 4 and res["images"]["skipped_by_reason"]["too_large"] == 1
    assert res["images"]["skipped_files"]["too_large"] == ["c_rgba.png"]  # the 80 px one
    assert len({r["batch"] for r in _journal(tmp_path / "o") if r["status"] == "ok"}) == 4  # one image per batch
