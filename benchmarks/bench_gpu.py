"""The real run's speed on one device: evaluate, the feature-cache build, cached training, fp32 against bf16.

One script, one JSON (``--out``), all figures measured side by side in one run on a generated shapes world in COCO
layout (random weights: speed does not depend on them):

  * ``--size full`` (the GPU check, ``make gpu-check``): ViT-B/16 at 224 px, 256 test / 256 train images;
  * ``--size small`` (any machine, e.g. ``--device cpu`` in CI): the micro CLIP at 32 px, a few dozen images.

Measured:
  * evaluate items/s ((image, prompt) pairs) of Grad-ECLIP and MMEL (the HSRM at initialisation: same cost as a
    trained one) through ``explain_batch``, against the floor: the plain batched forward of the same items (image
    and text towers, cosine scores, no gradients);
  * cache-build images/s (``mmel.train.cached_features``: the programs' own wiring);
  * cached training steps/s and the loader's share of a step (time waiting for the next batch / step time);
  * fp32 against bf16 autocast (``mmel.utils.placement.autocast``) for Grad-ECLIP: speed, and agreement of the maps
    (per-map Pearson correlation: minimum and mean) and of the pointing game (accuracy each, and the share of items
    whose hit / miss agrees);
  * peak GPU memory (``torch.cuda.max_memory_allocated``; null on the CPU).

Targets (GPU): evaluate >= 0.5 x the floor (both explainers); cached training loader <= 20 % of step time;
bf16 >= 1.5 x fp32 with map Pearson >= 0.999. Exit status 1 when one fails. On the CPU the figures are reported and
every target is "n/a" (they are about a GPU's throughput; a CPU run checks that the script works end to end).

    python benchmarks/bench_gpu.py                       # cuda when there is one, --size full (<= 8 min on an H200)
    python benchmarks/bench_gpu.py --device cpu --size small --out /tmp/bench_gpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "full": {"model": ["model=vitb16", "model.pretrained=null"], "px": 224, "n_eval": 256, "n_train": 256,
             "batch": 32, "train_batch": 64},
    "small": {"model": ["model=micro"], "px": 32, "n_eval": 24, "n_train": 32, "batch": 8, "train_batch": 16},
}  # fmt: skip
TARGETS = {"evaluate_vs_floor": 0.5, "loader_share": 0.20, "bf16_speedup": 1.5, "bf16_pearson": 0.999}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compose(program: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(program, overrides=overrides)


def eval_batches(dataset, transform, batch: int) -> list[tuple[torch.Tensor, list[list[str]], list]]:
    """The test split as evaluate reads it: batches of images, each with its own prompts (and boxes)."""
    from mmel.data.datamodules import TransformedDataset

    items = TransformedDataset(dataset, transform)
    groups = [[items[i] for i in g] for g in dataset.groups_by_image()]
    groups = [[it for it in g if isinstance(it, dict)] for g in groups]
    groups = [g for g in groups if g]
    out = []
    for lo in range(0, len(groups), batch):
        gs = groups[lo : lo + batch]
        images = torch.stack([g[0]["image"] for g in gs])
        out.append(
            (images, [[it["prompt"] for it in g] for g in gs], [torch.as_tensor(it["boxes"]) for g in gs for it in g])
        )
    return out


def timed(fn, device: torch.device, repeats: int = 3) -> float:
    """Seconds of the best of ``repeats`` runs of ``fn()`` (after one warm-up run)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def floor_pass(clip, batches, device) -> None:
    from mmel.explainers.base import cosine_scores
    from mmel.explainers.vit import encode_text

    with torch.no_grad():
        for images, prompts, _ in batches:
            feats = clip.model.encode_image(images.to(device, non_blocking=True))
            distinct = list(dict.fromkeys(p for ps in prompts for p in ps))
            text = encode_text(clip.model, clip.tokenize(distinct))
            cosine_scores(feats, text)


def explain_pass(explainer, batches, device, out: list | None = None) -> None:
    for images, prompts, _ in batches:
        maps = explainer.explain_batch(images.to(device, non_blocking=True), prompts)
        if out is not None:
            out += [m.float().cpu() for m in maps]


def agreement(a: list[torch.Tensor], b: list[torch.Tensor], batches) -> dict:
    """Per-map Pearson of two runs' maps, and their pointing games on the items' boxes."""
    from mmel.metrics import PointingGame

    ma, mb = torch.cat(a), torch.cat(b)  # [N, H, W]
    x, y = ma.flatten(1).double(), mb.flatten(1).double()
    x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    r = (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1)).clamp_min(1e-12)
    boxes = [bx for _, _, bs in batches for bx in bs]
    hits = []
    for maps in (ma, mb):
        pg = PointingGame(tolerance=15)
        pg.update(maps, boxes)
        hits.append(pg.compute()["accuracy"].item())
    pa, pb = ma.flatten(1).argmax(1), mb.flatten(1).argmax(1)
    return {"pearson_min": r.min().item(), "pearson_mean": r.mean().item(), "pointing_fp32": hits[0],
            "pointing_bf16": hits[1], "same_peak_share": (pa == pb).double().mean().item()}  # fmt: skip


def train_steps(module, loader, device, epochs: int) -> dict:
    """Cached HSRM training as Lightning runs it: (loader wait, step compute) per step."""
    opt = module.configure_optimizers()
    module.train()
    wait = compute = 0.0
    steps = 0
    for _ in range(epochs):
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            batch = next(it, StopIteration)
            t1 = time.perf_counter()
            if batch is StopIteration:
                break
            if batch is None:
                continue
            batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            batch["boxes"] = [b.to(device) for b in batch["boxes"]]
            loss = module.training_step(batch, steps)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sync(device)
            t2 = time.perf_counter()
            if steps > 0:  # the first step pays for warm-up (workers starting, kernels compiling)
                wait += t1 - t0
                compute += t2 - t1
            steps += 1
    total = wait + compute
    return {"steps": steps, "steps_per_s": (steps - 1) / total if total else None,
            "loader_share": wait / total if total else None}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="full on a GPU, small on the CPU by default")
    ap.add_argument("--out", default=str(ROOT / "logs" / "bench_gpu.json"))
    ap.add_argument("--workers", type=int, default=None, help="cached-training loader workers (default 4 on GPU, 0)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    device = torch.device(args.device)
    size = SIZES[args.size or ("full" if device.type == "cuda" else "small")]
    gpu = device.type == "cuda"
    workers = args.workers if args.workers is not None else (4 if gpu else 0)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("MMEL_ROOT", str(ROOT))
    from hydra.utils import instantiate

    from mmel.data.shapes import generate
    from mmel.explainers import build_explainer
    from mmel.train import cached_features
    from mmel.utils.placement import autocast, place_clip
    from mmel.utils.runs import build_datamodule

    t_start = time.perf_counter()
    res: dict = {"device": str(device), "size": args.size or ("full" if gpu else "small"), "targets": {}}
    if gpu:
        res["gpu"] = torch.cuda.get_device_name(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        world = generate(Path(tmp) / "world", seed=0, n_train=size["n_train"], n_val=8, n_test=size["n_eval"],
                         image_size=max(size["px"], 64))  # fmt: skip
        kw = f"n_train:{size['n_train']},n_val:8,n_test:{size['n_eval']},image_size:{max(size['px'], 64)}"
        data = [f"data.root={world}", "data.seed=0", "++data.generate_kwargs={" + kw + "}"]
        torch.manual_seed(0)
        cfg = compose("evaluate", [*size["model"], *data])
        clip = instantiate(cfg.model)
        place_clip(clip, device)
        res["model"] = clip.name
        dm = build_datamodule(cfg, clip)
        dm.prepare_data()
        batches = eval_batches(dm.dataset("test"), dm.transform, size["batch"])
        items = sum(len(ps) for _, ps, _ in batches for ps in [sum(ps, [])])
        res["evaluate"] = {"items": items, "images": sum(len(b[0]) for b in batches), "batch": size["batch"]}

        # -- evaluate: explainers against the floor, fp32 ---------------------------------------------------------
        floor_s = timed(lambda: floor_pass(clip, batches, device), device)
        res["evaluate"]["floor_items_per_s"] = items / floor_s
        for name in ("grad_eclip", "mmel"):
            e = build_explainer(name, clip) if name == "grad_eclip" else build_explainer(name, clip, layers=6)
            s = timed(lambda e=e: explain_pass(e, batches, device), device)
            res["evaluate"][f"{name}_items_per_s"] = items / s
            res["evaluate"][f"{name}_vs_floor"] = floor_s / s

        # -- fp32 against bf16 autocast (Grad-ECLIP) --------------------------------------------------------------
        ge = build_explainer("grad_eclip", clip)
        maps32: list = []
        maps16: list = []
        explain_pass(ge, batches, device, maps32)
        with autocast(device, "bf16"):
            explain_pass(ge, batches, device, maps16)
            bf16_s = timed(lambda: explain_pass(ge, batches, device), device)
        fp32_s = items / res["evaluate"]["grad_eclip_items_per_s"]
        res["precision"] = {"fp32_items_per_s": items / fp32_s, "bf16_items_per_s": items / bf16_s,
                            "bf16_speedup": fp32_s / bf16_s, **agreement(maps32, maps16, batches)}  # fmt: skip

        # -- the cache build and cached training (the train program's own wiring) --------------------------------
        tcfg = compose("train", [*size["model"], *data, f"feature_cache.dir={Path(tmp) / 'fc'}",
                                 f"data.batch_size={size['train_batch']}", f"data.num_workers={workers}",
                                 f"data.pin_memory={str(gpu).lower()}"])  # fmt: skip
        tdm = build_datamodule(tcfg, clip)
        module = instantiate(tcfg.hsrm)(clip=clip).to(device)
        cdm = cached_features(tcfg, clip, tdm, module)
        cdm.prepare_data()
        sync(device)
        t0 = time.perf_counter()
        cdm.setup("fit")
        sync(device)
        build_s = time.perf_counter() - t0
        n_images = sum(len(cdm.base.dataset(s).groups_by_image()) for s in cdm.features)
        res["cache_build"] = {"images": n_images, "seconds": build_s, "images_per_s": n_images / build_s}
        res["train"] = {"batch": size["train_batch"], "workers": workers,
                        **train_steps(module, cdm.train_dataloader(), device, epochs=3 if gpu else 2)}  # fmt: skip
    res["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(device)) if gpu else None
    res["seconds"] = time.perf_counter() - t_start

    # -- targets ----------------------------------------------------------------------------------------------------
    def target(name: str, value, ok: bool) -> None:
        res["targets"][name] = {"value": value, "target": TARGETS[name.split(":")[0]],
                                "result": ("ok" if ok else "MISSED") if gpu else "n/a (cpu)"}  # fmt: skip

    for name in ("grad_eclip", "mmel"):
        v = res["evaluate"][f"{name}_vs_floor"]
        target(f"evaluate_vs_floor:{name}", v, v >= TARGETS["evaluate_vs_floor"])
    share = res["train"]["loader_share"]
    target("loader_share", share, share is not None and share <= TARGETS["loader_share"])
    p = res["precision"]
    target("bf16_speedup", p["bf16_speedup"], p["bf16_speedup"] >= TARGETS["bf16_speedup"])
    target("bf16_pearson", p["pearson_min"], p["pearson_min"] >= TARGETS["bf16_pearson"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    print(f"wrote {out}")
    missed = [k for k, v in res["targets"].items() if v["result"] == "MISSED"]
    if missed:
        print("targets missed: " + ", ".join(missed), file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
