"""Folder-mode throughput (explain.py images=DIR) against explaining the same images directly, side by side in one
run (issue 25 target; CPU).

A folder of 50 files: 47 shapes-world images of various sizes (48-320 px sides, non-square too) and modes (RGB
PNG, L, RGBA, P, CMYK JPEG, RGB JPEG) and 3 broken files (a truncated PNG, a text file named .jpg, an empty file).
Grad-ECLIP, 2 prompts shared by every image, batch size 16, on two models (``--settings``): ViT-B/16 at 224 px
(random weights: the cost of a real explanation) and the tiny shapes CLIP (64 px, committed weights). Paths,
timed back to back in each round (medians over rounds; images/s counts the 47 good images):
  * direct   = what a researcher's own loop costs: decode each good file with mmel's decoder, the explain
               transform, then ``explain_batch`` per 16 images (no writing, broken files already left out);
  * program  = :func:`mmel.explain_folder.explain_folder` from the file list (``list_images``) into a fresh run
               dir: decoding with skip-and-count of the broken files, the same batches, the CLIP's scores, maps
               npz, journal, results parquet + CSV, summary; ``overlays=false`` and ``overlays=true`` (one PNG per
               (image, prompt) at the image's own size, written by the background writer thread).
  * direct + scores = direct plus the CLIP's cosine of each image with each prompt (``ClipScorer``, one no-grad
               image forward per batch, as the one-image path reports them): what the program's table would cost
               with a forward of its own for the scores (it takes them from Grad-ECLIP's forward instead, once the
               first batch shows they are the stock CLIP's).
Ratios are medians over rounds of the per-round ratio (the paths of a round run back to back), which keeps them
steady on a shared machine where absolute rates drift. Target (ViT-B/16): program / direct >= 0.8 for
overlays=false and for overlays=true. Exit status 1 when a target is missed.

Why the target is checked on ViT-B/16 and only reported on the tiny CLIP: the target bounds what the folder mode
adds to explaining (scan, decode with skip-and-count, scores, npz + fsync'ed journal per batch, overlay PNGs,
parquet + CSV). On the tiny CLIP the whole explanation of 47 images takes ~0.1 s (2 ms an image), less than encoding
the 94 overlay PNGs (~3 ms each), so the outputs alone are several times the work; a real model's explanation
costs 100 x more per image while the outputs cost the same, which is the regime the target speaks of.

Measured (quiet 2-core AMD EPYC, torch 2.14.1): ViT-B/16, 2 rounds: direct 3.8 images/s, program 0.90 x
(overlays=false) and 1.01 x (overlays=true); tiny, 3 rounds: direct 556 images/s, program 0.84 x without overlays,
0.25 x with them. The program's scores come from Grad-ECLIP's own forward once a one-image check shows they are the
stock CLIP's; a separate scoring forward would cost 0.50 x on ViT-B/16 ("direct + scores").
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PROMPTS = ["a red circle", "a blue square"]
SIDES = [(48, 48), (64, 64), (96, 72), (128, 128), (200, 150), (320, 240), (64, 160)]
MODES = ["RGB", "L", "RGBA", "P", "CMYK", "JPEG"]
TARGET = 0.8


def make_folder(root: Path) -> list[str]:
    """47 good images (sizes and modes cycled) and 3 broken files under ``root``; returns the broken names."""
    from mmel.data.shapes.world import sample_scene

    root.mkdir(parents=True, exist_ok=True)
    for i in range(47):
        w, h = SIDES[i % len(SIDES)]
        px = sample_scene(np.random.default_rng(i), size=max(w, h)).pixels[:h, :w]
        img, mode = Image.fromarray(np.ascontiguousarray(px)), MODES[i % len(MODES)]
        sub = root / ("sub" if i % 5 == 0 else "")
        sub.mkdir(exist_ok=True)
        if mode == "CMYK":
            img.convert("CMYK").save(sub / f"img{i:02d}_cmyk.jpg", quality=90)
        elif mode == "JPEG":
            img.save(sub / f"img{i:02d}.jpg", quality=90)
        else:
            img.convert(mode).save(sub / f"img{i:02d}_{mode.lower()}.png")
    data = (root / "img01_l.png").read_bytes()
    (root / "broken_truncated.png").write_bytes(data[: len(data) // 2])
    (root / "broken_text.jpg").write_text("this is not a jpeg\n")
    (root / "broken_empty.png").write_bytes(b"")
    return ["broken_truncated.png", "broken_text.jpg", "broken_empty.png"]


def direct(paths: list[str], clip, explainer, batch: int, scores: bool = False) -> int:
    """Decode + transform + ``explain_batch`` per ``batch`` images (the model's square: one size per batch);
    ``scores``: also the CLIP's cosines of the batch (the no-grad image forward the program adds for its table)."""
    from mmel.data.base import load_image
    from mmel.explain import preprocess
    from mmel.metrics import ClipScorer

    scorer = ClipScorer(clip, PROMPTS) if scores else None
    n = 0
    for i in range(0, len(paths), batch):
        xs = torch.stack([preprocess(load_image(p), clip, "model") for p in paths[i : i + batch]])
        n += len(explainer.explain_batch(xs, [PROMPTS] * len(xs)))
        if scorer is not None:
            scorer.cosines(xs)
    return n


SETTINGS = {  # name -> (model, pretrained, whether the target applies)
    "vitb16": ("ViT-B-16-quickgelu", None, True),
    "tiny": ("mmel-tiny", "shapes", False),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--settings", default="vitb16,tiny", help=f"comma-separated subset of {list(SETTINGS)}")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    ok = True
    for name in args.settings.split(","):
        model, pretrained, checked = SETTINGS[name]
        ok &= bench(model, pretrained, checked, args.rounds, args.batch_size)
    print("\nall targets met" if ok else "\nSOME TARGETS MISSED")
    return 0 if ok else 1


def bench(model: str, pretrained: str | None, checked: bool, rounds: int, batch_size: int) -> bool:
    """One setting's four paths side by side; True when its target holds (or it has none)."""
    from mmel.backbone import load_clip
    from mmel.explain_folder import explain_folder, list_images, prompts_of
    from mmel.explainers import build_explainer

    clip = load_clip(model, pretrained=pretrained)
    explainer = build_explainer("grad_eclip", clip)
    tmp = Path(tempfile.mkdtemp(prefix="bench_explain_folder_"))
    try:
        broken = make_folder(tmp / "imgs")
        entries = list_images(str(tmp / "imgs"))
        good = [e.path for e in entries if e.key not in broken]
        assert len(entries) == 50 and len(good) == 47, (len(entries), len(good))

        def program(overlays: bool, r: int) -> dict:
            es = list_images(str(tmp / "imgs"))
            out = tmp / f"run_{overlays}_{r}"
            return explain_folder(es, prompts_of(es, PROMPTS, {}), clip, explainer, out, resize="model",
                                  batch_size=batch_size, overlays=overlays, progress=False)  # fmt: skip

        paths = {
            "direct": lambda r: direct(good, clip, explainer, batch_size),
            "direct + scores": lambda r: direct(good, clip, explainer, batch_size, scores=True),
            "program (overlays=false)": lambda r: program(False, r),
            "program (overlays=true)": lambda r: program(True, r),
        }
        for fn in paths.values():  # warm-up: thread pools, allocator, lazy imports (matplotlib, pyarrow)
            fn(-1)
        times: dict[str, list[float]] = {k: [] for k in paths}
        result = {}
        for r in range(rounds):
            for k, fn in paths.items():
                t0 = time.perf_counter()
                res = fn(r)
                times[k].append(time.perf_counter() - t0)
                if k.startswith("program"):
                    result[k] = res
        expected = {"corrupt_image": 1, "not_an_image": 2}
        for k, res in result.items():  # the program did the whole work: 47 explained, the 3 broken counted
            got = res["images"]
            assert got["done"] == 47 and got["skipped_by_reason"] == expected, (k, got)
        rate = {k: 47 / statistics.median(t) for k, t in times.items()}
        print(f"\n50 files (47 images, 3 broken), {model} ({pretrained or 'random weights'}), grad_eclip, "
              f"{len(PROMPTS)} prompts, "
              f"batch {batch_size}, {rounds} round(s), medians:")  # fmt: skip
        for k in paths:
            print(f"  {k:26s} {rate[k]:7.1f} images/s   median {statistics.median(times[k]):6.2f} s", flush=True)
        ok = True
        for k in result:  # per round the two paths ran back to back: the median of the per-round ratios
            ratio = statistics.median(d / t for d, t in zip(times["direct"], times[k], strict=True))
            bound = statistics.median(d / t for d, t in zip(times["direct"], times["direct + scores"], strict=True))
            verdict = ("ok" if ratio >= TARGET else "MISSED") if checked else "reported only: see the docstring"
            ok &= ratio >= TARGET or not checked
            print(f"  {k} / direct = {ratio:.2f} (target >= {TARGET}: {verdict}; "
                  f"direct + scores / direct = {bound:.2f})")  # fmt: skip
        print(result["program (overlays=true)"]["summary"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ok


if __name__ == "__main__":
    sys.exit(main())
