"""Deletion + insertion cost vs the model's own forward passes (target: ratio <= 1.2), measured side by side.

One image x one prompt, open_clip ViT-B-16 with random weights, 224 px, CPU. The metric scores P distinct perturbed
images (both curves' points; the clean image is shared): with ``step = 1/S`` each curve has S + 1 points, so
P = 2S + 1 with different fills. The gate compares the metric's wall time with P forward passes of the same model,
batched and chunked by the same batch size: everything the metric adds (ranking, fills, masking, scoring) must cost
at most 20% on top of the forward passes it cannot avoid. For transparency the script also prints the ratio against
S forwards (one curve's worth), which is >= 2 by construction since two curves need about 2S images.

    python benchmarks/bench_metrics.py [--steps 10] [--reps 3] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from mmel.backbone import load_clip
from mmel.metrics import ClipScorer, DeletionInsertion

GATE = 1.2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--steps", type=int, default=10, help="S: steps per curve (step = 1/S)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    torch.manual_seed(0)
    clip = load_clip(args.model)  # random weights: timing only
    h, w = clip.image_size
    image = torch.randn(1, 3, h, w)
    saliency = torch.rand(1, h // clip.patch_size, w // clip.patch_size)
    scorer = ClipScorer(clip, ["a photo of a dog"], kind="cosine", target=0)

    seen: list[int] = []

    def counting(images: torch.Tensor) -> torch.Tensor:
        seen.append(images.shape[0])
        return scorer(images)

    def run_metric() -> float:
        metric = DeletionInsertion(counting, step=1 / args.steps, batch_size=args.batch_size)
        t0 = time.perf_counter()
        metric.update(saliency, image)
        metric.compute()
        return time.perf_counter() - t0

    run_metric()  # warm-up; also counts the images the metric scores
    p = sum(seen)
    batch = image.expand(p, -1, -1, -1).contiguous() + 0.01 * torch.randn(p, 3, h, w)

    def run_forward(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for start in range(0, n, args.batch_size):
                clip.model.encode_image(batch[start : min(n, start + args.batch_size)])
        return time.perf_counter() - t0

    run_forward(p)
    t_metric, t_forward_p, t_forward_s = [], [], []
    for _ in range(args.reps):  # interleaved so that load from other processes hits all three alike
        t_metric.append(run_metric())
        t_forward_p.append(run_forward(p))
        t_forward_s.append(run_forward(args.steps))
    tm, tp, ts = (statistics.median(t) for t in (t_metric, t_forward_p, t_forward_s))
    ratio = tm / tp
    print(
        f"model {args.model} {h}x{w} CPU, threads {torch.get_num_threads()}, batch {args.batch_size}, reps {args.reps}"
    )
    print(f"S = {args.steps} steps per curve -> P = {p} distinct images scored (deletion + insertion)")
    print(f"deletion+insertion   {tm:8.3f} s   (median; runs {', '.join(f'{t:.3f}' for t in t_metric)})")
    print(f"{p:3d} forward passes   {tp:8.3f} s   (median; runs {', '.join(f'{t:.3f}' for t in t_forward_p)})")
    print(f"{args.steps:3d} forward passes   {ts:8.3f} s")
    print(f"ratio vs P forwards  {ratio:8.3f}   (gate <= {GATE})  {'PASS' if ratio <= GATE else 'FAIL'}")
    print(f"ratio vs S forwards  {tm / ts:8.3f}   (two curves need P = 2S + 1 images: ~2 by construction)")
    return 0 if ratio <= GATE else 1


if __name__ == "__main__":
    sys.exit(main())
