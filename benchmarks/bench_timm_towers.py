"""Milliseconds per map of the tower explainers (docs/towers.md) side by side with the native ViT-B/16 (CPU).

Random weights (timing does not depend on them), 224 px, 1 image x K prompts (default 4); per family:
  * floor = one stock ``encode_image`` + one ``encode_text`` of the K prompts (no gradients);
  * every tower method (grad_eclip, legrad, attention, gradcam, maskclip), timed in the same rounds as the floor
    (round-robin, median over rounds; a machine shared with other jobs then slows all of them alike);
  * ms per map = call time / K, and the ratio to the floor.
Families: open_clip ViT-B-16 (native blocks, the reference row), ViT-B-16-SigLIP, ViT-B-16-SigLIP2, EVA02-B-16,
PE-Core-B-16 (timm trunks) and a transformers SiglipModel of google/siglip-base-patch16-224's shapes (saved to a
temporary folder and loaded with mmel.hf_siglip.load_hf_siglip).

Target (exit status 1 when missed): Grad-ECLIP (layers=1) <= 1.5 x the floor on every family, the target
bench_explainers.py sets for the native ViT. Cost model: on an attention-pooled tower Grad-ECLIP runs the blocks
without a graph and back-propagates through the pool only; on a CLS tower through the last block's CLS row.
LeGrad, attention and Grad-CAM are reported without a target (LeGrad back-propagates each prompt's score through
the full token rows of the last two blocks; Grad-CAM through the whole last block).

    python benchmarks/bench_timm_towers.py            # all families (a few minutes on 2 cores)
    python benchmarks/bench_timm_towers.py --quick    # the tiny towers of tests/_towers.py, 32 px
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("grad_eclip", "legrad", "attention", "gradcam", "maskclip")
FAMILIES = ("ViT-B-16", "ViT-B-16-SigLIP", "ViT-B-16-SigLIP2", "EVA02-B-16", "PE-Core-B-16", "hf:siglip-base")
QUICK = ("micro", "tiny-siglip", "tiny-eva02", "tiny-pe", "tiny-hf")
PROMPTS = ["a photo of a red circle", "a blue square on grass", "a cat next to a dog", "a green triangle"]


def load(name: str):
    """(bundle, image size) of a family name."""
    from tests import _towers as T

    if name == "ViT-B-16" or name == "micro":
        from mmel.backbone import load_clip

        torch.manual_seed(0)
        return (load_clip("ViT-B-16"), 224) if name == "ViT-B-16" else (load_clip("mmel-micro"), 32)
    if name == "hf:siglip-base":
        return T.hf_siglip_b16(), 224
    if name.startswith("tiny-"):
        kind = name.removeprefix("tiny-")
        return (T.tiny_hf_siglip() if kind == "hf" else T.tiny_timm_clip(kind)), 32
    return T.openclip_tower(name), 224


def floor_fn(bundle, image, prompts):
    from mmel.explainers.towers import tower_of

    tower = tower_of(bundle.model)

    def run():
        with torch.no_grad():
            tokens = bundle.tokenize(prompts)
            if tower is None:
                bundle.model.encode_image(image), bundle.model.encode_text(tokens)
            else:
                tower.encode_image(image), tower.encode_text(tokens)

    return run


def bench(name: str, k: int, repeats: int) -> dict[str, tuple[float, float]]:
    """method -> (ms per map, ratio to the floor), and 'floor' -> (ms per map, 1)."""
    from mmel.explainers import build_explainer

    bundle, size = load(name)
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    prompts = (PROMPTS * k)[:k]
    fns = {"floor": floor_fn(bundle, image, prompts)}
    for m in METHODS:
        e = build_explainer(m, bundle)
        fns[m] = lambda e=e: e(image, prompts)
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {m: [] for m in fns}
    for _ in range(repeats):
        for m, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[m].append(time.perf_counter() - t0)
    fl = statistics.median(times["floor"])
    return {m: (1e3 * statistics.median(t) / k, statistics.median(t) / fl) for m, t in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny towers, 32 px: a smoke run of this script")
    ap.add_argument("--families", nargs="*", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    families = args.families or (QUICK if args.quick else FAMILIES)
    threads = torch.get_num_threads()
    print(f"1 image x {args.prompts} prompts, random weights, CPU ({threads} threads), median of {args.repeats}")
    head = f"{'family':<18}{'floor':>8}" + "".join(f"{m:>12}" for m in METHODS)
    print("ms per map (ratio to the floor)\n" + head)
    ok = True
    for name in families:
        r = bench(name, args.prompts, args.repeats)
        cells = "".join(f"{r[m][0]:>7.0f} ({r[m][1]:.2f})"[-12:].rjust(12) for m in METHODS)
        print(f"{name:<18}{r['floor'][0]:>8.0f}{cells}", flush=True)
        ok &= r["grad_eclip"][1] <= 1.5
    if args.quick:  # tiny models: fixed per-call overheads dominate, the cost model does not apply
        print("\nquick run: no target")
        return 0
    print("\ntarget met: grad_eclip <= 1.5 x floor on every family" if ok else "\nTARGET MISSED (grad_eclip > 1.5 x)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
