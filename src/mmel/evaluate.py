"""The `evaluate` program: score one explainer on a dataset split with the localisation metrics.

    python evaluate.py model=tiny data=shapes explainer=grad_eclip split=test
    python evaluate.py ... resume=logs/evaluate/runs/<dir>      # continue an interrupted run in its own dir

Images are explained once for all their prompts (docs/grad_eclip.md, Batching): consecutive samples of a batch
that share an image are one explainer call with K prompts. Metrics are computed in the frame the model saw: in
`keep` resize mode the maps are resized back to the original image and scored against the original boxes (tolerances in
original pixels); in `fixed` mode (centre crop) against the boxes transformed into the crop.

Long runs lose nothing: after every `checkpoint_every` images the metric states and the ids of the finished
samples are written atomically to `eval_state.pt`; `resume=<run dir>` reloads them and skips finished samples.
Unreadable images and degenerate boxes are skipped and counted (`skipped` in metrics.json).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchmetrics import Metric

from mmel.metrics import ClipScorer, difficult_flags
from mmel.utils.runs import announce, build_datamodule, output_dir, save_metrics

log = logging.getLogger(__name__)
STATE_FILE = "eval_state.pt"


def image_groups(batch: dict[str, Any]) -> Iterator[list[int]]:
    """Indices of consecutive batch entries that share an image (one explainer call each)."""
    ids = batch["image_id"]
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            yield list(range(start, i))
            start = i


def build_metrics(cfg: DictConfig, clip=None) -> dict[str, Metric]:
    """One Metric per entry of the `metrics` config group that has a `_target_` and is not disabled.

    With a CLIP bundle, deletion/insertion learns its pixel normalisation (to build fills in pixel space)."""
    out = {}
    for name, node in cfg.items():
        if isinstance(node, DictConfig) and "_target_" in node and node.get("enabled", True) is not False:
            kwargs = {k: v for k, v in node.items() if k != "enabled"}
            if clip is not None and str(node._target_).endswith("DeletionInsertion"):
                kwargs.update(pixel_mean=list(clip.mean), pixel_std=list(clip.std))
            out[name] = instantiate(OmegaConf.create(kwargs))
    if not out:
        raise ValueError("evaluate: the metrics config enables no metric (each needs a `_target_`)")
    return out


def _save_state(path: Path, done: set[str], metrics: dict[str, Metric], elapsed: float) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {"done": sorted(done), "metrics": {k: m.state_dict() for k, m in metrics.items()}, "elapsed": elapsed}, tmp
    )
    os.replace(tmp, path)  # never a half-written state


def _load_state(path: Path, metrics: dict[str, Metric]) -> tuple[set[str], float]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if set(state["metrics"]) != set(metrics):
        raise ValueError(f"{path}: saved metrics {sorted(state['metrics'])} differ from configured {sorted(metrics)}")
    for k, m in metrics.items():
        m.load_state_dict(state["metrics"][k])
    return set(state["done"]), float(state.get("elapsed", 0.0))


def _scalars(name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {f"{name}/{k}": v for k, v in value.items()}
    return {name: value}


def run(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    pl.seed_everything(cfg.seed, workers=True)
    resume = cfg.get("resume")
    out = Path(resume) if resume else output_dir(cfg)
    if resume and not out.is_dir():
        raise FileNotFoundError(f"resume={resume}: no such run dir (give the dir of the interrupted run)")
    out.mkdir(parents=True, exist_ok=True)
    clip = instantiate(cfg.model)
    datamodule = build_datamodule(cfg, clip)
    datamodule.prepare_data()
    split = cfg.get("split", "test")
    loader = getattr(datamodule, f"{split}_dataloader")()
    dataset = datamodule.dataset(split)
    explainer = instantiate(cfg.explainer)(clip=clip)
    metrics = build_metrics(cfg.metrics, clip)
    for m in metrics.values():
        m.persistent(True)  # their states go into eval_state.pt
    scorer = _scorer(cfg, clip, dataset) if "deletion_insertion" in metrics else None

    state_path = out / STATE_FILE
    done, elapsed = _load_state(state_path, metrics) if resume and state_path.is_file() else (set(), 0.0)
    if resume:
        log.info("resuming %s: %d samples already scored", out, len(done))
    keep = datamodule.transform.mode == "keep"
    prompts_per_image = Counter(str(r.image_id) for r in dataset.records)
    limit = cfg.get("limit")
    every = int(cfg.get("checkpoint_every", 50))
    n_images = 0
    t0 = time.perf_counter()
    for batch in loader:
        if batch is None:
            continue
        for idx in image_groups(batch):
            idx = [i for i in idx if str(batch["sample_id"][i]) not in done]
            if not idx or (limit is not None and len(done) >= limit):
                continue
            if limit is not None:
                idx = idx[: limit - len(done)]
            _score_image(batch, idx, explainer, metrics, scorer, keep, prompts_per_image)
            done.update(str(batch["sample_id"][i]) for i in idx)
            n_images += 1
            if n_images % every == 0:
                _save_state(state_path, done, metrics, elapsed + time.perf_counter() - t0)
        if limit is not None and len(done) >= limit:
            break
    elapsed += time.perf_counter() - t0
    _save_state(state_path, done, metrics, elapsed)

    results: dict[str, Any] = {}
    for name, m in metrics.items():
        results.update(_scalars(f"{split}/{name}", m.compute()))
    results.update(
        {
            f"{split}/samples": len(done),
            "explainer": OmegaConf.to_container(cfg.explainer, resolve=True),
            "skipped": dict(datamodule.skipped),
            "seconds": elapsed,
        }
    )
    save_metrics(results, out, cfg=cfg)
    announce(out)
    return results, {"clip": clip, "datamodule": datamodule, "explainer": explainer, "metrics": metrics}


def _score_image(batch, idx, explainer, metrics, scorer, keep: bool, prompts_per_image: Counter) -> None:
    """Explain one image for the prompts of the samples ``idx`` and update every metric with those pairs."""
    i0 = idx[0]
    image = batch["images"][i0]
    if "valid" in batch:  # crop the padding of keep-size batches away
        rows, cols = batch["valid"][i0].any(1).nonzero(), batch["valid"][i0].any(0).nonzero()
        image = image[:, : int(rows.max()) + 1, : int(cols.max()) + 1]
    prompts = [batch["prompt"][i] for i in idx]
    with torch.enable_grad():
        maps = explainer(image[None], prompts)[0].detach()  # [K, h, w]
    if keep:
        boxes = [torch.as_tensor(batch["boxes_orig"][i], dtype=torch.float32) for i in idx]
        sizes = torch.tensor([list(batch["size"][i]) for i in idx])
    else:
        boxes = [torch.as_tensor(batch["boxes"][i], dtype=torch.float32) for i in idx]
        sizes = torch.tensor([list(maps.shape[-2:])] * len(idx))
    categories = [str(batch["category"][i]) for i in idx] if "category" in batch else None
    for name, m in metrics.items():
        if name == "deletion_insertion":
            targets = torch.tensor([scorer.index(p) for p in prompts])
            m.update(maps, image[None].expand(len(idx), -1, -1, -1), targets, scorer=scorer)
        elif name == "pointing_game":
            distractor = prompts_per_image[str(batch["image_id"][i0])] > 1
            m.update(maps, boxes, sizes, categories=categories, difficult=difficult_flags(boxes, sizes, distractor))
        else:
            m.update(maps, boxes, sizes)


def _scorer(cfg: DictConfig, clip, dataset) -> ClipScorer:
    """One scorer over the dataset's distinct prompts (deletion/insertion targets are their positions)."""
    prompts = sorted({r.prompt for r in dataset.records})
    return ClipScorer(clip, prompts, kind=cfg.metrics.get("scorer", "cosine"))
