"""Seeds that seed, resumed training that replays, DDP training equal to one process, and what metrics.json records.

Training runs use the micro CLIP on a small shapes world; the kill/resume and DDP runs are real subprocesses
(``python train.py ...``), killed with SIGKILL / started as two gloo processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmel.data.order import EpochOrder, epoch_seed
from tests.conftest import ROOT
from tests.test_programs import WORLD, cfg_for

pytestmark = pytest.mark.program  # runs whole programs: `pytest -m "not program"` skips it

# 48 train images give 97 (image, category) samples: batches of 8 leave a tail of 1 (dropped: see mmel.data.order)
TRAIN = ["trainer.max_epochs=3", "data.batch_size=8", "logger=csv"]


@pytest.fixture(scope="module")
def world(shapes_world) -> Path:
    return shapes_world(seed=3, **WORLD)


def hsrm_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "hsrm.pt", weights_only=True)["hsrm"]


def last_weights(ckpt: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """(epoch, HSRM tensors) of a Lightning checkpoint."""
    c = torch.load(ckpt, weights_only=False)
    return c["epoch"], {k: v for k, v in c["state_dict"].items() if k.startswith("hsrm.")}


def numbers(metrics: dict, prefix: str) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k.startswith(prefix)}


# -- the order ---------------------------------------------------------------------------------------------------
def test_epoch_order_is_a_function_of_seed_and_epoch():
    a, b = EpochOrder(50, seed=1, shuffle=True), EpochOrder(50, seed=1, shuffle=True)
    for e in (0, 3):
        a.set_epoch(e)
        b.set_epoch(e)
        assert list(a) == list(b)  # same (seed, epoch): same order, whatever happened before
    a.set_epoch(0)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == sorted(first) == list(range(50))
    c = EpochOrder(50, seed=2, shuffle=True)
    assert list(c) != first
    assert epoch_seed(1, 2) != epoch_seed(2, 1)


def test_ddp_slices_are_the_single_process_batches():
    n, bs, world = 23, 6, 3
    one = EpochOrder(n, seed=5, shuffle=True, batch_size=bs, rank=0, world_size=1)
    one.set_epoch(4)
    single = list(one)
    assert len(single) == len(one) == 18  # 3 full batches, the tail of 5 dropped
    parts = []
    for r in range(world):
        s = EpochOrder(n, seed=5, shuffle=True, batch_size=bs, rank=r, world_size=world)
        s.set_epoch(4)
        assert s.per_process_batch == 2 and len(s) == 6
        parts.append(list(s))
    for j in range(3):  # global batch j = the processes' j-th batches, in rank order
        assert single[j * bs : (j + 1) * bs] == [i for p in parts for i in p[j * 2 : (j + 1) * 2]]
    with pytest.raises(ValueError, match="data.batch_size=5 must be a positive multiple"):
        EpochOrder(n, seed=0, shuffle=True, batch_size=5, rank=0, world_size=2)
    # evaluation: every sample exactly once over the processes, no padding
    ev = [list(EpochOrder(n, seed=0, shuffle=False, rank=r, world_size=world)) for r in range(world)]
    assert sorted(i for p in ev for i in p) == list(range(n))


# -- seeds ---------------------------------------------------------------------------------------------------------
def test_seed_drives_training_and_metrics_record_provenance(world, tmp_path):
    """Same seed: identical numbers and weights; another seed (same data.seed): another run. metrics.json records
    both seeds, package versions, the git state and the skip counts."""
    from mmel.train import run

    fc = f"feature_cache.dir={tmp_path / 'fc'}"
    res = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        res[name], _ = run(cfg_for("train", world, tmp_path / name, [*TRAIN, fc, f"seed={seed}"]))
    wa, wb, wc = (hsrm_weights(tmp_path / n) for n in "abc")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert numbers(res["a"], "test/") == numbers(res["b"], "test/")
    assert numbers(res["a"], "val/") == numbers(res["b"], "val/")
    assert any(not torch.equal(wa[k], wc[k]) for k in wa), "seed=2 trained the same weights as seed=1"
    assert float(res["a"]["train/loss"]) != float(res["c"]["train/loss"])

    on_disk = json.loads((tmp_path / "c" / "metrics.json").read_text())
    info = on_disk["run"]
    assert info["seed"] == 2 and info["data_seed"] == 3
    for pkg in ("torch", "open_clip_torch", "pytorch-lightning", "torchmetrics", "numpy", "mmel"):
        assert isinstance(info["versions"][pkg], str), pkg
    assert info["versions"]["torch"] == torch.__version__.split("+")[0]
    if (ROOT / ".git").exists():
        assert len(info["git"]["commit"]) == 40 and isinstance(info["git"]["dirty"], bool)
    assert isinstance(on_disk["skipped"], dict)


def test_train_metrics_count_skips_by_reason(world, tmp_path):
    """Boxes below data.min_box_area are dropped when indexing; train's metrics.json counts them by reason."""
    from mmel.train import run

    over = [
        "trainer.max_epochs=1",
        "data.batch_size=16",
        "callbacks=none",
        "test=false",
        "feature_cache.enabled=false",
        "data.min_box_area=400",  # boxes of a 64 px world span ~200..650 px²: the smaller ones (and samples) go
    ]
    metrics, objs = run(cfg_for("train", world, tmp_path / "run", over))
    skipped = json.loads((tmp_path / "run" / "metrics.json").read_text())["skipped"]
    assert skipped and all(isinstance(v, int) and v > 0 for v in skipped.values())
    assert skipped == {k: v for k, v in objs["datamodule"].skipped.items() if v}


# -- resume after a kill -------------------------------------------------------------------------------------------
def train_cmd(world: Path, out: Path, extra: list[str]) -> list[str]:
    world_kw = "{" + ",".join(f"{k}:{v}" for k, v in WORLD.items()) + "}"
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "model=micro",
        f"data.root={world}",
        "data.seed=3",
        f"++data.generate_kwargs={world_kw}",
        "seed=5",
        f"hydra.run.dir={out}",
        *extra,
    ]


def source_env() -> dict[str, str]:
    """This checkout's src first (a venv may hold mmel installed editable from another checkout)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}


def run_ok(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, env=source_env())
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_training_killed_mid_epoch_resumes_to_the_uninterrupted_numbers(world, tmp_path):
    """SIGKILL in epoch 2 (after last.ckpt of epoch 1), resume from last.ckpt: same test metrics, same weights."""
    common = ["trainer.max_epochs=4", "data.batch_size=8", "logger=csv", f"feature_cache.dir={tmp_path / 'fc'}"]
    run_ok(train_cmd(world, tmp_path / "full", common), tmp_path)

    flag = tmp_path / "paused"
    pause = [
        "+callbacks.pause._target_=tests._pause.PauseMidEpoch",
        f"+callbacks.pause.flag={flag}",
        "+callbacks.pause.epoch=2",
        "+callbacks.pause.batch=3",
    ]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        train_cmd(world, killed, [*common, *pause]), cwd=tmp_path, env=source_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not flag.exists():
            assert proc.poll() is None, f"training ended before the kill point: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "the kill point was never reached"
            time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists()
    last = killed / "checkpoints" / "last.ckpt"
    assert last_weights(last)[0] == 1  # the last finished epoch before the kill

    run_ok(train_cmd(world, tmp_path / "resumed", [*common, f"ckpt_path={last}"]), tmp_path)
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert numbers(resumed, "test/") == numbers(full, "test/")
    assert numbers(resumed, "val/") == numbers(full, "val/")
    assert resumed["best/val/pointing_game"] == full["best/val/pointing_game"]
    assert resumed["train/loss"] == full["train/loss"]  # of the last epoch
    a, b = hsrm_weights(tmp_path / "full"), hsrm_weights(tmp_path / "resumed")  # the best epoch's (tested)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the final weights (the resumed run continued writing into the killed run's checkpoint folder)
    (ea, wa), (eb, wb) = last_weights(tmp_path / "full" / "checkpoints" / "last.ckpt"), last_weights(last)
    assert ea == eb == 3
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# -- data-parallel training ----------------------------------------------------------------------------------------
def test_ddp_training_equals_one_process(world, tmp_path):
    """trainer=ddp (2 gloo processes) trains on the same global batches as one process: same test metrics.

    97 training samples in batches of 8 (4 per process), 16 val images / 24 test images worth of samples split
    unevenly over the 2 processes. Feature cache on (rank 0 builds it).
    """
    results = {}
    for trainer in ("cpu", "ddp"):
        out = tmp_path / trainer
        over = [
            f"trainer={trainer}",
            "trainer.max_epochs=3",
            "data.batch_size=8",
            "logger=csv",
            f"feature_cache.dir={tmp_path / 'fc'}",
        ]
        run_ok(train_cmd(world, out, over), tmp_path)
        if trainer == "ddp":
            assert "MEMBER: 2/2" in (out / "train.log").read_text()
        results[trainer] = json.loads((out / "metrics.json").read_text())
    cpu, ddp = results["cpu"], results["ddp"]
    # */loss is left out: Lightning (2.6) averages a logged value over processes as sum(value * batch) / mean of
    # the processes' sample counts, and takes that mean in integer arithmetic ((28 + 27) // 2 = 27 for the 55 test
    # samples here), so the logged DDP test loss is the exact one times 27.5 / 27. The metrics (torchmetrics
    # states, summed) and the weights are the quantities that training decides.
    keys = [k for k in cpu if k.startswith(("test/", "val/", "best/")) and not k.endswith("/loss")]
    assert "test/pointing_game" in keys and "test/energy" in keys
    for k in keys:
        assert ddp[k] == pytest.approx(cpu[k], abs=1e-5), k
    a, b = hsrm_weights(tmp_path / "cpu"), hsrm_weights(tmp_path / "ddp")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5, msg=k)
    (ea, wa), (eb, wb) = (last_weights(tmp_path / t / "checkpoints" / "last.ckpt") for t in ("cpu", "ddp"))
    assert ea == eb == 2
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-5, msg=k)
    assert any(wa[k].abs().sum() > 0 for k in wa if ".d_" in k)  # it trained
