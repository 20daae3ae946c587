"""HSRM feature cache: bytes per image / per (image, prompt) pair, projected COCO sizes, and the epoch speed-up.

Two settings, each built through the programs' own wiring (``mmel.train.cached_features``) on a shapes world:

  * ``tiny``:  the project's mmel-tiny CLIP (64 px, 4 blocks), float32 cache (``feature_cache.dtype=auto``);
  * ``vitb16``: ViT-B/16 architecture with random weights (sizes and timings do not depend on the weights), 224 px,
               6 layers, float16 cache (``auto`` for a real backbone), >= 200 (image, prompt) pairs built.

Measured: the build (all three splits), the bytes of every stored row split into the per-image part (key cosines,
patch tokens) and the per-pair part (evidence, text, boxes), and the files on disk (Arrow overhead included, as a
factor on the payload). Projected from the ViT-B/16 figures: a 20k-image COCO subset and COCO train2017 (118,287
images), both at 2.9 prompts per image (COCO train2017 has 860k instances of 2.9 distinct categories per image on
average; one prompt per (image, category present)). Then one HSRM training epoch over the train split read from
the cache against the same epoch with the features recomputed through CLIP for every batch (same module, same
loader order, same batch size), in alternating rounds (medians; ``--rounds``).

Targets: projected 20k-image subset <= 40 GB; cached epoch >= 10 x faster than the online one (both settings).
Exit status 1 when a target is missed.

    python benchmarks/bench_cache.py            # both settings (~2-3 minutes on 2 cores)
    python benchmarks/bench_cache.py --quick    # the tiny setting only, a small world
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
COCO_SUBSET, COCO_TRAIN, PROMPTS_PER_IMAGE = 20_000, 118_287, 2.9
GB = 1e9


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def epoch(module, loader) -> tuple[float, int]:
    """One training epoch of the HSRM (forward, box loss, backward, AdamW step); returns (seconds, pairs)."""
    opt = module.configure_optimizers()
    module.train()
    pairs = 0
    t0 = time.perf_counter()
    for batch in loader:
        if batch is None:
            continue
        loss = module.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pairs += len(batch["boxes"])
    return time.perf_counter() - t0, pairs


def measure(name: str, overrides: list[str], work: Path, rounds: int = 1) -> dict:
    from hydra.utils import instantiate

    from mmel.hsrm.features import IMAGE_FIELDS, PAIR_FIELDS
    from mmel.train import cached_features
    from mmel.utils.runs import build_datamodule

    cfg = compose([*overrides, f"feature_cache.dir={work / 'fc'}", "data.num_workers=0"])
    torch.manual_seed(0)
    clip = instantiate(cfg.model)
    dm = build_datamodule(cfg, clip)
    module = instantiate(cfg.hsrm)(clip=clip)
    cdm = cached_features(cfg, clip, dm, module)
    t0 = time.perf_counter()
    cdm.prepare_data()
    cdm.setup("fit")
    t_build = time.perf_counter() - t0

    image_bytes = pair_bytes = n_images = n_pairs = disk = 0
    dtype = None
    for stage_dir in sorted((work / "fc").iterdir()):
        manifest = json.loads((stage_dir / "cache.json").read_text())
        disk += manifest["bytes"]
        dtype = manifest["tensors"]["cosines"]
    for pairs in cdm.features.values():
        for row in range(len(pairs.cached)):
            r = pairs.cached[row]
            if r is None:
                continue
            n_images += 1
            n_pairs += int(r["pair_ok"].sum())
            image_bytes += sum(r[f].numel() * r[f].element_size() for f in IMAGE_FIELDS)
            pair_bytes += sum(r[f].numel() * r[f].element_size() for f in PAIR_FIELDS)
    per_image, per_pair = image_bytes / n_images, pair_bytes / n_pairs
    overhead = disk / (image_bytes + pair_bytes)

    def project(images: int) -> float:
        return (per_image * images + per_pair * images * PROMPTS_PER_IMAGE) * overhead

    # alternating rounds (cached, online, cached, ...), medians: machine load hits both paths alike
    cached_s, online_s = [], []
    for _ in range(rounds):
        t_cached, p_cached = epoch(module, cdm.train_dataloader())
        t_online, p_online = epoch(module, dm.train_dataloader())
        assert p_cached == p_online, (p_cached, p_online)
        cached_s.append(t_cached)
        online_s.append(t_online)
    t_cached, t_online = statistics.median(cached_s), statistics.median(online_s)
    return {
        "setting": name,
        "model": clip.name,
        "px": int(clip.image_size[0]),
        "layers": len(module.layers),
        "dtype": dtype,
        "images": n_images,
        "pairs": n_pairs,
        "build_s": t_build,
        "per_image": per_image,
        "per_pair": per_pair,
        "overhead": overhead,
        "disk": disk,
        "coco20k": project(COCO_SUBSET),
        "coco_train": project(COCO_TRAIN),
        "train_pairs": p_cached,
        "train_images": len(cdm.base.dataset("train").groups_by_image()),
        "epoch_cached_s": t_cached,
        "epoch_online_s": t_online,
        "rounds": {"cached_s": cached_s, "online_s": online_s},
        "speedup": t_online / t_cached,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the tiny setting on a small world only")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the issue's setting)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating cached / online epochs of the tiny setting")
    ap.add_argument("--settings", default="tiny,vitb16", help="comma-separated subset of tiny,vitb16")
    ap.add_argument("--vitb-rounds", type=int, default=1, help="the same for ViT-B/16 (an online epoch is minutes)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)  # Lightning's "self.log outside a Trainer" and friends
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MMEL_ROOT", str(ROOT))
    n_train = 96 if args.quick else 320
    tiny_world = "++data.generate_kwargs={n_train:" + str(n_train) + ",n_val:32,n_test:32}"
    wanted = set(args.settings.split(","))
    settings = [("tiny", ["model=tiny", "data.batch_size=32", tiny_world], args.rounds)] if "tiny" in wanted else []
    if not args.quick and "vitb16" in wanted:
        world = "++data.generate_kwargs={n_train:72,n_val:8,n_test:8,image_size:224}"
        over = ["model=vitb16", "model.pretrained=null", "data.batch_size=16", world]
        settings.append(("vitb16", over, args.vitb_rounds))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        for name, over, rounds in settings:
            work = Path(tmp) / name
            over = [*over, f"data.root={work / 'world'}", "data.seed=0"]
            print(f"== {name}: {' '.join(over)} ({rounds} round(s))", flush=True)
            rows.append(measure(name, over, work, rounds))
    ok = True
    print(f"\n{'setting':<8}{'model':<20}{'px':>5}{'L':>3}{'dtype':>9}{'images':>8}{'pairs':>7}{'build s':>9}")
    for r in rows:
        print(
            f"{r['setting']:<8}{r['model']:<20}{r['px']:>5}{r['layers']:>3}{r['dtype']:>9}{r['images']:>8}"
            f"{r['pairs']:>7}{r['build_s']:>9.1f}"
        )
    print(f"\n{'setting':<8}{'B/image':>11}{'B/pair':>9}{'disk/payload':>14}{'20k COCO GB':>13}{'COCO train GB':>15}")
    for r in rows:
        print(
            f"{r['setting']:<8}{r['per_image']:>11.0f}{r['per_pair']:>9.0f}{r['overhead']:>14.3f}"
            f"{r['coco20k'] / GB:>13.2f}{r['coco_train'] / GB:>15.2f}"
        )
    target = next((r for r in rows if r["setting"] == "vitb16"), None)
    if target is None:
        print("  the COCO size target is checked on the vitb16 setting, not run here")
    else:
        size_ok = target["coco20k"] <= 40 * GB
        ok &= size_ok
        print(
            f"  projected with vitb16's bytes at {PROMPTS_PER_IMAGE} prompts per image: 20k-image subset "
            f"{target['coco20k'] / GB:.2f} GB (target <= 40 GB: {'ok' if size_ok else 'MISSED'}), COCO train2017 "
            f"({COCO_TRAIN} images) {target['coco_train'] / GB:.2f} GB"
        )
    print(
        f"\n{'setting':<8}{'train images':>13}{'pairs':>7}{'cached s':>10}{'online s':>10}{'speed-up':>10}"
        "   target >= 10"
    )
    for r in rows:
        met = r["speedup"] >= 10
        ok &= met
        print(
            f"{r['setting']:<8}{r['train_images']:>13}{r['train_pairs']:>7}{r['epoch_cached_s']:>10.2f}"
            f"{r['epoch_online_s']:>10.2f}{r['speedup']:>10.1f}   {'ok' if met else 'MISSED'}"
        )
    for r in rows:
        print(
            f"  {r['setting']} rounds: cached {' '.join(f'{t:.2f}' for t in r['rounds']['cached_s'])} s, "
            f"online {' '.join(f'{t:.2f}' for t in r['rounds']['online_s'])} s (medians above)"
        )
    print("\nall targets met" if ok else "\nTARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
