"""Milliseconds per map for each model family at 224 px, side by side with native ViT-B/16 (CPU, random weights).

Families (docs/model_families.md), each at its full size with random weights (timing does not depend on them):
  * native ViT-B/16 (``ViT-B-16-quickgelu``);
  * HF CLIP: a transformers ``CLIPModel`` of ViT-B/16 shape, converted by mmel.hf_clip (it then is a native ViT:
    the same cost is expected — the row checks that the conversion adds nothing);
  * RN50 (open_clip ModifiedResNet) and ConvNeXt-Base (``convnext_base``: timm trunk);
  * timm ViT-B/16 (open_clip TimmModel around timm's ``vit_base_patch16_224``): only RISE runs on it.

Methods: every one of ``grad_eclip``, ``gradcam``, ``m2ib``, ``rise`` that the family supports (capability
matrix), with M2IB at 2 steps x 2 samples and RISE at 32 masks so that the whole run stays within minutes on two
cores (their cost scales linearly in steps x samples and in masks: the defaults, 10 x 10 and 2000, cost ~25 x and
~60 x these). 1 image x 2 prompts per call; the median of ``--rounds`` timed calls after one warm-up, every
(family, method) timed in the same rounds (round-robin). Every map is checked (finite, in [0, 1], [B, K, H, W]):
exit status 1 when one is not; no speed target.

    python benchmarks/bench_families.py            # 3 rounds (37 min measured on 2 cores at load 11)
    python benchmarks/bench_families.py --quick    # 1 round
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

METHODS = {
    "grad_eclip": {},
    "gradcam": {},
    "m2ib": {"steps": 2, "samples": 2},
    "rise": {"n_masks": 32, "batch_size": 32},
}
PROMPTS = ["a photo of a dog.", "a photo of a cat."]
FAMILIES = ["native ViT-B/16", "HF CLIP ViT-B/16", "RN50", "ConvNeXt-Base", "timm ViT-B/16"]


def hf_vitb16():
    """A random transformers CLIPModel of OpenAI ViT-B/16's shape, converted (mmel.hf_clip)."""
    import open_clip
    import transformers

    from mmel.backbone import ClipBundle
    from mmel.hf_clip import convert

    config = transformers.CLIPConfig(
        vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           patch_size=16, image_size=224, hidden_act="quick_gelu"),
        text_config=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
                         max_position_embeddings=77, vocab_size=49408, eos_token_id=49407, hidden_act="quick_gelu"),
        projection_dim=512,
    )  # fmt: skip
    model = convert(transformers.CLIPModel(config)).requires_grad_(False).eval()
    # the name marks it as converted from Hugging Face (family hf_clip); open_clip's tokenizer: same vocabulary
    return ClipBundle(model=model, preprocess=None, tokenizer=open_clip.get_tokenizer("ViT-B-16"), name="hf:random")


def timm_vitb16():
    import open_clip
    from open_clip.model import CLIP

    from mmel.backbone import ClipBundle

    vision = dict(timm_model_name="vit_base_patch16_224", timm_model_pretrained=False, timm_pool="token",
                  timm_proj="linear", image_size=224)  # fmt: skip
    text = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)
    model = CLIP(512, vision_cfg=vision, text_cfg=text, quick_gelu=True).requires_grad_(False).eval()
    return ClipBundle(model=model, preprocess=None, tokenizer=open_clip.get_tokenizer("ViT-B-16"), name="timm-vitb16")


def load(family: str):
    from mmel.backbone import load_clip

    torch.manual_seed(0)
    if family == "native ViT-B/16":
        return load_clip("ViT-B-16-quickgelu")
    if family == "HF CLIP ViT-B/16":
        return hf_vitb16()
    if family == "RN50":
        return load_clip("RN50-quickgelu")
    if family == "ConvNeXt-Base":
        return load_clip("convnext_base")
    return timm_vitb16()


def measure(rounds: int) -> list[dict]:
    """Every (family, method) the matrix allows, timed round-robin in the same rounds (machine load hits all alike);
    all models stay in memory (~2.5 GB in float32)."""
    from mmel.explainers import build_explainer, explainer_class
    from mmel.explainers.base import supports
    from mmel.families import classify

    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    calls, results = {}, {}
    for family in FAMILIES:
        clip = load(family)
        fam = classify(clip)
        results[family] = {"family": family, "classified": fam, "ms_per_map": {}, "bad": []}
        for n, o in METHODS.items():
            if supports(explainer_class(n), fam):
                e = build_explainer(n, clip, **o)
                m = e(images, PROMPTS)  # warm-up, and the maps' contract
                if m.shape != (1, len(PROMPTS), 224, 224) or not torch.isfinite(m).all() or m.min() < 0 or m.max() > 1:
                    results[family]["bad"].append(
                        f"{family}/{n}: maps {tuple(m.shape)}, [{m.min():.3g}, {m.max():.3g}]"
                    )
                calls[(family, n)] = e
    times: dict[tuple, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, e in calls.items():
            t0 = time.perf_counter()
            e(images, PROMPTS)
            times[k].append(time.perf_counter() - t0)
    for (family, n), t in times.items():
        results[family]["ms_per_map"][n] = 1000 * statistics.median(t) / len(PROMPTS)
    return [results[f] for f in FAMILIES]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one timed round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="No pretrained weights")
    torch.set_num_threads(2)
    results = measure(1 if args.quick else args.rounds)
    base = results[0]["ms_per_map"]
    print(f"== ms per map at 224 px, 1 image x {len(PROMPTS)} prompts (ratio to native ViT-B/16, same method)")
    print(f"{'family':>18} | " + " | ".join(f"{n:>18}" for n in METHODS))
    for r in results:
        cells = []
        for n in METHODS:
            v = r["ms_per_map"].get(n)
            cells.append(
                f"{'refused':>18}" if v is None else f"{v:9.0f} ({v / base[n]:4.2f} x)" if n in base else f"{v:9.0f}"
            )
        print(f"{r['family']:>18} | " + " | ".join(cells), flush=True)
    print(json.dumps(results))
    bad = [b for r in results for b in r["bad"]]
    for b in bad:
        print("BAD MAPS:", b, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
