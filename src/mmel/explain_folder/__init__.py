"""The `explain` program's folder mode: maps, overlays and one results table for many images.

    python explain.py images=DIR 'prompts=[a red circle, a blue square]'   # every file under DIR (recursive)
    python explain.py images=LIST.txt prompts_file=prompts.jsonl          # one path a line; prompts per image
    python explain.py images=imagefolder:DIR ...                         # a Hugging Face `imagefolder` (datasets)
    python explain.py images=DIR ... resume=logs/explain/runs/<dir>      # finish an interrupted run in its dir

Prompts are given once for every image (``prompts=[...]``) or per image (``prompts_file=FILE.jsonl``, lines
``{"image": "rel/path.png", "prompts": [...]}``, the image named as in the results table: relative to DIR, or as
written in the list; with both, ``prompts`` is the default for images the file does not name). An image's name
(its *key*) is its path relative to DIR (folders, imagefolder) or the line of the list (relative lines are read
against the list's folder). Images are decoded, converted and transformed exactly as in the one-image path
(:mod:`mmel.explain`, :mod:`mmel.data.base`) and explained ``batch_size`` at a time with the explainer's
``explain_batch`` (one forward and one batched VJP per batch; a batch holds images of one input size, so in
``keep`` mode images are grouped by size).

The run dir holds ``run.json`` (the settings a re-run must match), ``items.jsonl`` (the journal: one record per
(image, prompt), appended and fsync'ed per batch after the batch's files), ``maps/batch_<attempt>_<n>.npz`` (float32
maps [K, h, w] at the explained input size, keyed by image key), ``overlays/<key>/overlay_<k>_<prompt>.png`` (at the
image's own size; ``overlays=false`` skips them), ``results.parquet`` and ``results.csv`` (one table, one row per
(image, prompt) and one per skipped file, rebuilt from the journal) and ``metrics.json`` (the summary). Files that
cannot be explained (not an image, truncated, unreadable, no prompts) are skipped and counted by reason, never
abort the run. Re-running into the same dir (``resume=DIR``, or the same explicit ``hydra.run.dir``) skips the
images whose records are complete for the same prompts; a killed run loses only the batch in flight.

Table columns: ``image`` (the key), ``path``, ``prompt``, ``index`` (its place in the image's prompt list),
``score`` (the CLIP's unscaled cosine at the explained input, as the one-image path reports), ``peak_y``/``peak_x``
(the map's maximum, first in raster order, on its own ``map_h`` x ``map_w`` grid), ``image_h``/``image_w``,
``tokens``/``tokens_kept`` (the prompt's tokens and those the context keeps), ``status`` (``ok`` or the reason:
``not_an_image``, ``corrupt_image``, ``missing``, ``unreadable``, ``no_prompts``, ``too_large``: more memory than
the device has, even alone), ``error``, ``maps_file``,
``overlay``, ``batch``. ``metrics.json``: ``images`` (total, done, done_this_run, done_before, skipped,
skipped_by_reason, the first skipped files per reason), ``items``, ``images_per_s`` (this run), the settings.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from mmel.evaluation.records import ITEMS, RUN, check_fingerprint, read_items, write_fingerprint
from mmel.explain import DEFAULT_MAX_SIDE
from mmel.explain import run as run_one
from mmel.explain_folder.batches import TABLE, FolderExplainer, is_done, latest_records, repair_journal, write_table
from mmel.explain_folder.inputs import Entry, list_images, prompts_of, read_prompts_file
from mmel.explainers.base import check_prompts
from mmel.utils.placement import autocast, precision_key
from mmel.utils.runs import announce, save_metrics
from mmel.utils.task import task

__all__ = ["Entry", "explain_folder", "list_images", "prompts_of", "read_prompts_file", "run"]
log = logging.getLogger(__name__)
TASK = "explain_folder"


def fingerprint(cfg: DictConfig, clip) -> dict[str, Any]:
    """What decides the maps: explainer and options, model and weights, input size policy (not batch_size)."""
    return {
        "explainer": OmegaConf.to_container(cfg.explainer, resolve=True),
        "model": {"name": getattr(clip, "name", None), "fingerprint": getattr(clip, "fingerprint", None)},
        "resize": cfg.get("resize", "auto"),
        "max_side": cfg.get("max_side", DEFAULT_MAX_SIDE),
        "alpha": cfg.get("alpha", 0.5),
        **({"precision": precision_key(cfg.get("precision"))} if precision_key(cfg.get("precision")) else {}),
    }


def _shared_prompts(cfg: DictConfig) -> list[str] | None:
    if OmegaConf.is_missing(cfg, "prompts") or cfg.get("prompts") is None:
        return None
    prompts = cfg.prompts
    if isinstance(prompts, ListConfig):
        prompts = OmegaConf.to_container(prompts)
    return check_prompts([prompts] if isinstance(prompts, str) else prompts)


def run(cfg: DictConfig) -> tuple[dict, dict]:
    """The explain program: folder mode when ``images=`` is given, else the one-image :func:`mmel.explain.run`."""
    return run_one(cfg) if cfg.get("images") is None else run_folder(cfg)


@task("explain")
def run_folder(cfg: DictConfig, out: Path) -> tuple[dict, dict]:
    """The folder mode (``images=DIR|LIST.txt|imagefolder:DIR``) in its run dir ``out`` (see the module docstring)."""
    images = cfg.images
    if not OmegaConf.is_missing(cfg, "image") and cfg.get("image") is not None:
        raise ValueError(f"image={cfg.image} and images={images} are both given; give one (image= for one file)")
    shared, per_image = _shared_prompts(cfg), {}
    if cfg.get("prompts_file"):
        per_image = read_prompts_file(cfg.prompts_file)
    elif shared is None:
        raise ValueError("prompts: missing; with images= pass 'prompts=[...]' or prompts_file=FILE.jsonl")
    resume = cfg.get("resume")
    if resume and not (out / RUN).is_file():
        raise FileNotFoundError(f"resume={out}: not a folder-explain run dir (it has no {RUN})")
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    entries = list_images(str(images), exclude=out, cache_dir=str(Path(cfg.paths.cache_dir) / "datasets"))
    prompts = prompts_of(entries, shared, per_image)

    clip = instantiate(cfg.model)
    explainer = instantiate(cfg.explainer)(clip=clip)
    out.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(cfg, clip)
    if (out / RUN).is_file():
        check_fingerprint(out, fp, task=TASK)
    else:
        write_fingerprint(out, fp, task=TASK)
    with autocast(clip.device, cfg.get("precision", "fp32")):
        summary = explain_folder(
            entries,
            prompts,
            clip,
            explainer,
            out,
            resize=cfg.get("resize", "auto"),
            max_side=cfg.get("max_side", DEFAULT_MAX_SIDE),
            batch_size=int(cfg.get("batch_size", 16)),
            overlays=bool(cfg.get("overlays", True)),
            alpha=cfg.get("alpha", 0.5),
        )
    summary["images_source"] = str(images)
    save_metrics(summary, out, cfg=cfg)
    print(summary["summary"], flush=True)
    announce(out)
    return summary, {"clip": clip, "explainer": explainer}


def explain_folder(entries: list[Entry], prompts: dict[str, Any], clip, explainer, out: str | os.PathLike, *,
                   resize: str = "auto", max_side: int | None = DEFAULT_MAX_SIDE, batch_size: int = 16,
                   overlays: bool = True, alpha: float = 0.5, progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Explain ``entries`` (:func:`list_images`) for ``prompts`` ({key: prompt list or None}) into ``out``,
    skipping the images already done there; returns the summary (also the table's source: the journal)."""
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    repair_journal(out / ITEMS)
    before = latest_records(out)
    todo = [e for e in entries if not is_done(before.get(e.key, []), prompts.get(e.key))]
    if len(todo) < len(entries):
        log.info("%s: %d of %d images already done, %d to do", out, len(entries) - len(todo), len(entries), len(todo))
    attempt = 1 + max((int(r["batch"].split("_")[1]) for r in read_items(out / ITEMS)), default=-1)
    worker = FolderExplainer(clip, explainer, out, resize=resize, max_side=max_side, batch_size=batch_size,
                             overlays=overlays, alpha=alpha, attempt=attempt)  # fmt: skip
    t0 = time.perf_counter()
    terminal = bool(getattr(sys.stdout, "isatty", lambda: False)())
    bar = tqdm(total=len(todo), unit="img", desc="explain", disable=not progress or not todo, dynamic_ncols=True,
               mininterval=0.5 if terminal else 30.0)  # fmt: skip  # off a terminal: a line every 30 s
    with bar:
        counts = worker.run(todo, prompts, bar)
    seconds = time.perf_counter() - t0

    keys = {e.key for e in entries}
    final = {k: rows for k, rows in latest_records(out).items() if k in keys}
    n_rows = write_table(out, final)
    status = {k: rows[0]["status"] for k, rows in final.items()}
    done = sum(s == "ok" for s in status.values())
    skipped = Counter(s for s in status.values() if s != "ok")
    examples = {r: sorted(k for k, s in status.items() if s == r)[:10] for r in skipped}
    items = sum(len(rows) for k, rows in final.items() if status[k] == "ok")
    ips = counts["done"] / seconds if seconds > 0 else 0.0
    line = (
        f"explained {done} of {len(entries)} files ({counts['done']} this run, {done - counts['done']} before), "
        f"{items} (image, prompt) maps; skipped {sum(skipped.values())}"
        + (f" ({', '.join(f'{r}: {n}' for r, n in sorted(skipped.items()))})" if skipped else "")
        + f"; {ips:.1f} images/s"
    )
    log.info(line)
    for reason, files in examples.items():
        log.warning("skipped (%s): %s%s", reason, ", ".join(files), " ..." if skipped[reason] > len(files) else "")
    return {
        "images": {
            "total": len(entries),
            "done": done,
            "done_this_run": counts["done"],
            "done_before": done - counts["done"],
            "skipped": sum(skipped.values()),
            "skipped_by_reason": dict(sorted(skipped.items())),
            "skipped_files": examples,
        },
        "items": items,
        "rows": n_rows,
        "seconds": seconds,
        "images_per_s": ips,
        "batch_size": batch_size,
        "resize": worker.resize,
        "max_side": max_side if worker.resize == "keep" else None,
        "explainer": getattr(explainer, "name", type(explainer).__name__),
        "mode": getattr(explainer, "mode", None),
        "model": getattr(clip, "name", None),
        "files": {
            "table": [f"{TABLE}.parquet", f"{TABLE}.csv"],
            "journal": ITEMS,
            "maps": "maps/",
            "overlays": "overlays/" if overlays else None,
        },  # fmt: skip
        "summary": line,
    }
