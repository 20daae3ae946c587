"""Folder mode's work: images explained ``batch_size`` at a time (one ``explain_batch`` call per batch of one input
size), each batch's maps (npz), overlays (PNG) and records (the journal ``items.jsonl``) written by a background
thread, and the results table rebuilt from the journal.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmel.evaluation.records import ITEMS, ItemWriter, read_items
from mmel.explain import RESIZE_MODES, _slug, check_memory, overlay, preprocess
from mmel.explain_folder.inputs import Entry, decode
from mmel.metrics import ClipScorer

log = logging.getLogger(__name__)
TABLE = "results"  # results.parquet and results.csv
# zlib level of the overlay PNGs: still lossless; on shapes-world overlays 1.7x faster to write than PIL's
# default 6 for ~15% larger files (measured at 320x240), and writing PNGs is most of a folder run's extra cost
PNG_LEVEL = 1
COLUMNS = (  # the table's columns, in order
    ("image", "string"), ("path", "string"), ("prompt", "string"), ("index", "int64"), ("score", "float64"),
    ("peak_y", "int64"), ("peak_x", "int64"), ("map_h", "int64"), ("map_w", "int64"), ("image_h", "int64"),
    ("image_w", "int64"), ("tokens", "int64"), ("tokens_kept", "int64"), ("status", "string"), ("error", "string"),
    ("maps_file", "string"), ("overlay", "string"), ("batch", "string"),
)  # fmt: skip


def _token_counts(clip, prompt: str) -> tuple[int | None, int | None]:
    """(real tokens of the prompt, tokens the model keeps: at most its context minus start and end)."""
    tok = clip.tokenizer
    if not hasattr(tok, "encode"):
        return None, None
    n = len(tok.encode(prompt))
    return n, min(n, clip.model.context_length - 2)


# ------------------------------------------------------------------------------------------------ the work
@dataclass
class _Item:
    entry: Entry
    image: Image.Image
    x: torch.Tensor  # [3, H, W] normalised model input
    prompts: list[str]


class FolderExplainer:
    """Explains entries batch by batch into ``out`` (see the module docstring); the writing of a batch's files
    and records runs in one background thread while the next batch is computed."""

    def __init__(self, clip, explainer, out: Path, *, resize: str, max_side: int | None, batch_size: int,
                 overlays: bool = True, alpha: float = 0.5, attempt: int = 0) -> None:  # fmt: skip
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize={resize!r}: expected one of {RESIZE_MODES}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected a positive number of images per batch")
        if resize == "auto":
            resize = "keep" if getattr(explainer, "mode", None) == "official" else "model"
        self.clip, self.explainer, self.out = clip, explainer, out
        self.resize, self.max_side, self.batch_size = resize, max_side, batch_size
        self.overlays, self.alpha = overlays, alpha
        self._scorer: ClipScorer | None = None
        self._reuse: bool | None = None  # whether the explainer's own forward gives the CLIP's features (batch 1)
        self._tokens: dict[str, tuple[int | None, int | None]] = {}
        self._pending: list[dict[str, Any]] = []  # skip records waiting for the next write
        self._future: Future | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="explain-writer")
        self._writer = ItemWriter(out / ITEMS)
        self.attempt = attempt  # batch names batch_<attempt>_<n>: a re-run never reuses an earlier run's files
        self.n_batches = 0

    def run(self, entries: list[Entry], prompts: dict[str, Any], bar=None) -> Counter:
        """Explain ``entries`` (prompts[key]: the image's prompt list or None); returns this run's counts."""
        counts: Counter = Counter()
        buckets: dict[tuple[int, int], list[_Item]] = {}
        try:
            for e in entries:
                img, reason, msg = decode(e) if prompts.get(e.key) else (None, "no_prompts", "no prompts given")
                if img is None:
                    self._pending.append(_skip_record(e, reason, msg))
                    counts[f"skipped/{reason}"] += 1
                    if bar is not None:
                        bar.update(1)
                    continue
                x = preprocess(img, self.clip, self.resize, self.max_side)
                bucket = buckets.setdefault(tuple(x.shape[-2:]), [])
                bucket.append(_Item(e, img, x, prompts[e.key]))
                if len(bucket) == self.batch_size:
                    counts["done"] += self._flush(buckets.pop(tuple(x.shape[-2:])), bar)
                elif sum(map(len, buckets.values())) > 4 * self.batch_size:  # many sizes: bound the memory held
                    counts["done"] += self._flush(buckets.pop(max(buckets, key=lambda s: len(buckets[s]))), bar)
            for size in list(buckets):
                counts["done"] += self._flush(buckets.pop(size), bar)
            if self._pending:
                self._submit([], None)  # skip records after the last batch
        finally:
            self.close()
        return counts

    def close(self) -> None:
        """Wait for the writes in flight (their errors surface here) and close the journal."""
        if self._future is not None:
            future, self._future = self._future, None
            future.result()
        self._pool.shutdown(wait=True)
        self._writer.close()

    def _flush(self, items: list[_Item], bar) -> int:
        """Explain one batch (images of one input size) and hand it to the writer; returns the images explained.

        A batch the device cannot hold is split in halves; one image that alone does not fit is skipped
        (``too_large``, with the memory estimate), not the end of the run."""
        H, W = items[0].x.shape[-2:]
        try:
            check_memory(self.clip, self.explainer, (H, W), max(len(it.prompts) for it in items), batch=len(items))
        except MemoryError as e:
            if len(items) > 1:
                half = len(items) // 2
                return self._flush(items[:half], bar) + self._flush(items[half:], bar)
            self._pending.append(_skip_record(items[0].entry, "too_large", str(e)))
            if bar is not None:
                bar.update(1)
            return 0
        xs = torch.stack([it.x for it in items]).to(self.clip.device)  # [B, 3, H, W]
        with _PooledFeatures(self.clip.model.visual) as pooled:
            maps = [m.detach().cpu() for m in self.explainer.explain_batch(xs, [it.prompts for it in items])]
        scores = self._scores(xs, [it.prompts for it in items], pooled.features(len(items)))
        # every torch op here, none in the writer thread: torch ops from a second thread get their own OpenMP team,
        # which competes with this thread's for the cores (explain_batch ran slower in the program than alone)
        peaks = [m.flatten(1).argmax(1).tolist() for m in maps]  # first maximum in raster order, on the map's grid
        full = [self._at_image_size(m, it.image) if self.overlays else None for m, it in zip(maps, items, strict=True)]
        self._submit(items, (maps, scores, peaks, full))
        if bar is not None:
            bar.update(len(items))
        return len(items)

    @staticmethod
    def _at_image_size(m: torch.Tensor, image: Image.Image) -> torch.Tensor:
        """maps [K, h, w] -> [K, H0, W0] at the image's size, as the one-image path resizes them for its overlays."""
        W0, H0 = image.size
        full = torch.nn.functional.interpolate(m[None], size=(H0, W0), mode="bilinear", align_corners=False)
        return full[0].clamp(0, 1)

    def _scores(self, xs: torch.Tensor, prompts: list[list[str]], seen: torch.Tensor | None) -> list[list[float]]:
        """The unscaled cosine of each image with each of its prompts (the CLIP's own, as explain_maps reports).

        ``seen`` [B, E]: the image features of the explainer's own forward, when it made exactly one of the batch.
        They spare the scorer's image forward (a third of Grad-ECLIP's cost on the tiny model) only when the first
        batch shows they are the stock CLIP's (an explainer that alters the forward, e.g. official Grad-ECLIP or
        MaskCLIP, gives other features): then the scores are the scorer's to float rounding."""
        distinct = list(dict.fromkeys(p for ps in prompts for p in ps))
        if self._scorer is None or self._scorer.prompts != distinct:  # shared prompts: text encoded once per run
            self._scorer = ClipScorer(self.clip, distinct)
        cos = None
        if seen is not None and self._reuse is not False:
            cos = torch.nn.functional.normalize(seen.float(), dim=-1) @ self._scorer.text.T  # [B, U]
            if self._reuse is None:
                # checked on the first image (a one-image forward, not the batch's: on ViT-B/16 a whole batch's
                # check cost ~20 % of the run); 1e-5: cosines of two forwards of one model on one input differ by
                # float rounding only, and an altered forward (official mode, MaskCLIP) differs far more
                self._reuse = bool(((cos[:1] - self._scorer.cosines(xs[:1])).abs().max() <= 1e-5).item())
                log.info("scores from the explainer's forward: %s", "yes" if self._reuse else "no (other features)")
        if cos is None or not self._reuse:
            cos = self._scorer.cosines(xs)
        cos = cos.cpu()  # [B, U]
        return [[float(cos[b, self._scorer.index(p)]) for p in ps] for b, ps in enumerate(prompts)]

    def _submit(self, items: list[_Item], result) -> None:
        if self._future is not None:  # at most one batch waits to be written: memory stays bounded
            self._future.result()
        skips, self._pending = self._pending, []
        name = f"batch_{self.attempt:03d}_{self.n_batches:05d}"
        self.n_batches += 1
        self._future = self._pool.submit(self._write, name, items, result, skips)

    def _write(self, name: str, items: list[_Item], result, skips: list[dict[str, Any]]) -> None:
        """The batch's npz, then its overlays, then its records: a recorded image has its files."""
        records = [{**r, "batch": name} for r in skips]
        if items:
            maps, scores, peaks, full = result
            maps_file = f"maps/{name}.npz"
            (self.out / "maps").mkdir(exist_ok=True)
            tmp = self.out / f"maps/{name}.tmp.npz"
            np.savez(tmp, **{it.entry.key: m.numpy().astype(np.float32) for it, m in zip(items, maps, strict=True)})
            os.replace(tmp, self.out / maps_file)
            for it, m, s, pk, f in zip(items, maps, scores, peaks, full, strict=True):
                records += self._records(it, m.shape, s, pk, f, maps_file, name)
        self._writer.write(records)

    def _records(self, it: _Item, shape, scores: list[float], peaks: list[int], full: torch.Tensor | None,
                 maps_file: str, name: str) -> list[dict]:  # fmt: skip
        """One image's records (and overlays: ``full`` [K, H0, W0], the maps at the image's size, or None)."""
        K, h, w = shape
        W0, H0 = it.image.size
        out = []
        for k, p in enumerate(it.prompts):
            if p not in self._tokens:
                self._tokens[p] = _token_counts(self.clip, p)
            ov = None
            if full is not None:  # the one-image path's overlay: the map at the image's size blended over it
                ov = f"overlays/{_safe(it.entry.key)}/overlay_{k}_{_slug(p)}.png"
                (self.out / ov).parent.mkdir(parents=True, exist_ok=True)
                overlay(it.image, full[k], self.alpha).save(self.out / ov, compress_level=PNG_LEVEL)
            n, kept = self._tokens[p]
            out.append({
                "image": it.entry.key, "path": it.entry.path, "prompt": p, "index": k, "score": scores[k],
                "peak_y": peaks[k] // w, "peak_x": peaks[k] % w, "map_h": h, "map_w": w, "image_h": H0,
                "image_w": W0, "tokens": n, "tokens_kept": kept, "status": "ok", "error": None,
                "maps_file": maps_file, "overlay": ov, "batch": name,
            })  # fmt: skip
        return out


class _PooledFeatures:
    """Collects the pooled image features (``visual.ln_post``'s outputs, then ``visual.proj``) of the forwards that
    run inside the ``with`` block; :meth:`features` gives those of a single forward of the batch, else None."""

    def __init__(self, visual) -> None:
        self.visual, self.outs = visual, []

    def __enter__(self) -> _PooledFeatures:
        ln_post = getattr(self.visual, "ln_post", None)  # CNN / timm towers have none: features() is then None
        self._hook = (
            ln_post.register_forward_hook(lambda m, i, out: self.outs.append(out.detach())) if ln_post else None
        )
        return self

    def __exit__(self, *exc) -> None:
        if self._hook is not None:
            self._hook.remove()

    def features(self, batch: int) -> torch.Tensor | None:
        """[B, E] when exactly one forward of ``batch`` images ran (RISE, say, runs many: None)."""
        if self._hook is None or len(self.outs) != 1 or self.outs[0].dim() != 2 or self.outs[0].shape[0] != batch:
            return None
        proj = self.visual.proj
        return self.outs[0] @ proj if proj is not None else self.outs[0]


def _skip_record(e: Entry, reason: str, message: str) -> dict[str, Any]:
    return {**{c: None for c, _ in COLUMNS}, "image": e.key, "path": e.path, "status": reason, "error": message}


def _safe(key: str) -> str:
    """A key as a relative folder inside the run dir (no absolute part, no '..')."""
    parts = [p if p not in ("..", ".") else "_" for p in PurePosixPath(key.lstrip("/")).parts]
    return "/".join(parts) or "_"


# ------------------------------------------------------------------------------------------------ records
def latest_records(out: Path) -> dict[str, list[dict[str, Any]]]:
    """Per image key, its records of the last batch that wrote it (a re-run's records supersede older ones)."""
    per_image: dict[str, list[dict[str, Any]]] = {}
    for r in read_items(out / ITEMS):
        rows = per_image.setdefault(r["image"], [])
        if rows and rows[0]["batch"] != r["batch"]:
            rows.clear()
        rows.append(r)
    return per_image


def repair_journal(path: Path) -> None:
    """Cut a last line that a kill left without its newline, so that appending after it keeps every line whole."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        log.warning("%s: dropping a truncated last line (an interrupted write)", path)
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def is_done(rows: list[dict[str, Any]], prompts: list[str] | None) -> bool:
    """An image is done when its latest records are complete and ok for exactly these prompts."""
    got = sorted((r["index"], r["prompt"]) for r in rows if r["status"] == "ok")
    return bool(prompts) and got == list(enumerate(prompts))


def write_table(out: Path, per_image: dict[str, list[dict[str, Any]]]) -> int:
    """``results.parquet`` and ``results.csv`` (atomically) from the records; returns the number of rows."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rows = [r for key in sorted(per_image) for r in sorted(per_image[key], key=lambda r: r["index"] or 0)]
    schema = pa.schema([(c, getattr(pa, t)()) for c, t in COLUMNS])
    table = pa.Table.from_pylist([{c: r.get(c) for c, _ in COLUMNS} for r in rows], schema=schema)
    for suffix, write in ((".parquet", pq.write_table), (".csv", pacsv.write_csv)):
        tmp = out / f"{TABLE}.tmp{suffix}"
        write(table, str(tmp))
        os.replace(tmp, out / f"{TABLE}{suffix}")
    return len(rows)
