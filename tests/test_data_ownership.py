"""Nothing deleted that is not ours: the shapes generator writes only into an empty folder or a shapes world of its
own (and there replaces only its own files), the programs refuse a user's folder, the dataset checker never writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmel.data.check import main as check_main
from mmel.data.shapes import generate
from mmel.data.shapes.writer import STAGING
from tests.conftest import ROOT

SMALL = {"n_train": 4, "n_val": 2, "n_test": 3, "image_size": 32}


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def user_coco(root: Path) -> dict[str, bytes]:
    """A user's COCO-looking folder (no shapes MANIFEST): what must survive untouched."""
    (root / "coco" / "annotations").mkdir(parents=True)
    (root / "coco" / "annotations" / "instances_val2017.json").write_text('{"images": []}')
    (root / "flickr30k").mkdir()
    (root / "flickr30k" / "notes.txt").write_text("mine")
    return snapshot(root)


def test_generate_refuses_a_folder_that_is_not_a_shapes_world(tmp_path):
    before = user_coco(tmp_path)
    with pytest.raises(FileExistsError, match=f"refusing to write into {tmp_path}"):
        generate(tmp_path, seed=1, **SMALL)
    with pytest.raises(FileExistsError, match="not empty"):
        generate(tmp_path, seed=1, overwrite=True, **SMALL)
    assert snapshot(tmp_path) == before
    # a MANIFEST.json that is not ours does not make the folder ours
    (tmp_path / "MANIFEST.json").write_text(json.dumps({"files": {"coco/annotations/instances_val2017.json": ""}}))
    with pytest.raises(FileExistsError):
        generate(tmp_path, seed=1, **SMALL)
    assert (tmp_path / "coco" / "annotations" / "instances_val2017.json").read_bytes() == before[
        "coco/annotations/instances_val2017.json"
    ]


def test_regenerating_a_shapes_world_replaces_only_its_own_files(tmp_path):
    generate(tmp_path, seed=1, **SMALL)
    old = set(json.loads((tmp_path / "MANIFEST.json").read_text())["files"])
    mine = tmp_path / "coco" / "train" / "my_note.txt"
    mine.write_text("keep me")
    (tmp_path / "results.csv").write_text("a,b\n")
    generate(tmp_path, seed=2, **{**SMALL, "n_train": 2})  # other settings: a new world
    manifest = json.loads((tmp_path / "MANIFEST.json").read_text())
    assert manifest["params"]["seed"] == 2 and manifest["complete"] is True
    assert mine.read_text() == "keep me" and (tmp_path / "results.csv").read_text() == "a,b\n"
    on_disk = set(snapshot(tmp_path)) - {"MANIFEST.json", "coco/train/my_note.txt", "results.csv"}
    assert on_disk == set(manifest["files"])  # the old world's surplus files are gone, nothing else
    assert old - set(manifest["files"])  # (there was surplus: 4 train images became 2)
    assert not (tmp_path / STAGING).exists()
    # same result as writing that world into an empty folder
    fresh = generate(tmp_path / "fresh", seed=2, **{**SMALL, "n_train": 2})
    assert snapshot(fresh) == {
        k: v for k, v in snapshot(tmp_path).items() if k in set(manifest["files"]) | {"MANIFEST.json"}
    }


def test_a_user_file_where_the_world_writes_stops_before_anything_is_deleted(tmp_path):
    generate(tmp_path, seed=1, **SMALL)
    (tmp_path / "coco" / "val" / "000000000009.jpg").write_bytes(b"user's image")  # not in the seed-1 world
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="000000000009.jpg"):
        generate(tmp_path, seed=1, **{**SMALL, "n_train": 7})  # val ids become 8, 9: image 9 would be ours
    assert snapshot(tmp_path) == before


def test_an_interrupted_generation_is_cleaned_up_by_the_next(tmp_path):
    (tmp_path / STAGING / "coco").mkdir(parents=True)  # what a killed run leaves
    (tmp_path / STAGING / "coco" / "half.jpg").write_bytes(b"x")
    generate(tmp_path, seed=1, **SMALL)
    assert not (tmp_path / STAGING).exists() and (tmp_path / "MANIFEST.json").is_file()


def test_evaluate_on_a_users_folder_refuses_and_deletes_nothing(tmp_path):
    """`python evaluate.py data.root=FOLDER` (shapes data module): a clear error naming the folder, files intact."""
    root = tmp_path / "data"
    before = user_coco(root)
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "model=micro", f"data.root={root}", "limit=1"]
    cmd.append(f"hydra.run.dir={tmp_path / 'run'}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}  # this checkout's mmel
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode != 0
    assert f"refusing to write into {root}" in proc.stderr
    assert snapshot(root) == before


def test_check_never_writes(tmp_path, capsys):
    world = tmp_path / "world"
    overrides = [
        f"data.root={world}",
        "data.seed=1",
        "++data.generate_kwargs={n_train:4,n_val:2,n_test:3,image_size:32}",
    ]
    assert check_main(overrides) == 2  # no world there: reported, not generated
    assert "holds no complete shapes world" in capsys.readouterr().err and not world.exists()

    generate(world, seed=1, **SMALL)
    (world / "coco" / "train" / "mine.txt").write_text("keep me")
    before = snapshot(world)
    assert check_main([*overrides[:1], "data.seed=2", *overrides[2:]]) == 2  # other settings: still no writing
    assert snapshot(world) == before
    assert check_main(overrides) == 0  # the matching world is read
    out = capsys.readouterr().out
    assert "train split=train" in out and snapshot(world) == before
