"""``python -m mmel.trust``: sanity checks and prompt specificity of explainers on the shapes world.

    python -m mmel.trust --n 48 --checkpoint logs/train/runs/<run>/hsrm.pt --out logs/trust/run1

For each explainer, on the first N multi-object images of the held-out split: cascading and independent
model-parameter randomisation of the tiny CLIP's vision tower (Spearman / SSIM / HOG similarity to the original
maps after each step), prompt randomisation (true prompt vs another category's), and prompt specificity. Writes
``trust.json`` and ``sanity_curves.png`` under ``--out`` and prints the end points. Without ``--checkpoint`` the
MMEL row is the HSRM at initialisation (= single-layer Grad-ECLIP) and is labelled so.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from mmel.backbone import load_clip
from mmel.explainers import build_explainer
from mmel.metrics.sanity import explain_items, model_randomisation, prompt_randomisation
from mmel.trust.shapes import load_shapes_items, specificity_on_items

DEFAULT = "grad_eclip,mmel,legrad,clip_surgery,clearclip,game,gradcam,maskclip,attention,rollout"
SET_DEPENDENT = {"clip_surgery"}  # maps depend on the prompt set: explain against every category's prompt
FAST = {"rise": {"n_masks": 500, "batch_size": 100}}


def _parse(argv=None) -> argparse.Namespace:
    root = Path(os.environ.get("MMEL_ROOT", "."))
    p = argparse.ArgumentParser(prog="python -m mmel.trust", description=__doc__.split("\n\n")[0])
    p.add_argument("--explainers", default=DEFAULT, help="comma-separated explainer names")
    p.add_argument("--checkpoint", default=None, help="hsrm.pt of a trained HSRM for the mmel explainer")
    p.add_argument("--n", type=int, default=48, help="multi-object images of the split")
    p.add_argument("--split", default="test")
    p.add_argument("--data-root", default=str(root / "data" / "shapes"))
    p.add_argument("--model", default="mmel-tiny")
    p.add_argument("--pretrained", default="shapes", help="weights tag or path; none = random weights")
    p.add_argument("--cache-dir", default=str(root / ".cache" / "weights"))
    p.add_argument("--modes", default="cascading,independent")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=str(root / "logs" / "trust" / time.strftime("%Y-%m-%d_%H-%M-%S")))
    return p.parse_args(argv)


def _builder(name: str, checkpoint: str | None):
    cfg = dict(FAST.get(name, {}))
    if name == "mmel" and checkpoint:
        cfg["checkpoint"] = checkpoint
    return lambda clip: build_explainer(name, clip, **cfg)


def plot_curves(results: dict, path: Path) -> None:
    """One panel per (measure, mode): mean similarity to the original maps after each randomisation step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({m for r in results.values() for m in r["sanity"]})
    measures = ("spearman", "ssim", "hog")
    fig, axes = plt.subplots(len(measures), len(modes), figsize=(5 * len(modes), 3 * len(measures)), squeeze=False)
    for j, mode in enumerate(modes):
        for i, measure in enumerate(measures):
            ax = axes[i][j]
            for name, r in results.items():
                curve = r["sanity"][mode]
                ax.plot(range(len(curve["steps"]) + 1), [1.0, *curve["mean"][measure]], marker="o", label=name)
                ax.set_xticks(range(len(curve["steps"]) + 1), ["original", *curve["steps"]], rotation=45, fontsize=7)
            ax.set_title(f"{mode}: {measure}", fontsize=9)
            ax.axhline(0.0, color="grey", lw=0.5)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    """Run every check for every explainer; returns the results dict written to trust.json."""
    from mmel.data.shapes import generate

    torch.manual_seed(args.seed)
    if not (Path(args.data_root) / "coco" / "annotations" / f"instances_{args.split}.json").is_file():
        generate(args.data_root)  # the default world, as data=shapes makes it on first use
    pretrained = None if args.pretrained.lower() in ("", "none", "null") else args.pretrained
    clip = load_clip(args.model, pretrained, cache_dir=args.cache_dir)
    items = load_shapes_items(args.data_root, args.split, args.n, clip.preprocess)
    true, other = items.sanity_pairs(args.seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for name in [n.strip() for n in args.explainers.split(",") if n.strip()]:
        t0 = time.perf_counter()
        build = _builder(name, args.checkpoint)
        prompt_set = items.prompt_set if name in SET_DEPENDENT else None
        explainer = build(clip)
        original = explain_items(explainer, items.images, true, prompt_set, args.batch_size)
        r: dict = {"sanity": {}}
        for mode in args.modes.split(","):
            curve, _ = model_randomisation(
                clip, build, items.images, true, mode=mode, prompt_set=prompt_set, seed=args.seed,
                batch_size=args.batch_size, original=original,
            )  # fmt: skip
            r["sanity"][mode] = curve.to_dict()
        pr = prompt_randomisation(
            explainer, items.images, true, other, prompt_set=prompt_set, batch_size=args.batch_size, original=original
        )
        r["prompt_randomisation"] = {"mean": pr["mean"], "prompt_insensitive": pr["prompt_insensitive"]}
        r["specificity"] = specificity_on_items(explainer, items, args.seed, args.batch_size)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        if name == "mmel":
            r["label"] = "MMEL (ours, reconstructed)" + ("" if args.checkpoint else " at init = Grad-ECLIP")
        results[name] = r
        end = r["sanity"].get("cascading", {}).get("end_point", {})
        print(
            f"{name:>13}: cascading end Spearman {end.get('spearman', float('nan')):+.3f} "
            f"SSIM {end.get('ssim', float('nan')):+.3f} HOG {end.get('hog', float('nan')):+.3f} | "
            f"prompt-rand Spearman {pr['mean']['spearman']:+.3f} | specificity {r['specificity']['specificity']:.3f} "
            f"hard {r['specificity']['hard_specificity']:.3f} absent-on-object "
            f"{r['specificity']['absent_on_object']:.3f} | {r['seconds']}s",
            flush=True,
        )
    meta = {k: v for k, v in vars(args).items()}
    meta["n_images"] = int(items.images.shape[0])
    payload = {"config": meta, "results": results}
    (out_dir / "trust.json").write_text(json.dumps(payload, indent=2, allow_nan=True))
    plot_curves(results, out_dir / "sanity_curves.png")
    print(f"wrote {out_dir / 'trust.json'} and {out_dir / 'sanity_curves.png'}")
    return payload


def main(argv=None) -> None:
    run(_parse(argv))


if __name__ == "__main__":
    main()
