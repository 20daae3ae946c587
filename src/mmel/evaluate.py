"""The `evaluate` program: score one explainer on a dataset split with the localisation metrics.

    python evaluate.py model=tiny data=shapes explainer=grad_eclip split=test
    python evaluate.py ... trainer=ddp logger=wandb save_maps=true
    python evaluate.py ... resume=logs/evaluate/runs/<dir>      # continue an interrupted run in its own dir

Runs as the test loop of :class:`mmel.evaluation.engine.EvalModule` (so ``trainer=cpu|gpu|ddp`` and precision
apply). Images are explained in batches: each batch of ``data.batch_size`` samples is one ``explain_batch`` call
over its images, each with its own prompts (docs/grad_eclip.md, Batching). Metrics are computed in the frame the
model saw: in `keep` resize mode the maps are resized back to the original image and scored against the original
boxes (tolerances in original pixels); in `fixed` mode (centre crop) against the boxes transformed into the crop.

The run dir holds (docs/contracts.md): ``run.json`` (the fingerprint a resume must match), ``items.jsonl`` (one
record per (image, prompt), written as scored), ``metrics.json`` (rebuilt from the records), ``figures/`` and,
with ``save_maps=true``, ``maps/``. ``resume=<run dir>`` skips the finished samples and ends with the numbers an
uninterrupted run gives; unreadable images and degenerate boxes are skipped and counted (``skipped``).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torchmetrics import Metric

from mmel.data.datamodules import TransformedDataset
from mmel.evaluation import figures
from mmel.evaluation.engine import EvalModule, ItemsProgressBar, replay
from mmel.evaluation.items_table import ITEMS_PARQUET, write_items_parquet
from mmel.evaluation.overlap import train_overlap
from mmel.evaluation.records import (
    ITEMS,
    RUN,
    check_fingerprint,
    check_resume_dir,
    chunks,
    fingerprint,
    merge_items,
    read_items,
    write_fingerprint,
)
from mmel.metrics.protocol import outputs_of
from mmel.utils.logs import log_items
from mmel.utils.machine import machine
from mmel.utils.placement import check_model_device
from mmel.utils.runs import (
    announce,
    build_datamodule,
    check_limit,
    check_loader_keys,
    instantiate_group,
    run_device,
    save_metrics,
)
from mmel.utils.task import task

log = logging.getLogger(__name__)


def build_metrics(cfg: DictConfig, clip=None, sync: bool = True) -> dict[str, Metric]:
    """One Metric per entry of the `metrics` config group that has a `_target_` and is not disabled.

    With a CLIP bundle, deletion/insertion learns its pixel normalisation (to build fills in pixel space).
    ``sync=False``: compute() never gathers across processes (for numbers rebuilt from every process's records)."""
    out = {}
    for name, node in cfg.items():
        if isinstance(node, DictConfig) and "_target_" in node and node.get("enabled", True) is not False:
            kwargs = {k: v for k, v in node.items() if k != "enabled"}
            if not sync:
                kwargs["sync_on_compute"] = False
            # a metric that perturbs the images the model was fed builds its fills in pixel space: it needs their
            # normalisation (declared by needing "images", mmel.metrics.protocol)
            if clip is not None and "images" in getattr(get_class(node._target_), "needs", ()):
                kwargs.update(pixel_mean=list(clip.mean), pixel_std=list(clip.std))
            out[name] = instantiate(OmegaConf.create(kwargs))
    if not out:
        raise ValueError("evaluate: the metrics config enables no metric (each needs a `_target_`)")
    return out


def _scalars(name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {f"{name}/{k}": v for k, v in value.items()}
    return {name: value}


def _is_global_zero() -> bool:
    """Rank 0 of the whole job, from the launcher's environment (before any process group exists)."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]) == 0
    return int(env.get("LOCAL_RANK", 0)) == 0 and int(env.get("NODE_RANK", env.get("GROUP_RANK", 0))) == 0


@task("evaluate")
def run(cfg: DictConfig, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    resume = cfg.get("resume")
    device = run_device(cfg)
    check_model_device(cfg)  # the trainer places CLIP, explainer and metrics; model.device may only agree with it
    check_loader_keys(cfg.data)  # bad numbers are named before anything is loaded
    limit = check_limit(cfg.get("limit"))
    if resume:
        check_resume_dir(out)  # before anything is built or written
        with open_dict(cfg):  # loggers and the trainer write into the resumed run's dir too
            cfg.paths.output_dir = str(out)
    out.mkdir(parents=True, exist_ok=True)
    clip = instantiate(cfg.model)
    fp = fingerprint(cfg, clip)
    if (out / RUN).is_file():
        check_fingerprint(out, fp, machine(device))
    elif _is_global_zero():
        write_fingerprint(out, fp, machine(device))

    datamodule = build_datamodule(cfg, clip)
    datamodule.prepare_data()
    split = cfg.get("split", "test")
    dataset = datamodule.dataset(split)
    log_items("evaluate", split, len(dataset), limit)
    if len(dataset) == 0:
        raise ValueError(
            f"evaluate: split {split!r} of data.root={cfg.data.get('root')} has no samples to score (after the "
            "skips logged above); check data.root and split=, or the subset / min_box_area settings of data="
        )
    scored = dataset.records if limit is None else dataset.records[:limit]
    overlap = train_overlap(cfg.explainer.get("checkpoint"), dataset, scored, bool(cfg.get("allow_train_overlap")))
    factory = instantiate(cfg.explainer)
    explainer = factory(clip=clip)
    metrics = build_metrics(cfg.metrics, clip)

    # the work: fixed chunks of the split (records.py), cut at `limit`, minus the finished ones
    size = int(cfg.data.get("batch_size", 32))
    all_chunks = list(enumerate(chunks(range(len(dataset)), size)))
    chunk_sizes = {c: len(idx) for c, idx in all_chunks}
    if limit is not None:
        all_chunks = [(c, [i for i in idx if i < limit]) for c, idx in all_chunks]
        all_chunks = [(c, idx) for c, idx in all_chunks if idx]
    done: set[int] = set()
    if resume and _is_global_zero():
        done = {int(r["index"]) for r in merge_items(out, chunk_sizes)}  # unfinished chunks are redone whole
    elif resume:
        done = {int(r["index"]) for r in read_items(out / ITEMS)}
    todo = [(c, idx) for c, idx in all_chunks if not set(idx) <= done]
    if resume:
        log.info("resuming %s: %d samples already scored, %d chunks to do", out, len(done), len(todo))

    keep = datamodule.transform.mode == "keep"
    module = EvalModule(
        explainer,
        metrics,
        TransformedDataset(dataset, datamodule.transform),
        dataset.records,
        todo,
        keep=keep,
        pad_multiple=datamodule.transform.patch_size if keep else 1,
        out=out,
        scorer_kind=cfg.metrics.get("scorer", "cosine"),
        save_maps=bool(cfg.get("save_maps", False)),
        num_workers=int(cfg.data.get("num_workers", 0)),
        explainer_factory=factory,
        transform=datamodule.transform,
        pin_memory=bool(cfg.data.get("pin_memory", False)),
    )
    loggers = instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=[ItemsProgressBar(interval=float(cfg.get("progress_interval", 30.0)))],
        use_distributed_sampler=False,  # the engine shards whole chunks itself (nothing padded)
        enable_checkpointing=False,
    )
    t0 = time.perf_counter()
    if todo:
        trainer.test(module, verbose=False)
    else:
        log.info("nothing left to do: every sample of %s has a record", out)
    results: dict[str, Any] = {}
    if trainer.is_global_zero:
        results, metrics = _finish(cfg, out, split, dataset, module, clip, explainer, datamodule, loggers, fp)
        if overlap is not None:
            results["train_overlap"] = overlap  # images / samples shared with the HSRM's training data
        results["seconds"] = _seconds(out, time.perf_counter() - t0)
        save_metrics(results, out, cfg=cfg)
        announce(out)
    return results, {"clip": clip, "datamodule": datamodule, "explainer": explainer, "metrics": metrics,
                     "trainer": trainer, "module": module}  # fmt: skip


def _seconds(out: Path, this_session: float) -> float:
    """Wall time over every session of the run (kept in run_time.txt beside run.json)."""
    path = out / "run_time.txt"
    before = float(path.read_text()) if path.is_file() else 0.0
    path.write_text(f"{before + this_session}\n")
    return before + this_session


def _finish(cfg, out, split, dataset, module, clip, explainer, datamodule, loggers, fp) -> tuple[dict[str, Any], dict]:
    """Rank 0: merge the item files, rebuild the metrics from the records, write figures, log.
    Returns (results, the rebuilt metric objects)."""
    records = merge_items(out)
    limit = cfg.get("limit")
    if limit is not None:
        records = [r for r in records if r["index"] < int(limit)]
    metrics = build_metrics(cfg.metrics, clip, sync=False)  # fresh: the records already hold every process's items
    replay(metrics, records)
    results: dict[str, Any] = {}
    for name, m in metrics.items():
        results.update(_scalars(f"{split}/{name}", m.compute()))
    results["outputs"] = outputs_of(metrics, split)  # what each key means (the paper tables read it)
    scored = [r for r in records if "skip" not in r]
    truncated = {r["prompt"]: r["prompt_tokens"] for r in scored if r.get("prompt_tokens")}
    skipped = Counter(dict(dataset.skipped))  # found when indexing (per file / box)
    for r in records:
        if "skip" in r:
            skipped[f"loading/{r['skip']}"] += 1
        elif r.get("n_boxes_cropped_out"):
            skipped["loading/box_cropped_out"] += r["n_boxes_cropped_out"]
    per_category = figures.per_category(records, metrics)
    items_table = write_items_parquet(records, out / ITEMS_PARQUET)  # the same records, flat (aggregate.py --items)
    results.update(
        {
            f"{split}/samples": len(scored),
            f"{split}/skipped_samples": len(records) - len(scored),
            "explainer": OmegaConf.to_container(cfg.explainer, resolve=True),
            "explainer_label": getattr(explainer, "label", cfg.explainer.get("name")),  # e.g. gradcam[variant=...]
            "skipped": dict(skipped),
            "per_category": per_category,
            "items": str(out / ITEMS),
            "items_table": str(items_table),
            # prompts cut to the text tower's context: {prompt: {"kept": n, "total": m}} (tokens, start/end included)
            "truncated_prompts": truncated,
            "code": fp["code"],
        }
    )
    if module.live and not cfg.get("resume") and limit is None:
        _cross_check(module.live, metrics, split, results)
    paths = figures.write_all(out, records, metrics, dataset, datamodule.transform, explainer, keep=module.keep,
                              seed=int(cfg.seed), n=int(cfg.get("figure_samples", 8)))  # fmt: skip
    _log(loggers, results, per_category, paths)
    return results, metrics


def _cross_check(live: dict[str, Any], metrics, split: str, results: dict[str, Any]) -> None:
    """The torchmetrics values synced across processes during the loop must match the rebuilt ones."""
    for name, value in live.items():
        for k, v in _scalars(f"{split}/{name}", value).items():
            a, b = torch.as_tensor(v, dtype=torch.float64), torch.as_tensor(results[k], dtype=torch.float64)
            if not (torch.isnan(a) & torch.isnan(b)).all() and not torch.allclose(a, b, atol=1e-5, equal_nan=True):
                log.warning("%s: synced value %.6f differs from the records' %.6f", k, float(a), float(b))


def _log(loggers: list, results: dict[str, Any], per_category: dict[str, float], paths: dict[str, Path]) -> None:
    """Scalars, the per-category table, sample overlays and curves to every configured logger."""
    scalars = {k: float(v) for k, v in results.items() if isinstance(v, int | float | torch.Tensor)}
    scalars.update({f"per_category/{k}": v for k, v in per_category.items()})
    for lg in loggers:
        lg.log_metrics(scalars)
        if type(lg).__name__ == "WandbLogger":
            lg.log_table(key="per_category", columns=["category", "pointing_game"],
                         data=[[k, v] for k, v in per_category.items()])  # fmt: skip
            for key, path in paths.items():
                lg.log_image(key=f"figures/{key}", images=[str(path)])
        lg.save()
