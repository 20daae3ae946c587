"""Multi-node data parallelism as a cluster runs it: two ``torchrun --nnodes 2 --node_rank {0,1}`` launches on
localhost (one process each, gloo on the CPU, a shared run dir as a shared filesystem would give), for ``train``
(the feature cache built in shards by both nodes, then DDP training and testing) and ``evaluate``; each reports
the numbers one process reports. docs/gpu.md gives the SLURM recipe that launches the same way.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.program  # runs whole programs: `pytest -m "not program"` skips it

WORLD = {"n_train": 16, "n_val": 8, "n_test": 8}
WORLD_KW = "{" + ",".join(f"{k}:{v}" for k, v in WORLD.items()) + "}"
TWO_NODES = ["trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2"]


@pytest.fixture(scope="module")
def world(shapes_world) -> Path:
    return shapes_world(seed=7, **WORLD)


def env() -> dict[str, str]:
    src = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def program(name: str, world: Path, out: Path, extra: list[str]) -> list[str]:
    return [
        f"{name}.py",
        "model=micro",
        "logger=csv",
        f"data.root={world}",
        "data.seed=7",
        f"++data.generate_kwargs={WORLD_KW}",
        "seed=5",
        f"hydra.run.dir={out}",
        *extra,
    ]


def one_process(args: list[str], cwd: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=env())  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def two_nodes(args: list[str], cwd: Path) -> None:
    """Node 0 and node 1, each its own torchrun (static rendezvous at 127.0.0.1), started together."""
    port = str(free_port())
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
               str(ROOT / args[0]), *args[1:]]  # fmt: skip
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                                      env=env()))  # fmt: skip
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for node, (p, text) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"node {node}:\n{text[-3000:]}"


def numbers(run: Path, prefixes: tuple[str, ...]) -> dict[str, float]:
    m = json.loads((run / "metrics.json").read_text())
    return {k: float(v) for k, v in m.items() if k.startswith(prefixes) and isinstance(v, int | float)}


@pytest.mark.slow
def test_two_torchrun_nodes_train_like_one_process(world, tmp_path):
    common = ["trainer.max_epochs=2", "data.batch_size=4", "feature_cache.shard_size=4"]
    one = program("train", world, tmp_path / "one", [*common, f"feature_cache.dir={tmp_path / 'fc1'}"])
    two = program("train", world, tmp_path / "two", [*common, f"feature_cache.dir={tmp_path / 'fc2'}", *TWO_NODES])
    one_process(one, tmp_path)
    two_nodes(two, tmp_path)
    log = (tmp_path / "two" / "train.log").read_text()
    assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log, "both nodes joined one job"
    # the cache was built by both nodes, each its own shards (rank r: shards k % 2 == r)
    assert "rank 0 computed" in log and "rank 1 computed" in log
    a, b = numbers(tmp_path / "one", ("test/", "val/", "best/")), numbers(tmp_path / "two", ("test/", "val/", "best/"))
    keys = [k for k in a if not k.endswith("/loss")]  # the logged DDP loss is Lightning's rounded mean (see
    assert "test/pointing_game" in keys and "val/energy" in keys  # tests/test_reproducibility.py)
    for k in keys:
        assert b[k] == pytest.approx(a[k], abs=1e-5), k
    wa = torch.load(tmp_path / "one" / "hsrm.pt", weights_only=True)["hsrm"]
    wb = torch.load(tmp_path / "two" / "hsrm.pt", weights_only=True)["hsrm"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-5, msg=k)


@pytest.mark.slow
def test_two_torchrun_nodes_evaluate_like_one_process(world, tmp_path):
    common = ["data.batch_size=3", "explainer=grad_eclip", "figure_samples=0"]
    one_process(program("evaluate", world, tmp_path / "one", common), tmp_path)
    two_nodes(program("evaluate", world, tmp_path / "two", [*common, *TWO_NODES]), tmp_path)
    a, b = numbers(tmp_path / "one", ("test/",)), numbers(tmp_path / "two", ("test/",))
    assert a["test/samples"] > 0 and any(k.startswith("test/pointing_game") for k in a)
    assert b == a
    log = (tmp_path / "two" / "evaluate.log").read_text()
    assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log, "both nodes joined one job"
