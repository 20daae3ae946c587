"""The files of an evaluation run dir that make it resumable: per-item records and the run fingerprint.

* ``items.jsonl``: one JSON object per (image, prompt) sample, appended and fsync'ed per batch as soon as it is
  scored (each process writes ``items_rank<r>.jsonl``; they are merged, deduplicated by ``sample_id`` and sorted by
  dataset index into ``items.jsonl`` at the end and before a resume). A SIGKILL loses at most the batch in flight;
  a line cut by the kill is dropped when the file is read back.
* ``run.json``: the fingerprint of everything that determines the numbers (explainer and options, model and
  weights, data, split, metrics, seed, code version). A resume with a different fingerprint is refused, naming the
  keys that differ. It also records the ``machine`` the run started on (:func:`mmel.utils.machine.machine`), outside
  the fingerprint: a resume on another kind of machine is allowed but logged (its last digits may differ).

Work is done in *chunks*: ``batch_size`` consecutive samples of the split, a fixed partition of the split whatever
was done before or how many processes share the work. So every sample is explained in the same company in an
uninterrupted run, a resumed run and a DDP run, and their numbers are identical (batched forwards are not
bit-identical across batch compositions). A chunk is finished when every one of its samples has a record; a resume
drops the records of unfinished chunks and recomputes them whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import mmel
from mmel.utils.machine import machine_key
from mmel.utils.runs import git_state

log = logging.getLogger(__name__)

MMEL_CHECKOUT = Path(mmel.__file__).resolve().parents[2]  # the checkout mmel is imported from (for its commit)
ITEMS = "items.jsonl"
RUN = "run.json"
RANK_GLOB = "items_rank*.jsonl"


class ItemWriter:
    """Appends records to a JSON-lines file; :meth:`write` returns only after the lines are on disk (fsync)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the whole run

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        self._f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def read_items(path: Path) -> list[dict[str, Any]]:
    """Records of one JSON-lines file. A last line without its newline (cut by a kill) is dropped; any other
    unreadable line is an error naming the file and line."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # no newline after it: the write was interrupted
                log.warning("%s: dropping a truncated last line (an interrupted write)", path)
                continue
            raise ValueError(f"{path}:{i + 1}: not a JSON record ({e}); the items file is damaged") from None
    return out


def merge_items(out: Path, chunk_sizes: dict[int, int] | None = None) -> list[dict[str, Any]]:
    """Merge ``items.jsonl`` and every ``items_rank*.jsonl`` of ``out`` into ``items.jsonl`` (atomically), one record
    per ``sample_id`` (the first seen), sorted by dataset index; the per-rank files are removed.

    ``chunk_sizes`` (chunk id -> number of samples): keep only the records of finished chunks (before a resume).
    """
    records: dict[str, dict[str, Any]] = {}
    sources = [out / ITEMS, *sorted(out.glob(RANK_GLOB))]
    for path in sources:
        for r in read_items(path):
            records.setdefault(str(r["sample_id"]), r)
    kept = sorted(records.values(), key=lambda r: r["index"])
    if chunk_sizes is not None:
        count: dict[int, int] = defaultdict(int)
        for r in kept:
            count[r["chunk"]] += 1
        unfinished = {c for c, n in count.items() if n != chunk_sizes.get(c, -1)}
        if unfinished:
            log.info("resume: recomputing %d unfinished chunk(s) %s", len(unfinished), sorted(unfinished)[:5])
        kept = [r for r in kept if r["chunk"] not in unfinished]
    tmp = out / (ITEMS + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / ITEMS)
    for path in sources[1:]:
        path.unlink()
    return kept


# ------------------------------------------------------------------------------------------------ fingerprint
def _file_digest(path: str | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


# data settings that change how fast, not what is computed (batch_size is a chunk size: it stays in)
_DATA_RUNTIME = ("num_workers", "pin_memory")


def fingerprint(cfg: DictConfig, clip: Any) -> dict[str, Any]:
    """What determines an evaluation's numbers, as plain JSON (see the module docstring)."""
    explainer = _plain(cfg.explainer)
    if isinstance(explainer, dict) and explainer.get("checkpoint"):
        explainer["checkpoint_sha256"] = _file_digest(str(explainer["checkpoint"]))
    data = {k: v for k, v in _plain(cfg.data).items() if k not in _DATA_RUNTIME}
    return {
        "task": "evaluate",
        "explainer": explainer,
        "model": {
            "name": getattr(clip, "name", None),
            "pretrained": getattr(clip, "pretrained", None),
            "fingerprint": getattr(clip, "fingerprint", None),
            "image_size": list(getattr(clip, "image_size", [])),
            # the preprocessing (with data.*, all a figure needs to show the scored image without the model)
            "mean": [float(v) for v in getattr(clip, "mean", ())],
            "std": [float(v) for v in getattr(clip, "std", ())],
            "patch_size": getattr(clip, "patch_size", None),
        },
        "data": data,
        "split": cfg.get("split", "test"),
        "metrics": _plain(cfg.metrics),
        "seed": cfg.get("seed"),
        "code": {"mmel": mmel.__version__, "git_commit": git_state(MMEL_CHECKOUT)["commit"]},
    }


def differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON trees (a key missing on one side differs)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            out += differing_keys(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def check_resume_dir(out: Path) -> None:
    """A resume target must be an existing evaluate run dir; anything else is a clear error (nothing is written)."""
    if not out.is_dir():
        raise FileNotFoundError(f"resume={out}: no such run dir (give the dir of the interrupted evaluate run)")
    if (out / RUN).is_file():
        return
    hydra_cfg = out / ".hydra" / "config.yaml"
    task = None
    if hydra_cfg.is_file():
        task = OmegaConf.load(hydra_cfg).get("task_name")
    what = f"a '{task}' run" if task else "not an evaluate run dir"
    if (out / "eval_state.pt").is_file():
        what = "written by an older evaluate (eval_state.pt, no fingerprint)"
    raise ValueError(f"resume={out}: {what}; it has no {RUN}, so it cannot be resumed (its files are left untouched)")


def check_fingerprint(
    out: Path, current: dict[str, Any], machine: dict[str, Any] | None = None, task: str = "evaluate"
) -> None:
    """Refuse to mix runs: raise naming every key where ``out``'s recorded fingerprint differs from ``current``
    (``task``: the program whose run dir it must be). ``machine``: this process's :func:`mmel.utils.machine.machine`;
    another kind of machine is logged, not refused."""
    recorded = json.loads((out / RUN).read_text())
    if recorded.get("task") != task:
        raise ValueError(f"resume={out}: {RUN} is not a {task} run's fingerprint (task={recorded.get('task')!r})")
    diff = differing_keys(recorded.get("fingerprint", {}), current)
    if diff:
        raise ValueError(
            f"resume={out}: this run was made with different settings, refusing to mix results; differing keys: "
            + ", ".join(diff)
        )
    if machine is not None and recorded.get("machine") and machine_key(recorded["machine"]) != machine_key(machine):
        log.warning(
            "resume=%s: started on another kind of machine (%s) than this one (%s): the numbers may differ from an "
            "uninterrupted run in the last digits", out, _machine_text(recorded["machine"]), _machine_text(machine),
        )  # fmt: skip


def _machine_text(m: dict[str, Any]) -> str:
    where = m.get("gpu") or m.get("device")
    return f"{m.get('cpu_model')}, {m.get('cpu_capability')}, {m.get('threads')} threads, {where}"


def write_fingerprint(
    out: Path, fp: dict[str, Any], machine: dict[str, Any] | None = None, task: str = "evaluate"
) -> None:
    """Write ``run.json`` atomically (``task``: the program that made the run; with ``machine``, the
    :func:`mmel.utils.machine.machine` facts, when given)."""
    tmp = out / (RUN + ".tmp")
    doc: dict[str, Any] = {"task": task, "fingerprint": fp}
    if machine is not None:
        doc["machine"] = {**machine, "key": machine_key(machine)}
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / RUN)


def chunks(indices: Iterable[int], size: int) -> list[list[int]]:
    """Consecutive ``size``-long chunks of ``indices`` (the last may be shorter)."""
    idx = list(indices)
    return [idx[i : i + size] for i in range(0, len(idx), size)]
