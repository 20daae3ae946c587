"""Train, export and find the weights of ``mmel-tiny`` on the shapes world (tag ``pretrained="shapes"``).

The committed file ``src/mmel/pretrain/assets/mmel-tiny-shapes.safetensors`` was made by::

    python -m mmel.pretrain --out src/mmel/pretrain/assets/mmel-tiny-shapes.safetensors --seed 0   # = make pretrain

(1000 steps of 128 images, each step also contrasting the 36 one-object captions; 24 min on one core of the busy
shared 2-core machine.) Its metadata records the architecture, every training setting, the torch version and the
validation score. The run is deterministic for a given seed, thread count and machine; on other CPUs the weights
may differ in the last bits, so the slow test re-runs the command and checks the same quality gates instead.
Weights are stored in fp16: the 49408-row token embedding dominates the size (the reason the text tower is
64 wide), and fp16 halves it to ≈ 8 MB. The loaded model is the fp16-rounded one, in fp32 — the quality tests
measure exactly that model.

:func:`resolve_weights` (called lazily by ``load_clip("mmel-tiny", pretrained="shapes")``) returns the committed
file when it is valid for the current ``mmel-tiny.json``, else a valid file in the cache dir, else trains one
there (announced with its expected duration).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import open_clip
import pytorch_lightning as pl
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from mmel.backbone import MODEL_CONFIG_DIR, quiet_open_clip, register_model_configs
from mmel.pretrain.data import ShapesCaptionStream
from mmel.pretrain.module import TinyClipPretrainer

log = logging.getLogger(__name__)

ARCH = "mmel-tiny"
WEIGHTS_NAME = "mmel-tiny-shapes.safetensors"
COMMITTED = Path(__file__).parent / "assets" / WEIGHTS_NAME
FORMAT = "mmel-tiny-shapes/1"
# the relational world's weights: a format of their own, so they are never taken for the plain world's
RELATIONS_FORMAT = "mmel-tiny-shapes-relations/1"
RELATIONS_NAME = "mmel-tiny-shapes-relations.safetensors"
RELATIONS_FILE = Path(__file__).parent / "assets" / RELATIONS_NAME
# measured: ≈ 1.0-3.5 s per step of 128 on one core of a busy 2-core machine (bf16 autocast, AVX512-BF16)
SECONDS_PER_STEP = (1.0, 3.5)


@dataclass
class PretrainConfig:
    """Every setting of a pretraining run (all recorded in the weight file's metadata)."""

    seed: int = 0
    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 40
    text_spread: float = 1.0  # weight of the category-caption spread term (mmel.pretrain.loss)
    precision: str = "bf16-mixed"
    # fixed so that the run is repeatable (CPU matmul reductions depend on the thread count); 1 because on a busy
    # 2-core machine two threads were 5x slower per step than one (they wait on each other; measured)
    threads: int = 1
    num_workers: int = 1  # renders the next batch while the model trains
    val_images: int = 256  # the shapes world's val images (same seed): zero-shot check during training
    val_every: int = 100

    @property
    def world(self) -> str:
        return "plain"


@dataclass
class RelationsPretrainConfig(PretrainConfig):
    """Pretraining on the relational world (``--world relations``): its expressions with relation-swapped hard
    negatives (:mod:`mmel.pretrain.relational`); what the model knows of the relations is measured at the end and
    recorded in the file. A class of its own, so the plain world's recorded settings stay what they were.

    ``init``: start from a weight file ("shapes": the committed plain-world weights, which already tell the 36
    categories apart; "" from scratch). ``pair_weight``: the two-way true-vs-swapped term
    (:meth:`mmel.pretrain.module.TinyClipPretrainer._pair_loss`). ``counterfactual`` / ``relational``: the share of
    images with one look-alike hidden and of captions that are expressions."""

    init: str = ""
    pair_weight: float = 0.0
    counterfactual: float = 0.5
    relational: float = 0.5

    @property
    def world(self) -> str:
        return "relations"


def arch_config() -> dict:
    """The current ``mmel-tiny.json`` (what a weight file must have been trained for)."""
    return json.loads((MODEL_CONFIG_DIR / f"{ARCH}.json").read_text())


class _Progress(pl.Callback):
    """Log every ``every`` steps: loss, elapsed time, expected remaining time."""

    def __init__(self, every: int = 25) -> None:
        self.every, self.t0 = every, time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            el = time.time() - self.t0
            log.info(
                "pretrain step %d/%d loss %.3f | %.1f min elapsed, ~%.1f min left",
                step, trainer.max_steps, float(outputs["loss"]), el / 60, el / step * (trainer.max_steps - step) / 60,
            )  # fmt: skip

    def on_validation_end(self, trainer, pl_module) -> None:
        top1 = trainer.callback_metrics.get("val/top1_present")
        if top1 is not None:
            log.info("pretrain step %d: val zero-shot top-1 present = %.3f", trainer.global_step, float(top1))


def pretrain(out: str | Path, cfg: PretrainConfig | None = None, log_dir: str | Path | None = None) -> dict[str, str]:
    """Train ``mmel-tiny`` with ``cfg`` and write fp16 safetensors to ``out``; returns the metadata written."""
    cfg = cfg or PretrainConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _pretrain(Path(out).expanduser(), cfg, log_dir)
    finally:
        torch.set_num_threads(threads)


def _pretrain(out: Path, cfg: PretrainConfig, log_dir: str | Path | None) -> dict[str, str]:
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = TinyClipPretrainer(
        ARCH,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        max_steps=cfg.steps,
        text_spread=cfg.text_spread,
        pair_weight=getattr(cfg, "pair_weight", 0.0),
    )
    if getattr(cfg, "init", ""):
        init = COMMITTED if cfg.init == "shapes" else Path(cfg.init).expanduser()
        reason = check_weights(init) if cfg.init == "shapes" else None
        if reason is not None or not init.is_file():
            raise FileNotFoundError(f"pretrain --init {cfg.init}: {init} is not a usable weight file ({reason})")
        from safetensors.torch import load_file

        module.model.load_state_dict({k: v.float() for k, v in load_file(str(init)).items()})
        log.info("pretrain: starting from %s", init)
    visual = module.model.visual
    kw = {
        "tokenizer": module.tokenizer,
        "mean": tuple(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN),
        "std": tuple(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD),
        "image_size": int(visual.image_size[0]),
    }
    loader_kw = {
        "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers,
        "persistent_workers": cfg.num_workers > 0,
    }
    if cfg.world == "plain":
        train = ShapesCaptionStream(cfg.seed, cfg.steps * cfg.batch_size, **kw)
        val = ShapesCaptionStream(cfg.seed, cfg.val_images, stream="val", **kw)
    elif cfg.world == "relations":
        from mmel.pretrain.relational import RelationalCaptionStream, collate

        kw.pop("tokenizer")
        shares = {"counterfactual": cfg.counterfactual, "relational": cfg.relational}
        train = RelationalCaptionStream(cfg.seed, cfg.steps * cfg.batch_size, **kw, **shares)
        val = RelationalCaptionStream(cfg.seed, cfg.val_images, stream="val", **kw)
        loader_kw["collate_fn"] = collate(module.tokenizer)
    else:
        raise ValueError(f"pretrain: world must be 'plain' or 'relations', got {cfg.world!r}")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=cfg.steps,
        precision=cfg.precision,
        deterministic=True,
        gradient_clip_val=1.0,
        val_check_interval=cfg.val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=pl.loggers.CSVLogger(str(log_dir), name="pretrain") if log_dir else False,
        log_every_n_steps=20,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_Progress()],
    )
    t0 = time.time()
    trainer.fit(module, DataLoader(train, shuffle=False, **loader_kw), DataLoader(val, shuffle=False, **loader_kw))
    trainer.validate(module, DataLoader(val, shuffle=False, **loader_kw), verbose=False)
    extra = {}
    if cfg.world == "relations":  # what the model knows of the relations: true vs swapped on counterfactual images
        from mmel.pretrain.relational import relational_knowledge

        know = relational_knowledge(module.model.eval(), module.tokenizer, kw["mean"], kw["std"], cfg.seed,
                                    image_size=kw["image_size"])  # fmt: skip
        extra["val_relations"] = json.dumps({"accuracy": round(know["accuracy"], 4), "by_kind": know["by_kind"]})
        log.info("pretrain: relational knowledge on val counterfactuals %s", extra["val_relations"])
    metadata = {
        **extra,
        "format": FORMAT if cfg.world == "plain" else RELATIONS_FORMAT,
        "arch": json.dumps(arch_config(), sort_keys=True),
        "config": json.dumps(asdict(cfg), sort_keys=True),
        "command": "python -m mmel.pretrain " + " ".join(shlex.quote(a) for a in _cli_args(out, cfg)),
        "val_top1_present": f"{float(trainer.callback_metrics['val/top1_present']):.4f}",
        "train_minutes": f"{(time.time() - t0) / 60:.1f}",
        "torch": torch.__version__,
    }
    export_weights(module.model, out, metadata)
    log.info("pretrain: wrote %s (%s)", out, {k: metadata[k] for k in ("val_top1_present", "train_minutes")})
    return metadata


def export_weights(model: torch.nn.Module, out: Path, metadata: dict[str, str]) -> None:
    """fp16 safetensors, written to a temporary name and renamed (a crash never leaves a half file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    save_file(sd, str(tmp), metadata=metadata)
    tmp.replace(out)


def check_weights(path: Path, fmt: str = FORMAT) -> str | None:
    """None when ``path`` holds mmel-tiny weights of format ``fmt`` (the plain world's by default) for the current
    architecture, else the reason not."""
    if not path.is_file():
        return "no such file"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, keys = f.metadata() or {}, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 — a Git LFS pointer, a truncated download, ...
        return f"unreadable ({type(e).__name__}: {e})"
    if meta.get("format") != fmt:
        return f"format {meta.get('format')!r}, expected {fmt!r}"
    if json.loads(meta.get("arch", "null")) != arch_config():
        return f"trained for another {ARCH}.json than the current one"
    register_model_configs()
    with quiet_open_clip(weights_loaded=True):  # built only to read its shapes: no "initialized randomly" line
        expected = {k: tuple(v.shape) for k, v in open_clip.create_model(ARCH).state_dict().items()}
    if keys != expected:
        return "tensor names/shapes do not fit the architecture"
    return None


def _resolve(committed: Path, name: str, cache_dir: Path, fmt: str, tag: str, cfg: PretrainConfig) -> Path:
    """The committed file when it is valid for ``fmt`` and the current architecture, else a valid file in the cache
    dir, else one trained there now with ``cfg`` (announced with its expected duration and its command)."""
    cached = Path(cache_dir).expanduser() / name
    for candidate in (committed, cached):
        reason = check_weights(candidate, fmt)
        if reason is None:
            return candidate
        if candidate.exists():
            log.warning("mmel-tiny/%s: ignoring %s: %s", tag, candidate, reason)
    lo, hi = (cfg.steps * s / 60 for s in SECONDS_PER_STEP)
    log.warning(
        "mmel-tiny/%s weights not found: training them now into %s (%d steps; expect about %.0f-%.0f minutes "
        "on 2 CPU cores). Done once; later runs reuse the file. Same as: python -m mmel.pretrain %s",
        tag, cached, cfg.steps, lo, hi, " ".join(_cli_args(cached, cfg)),
    )  # fmt: skip
    pretrain(cached, cfg)
    return cached


def resolve_weights(cache_dir: Path) -> Path:
    """The weight file of ``load_clip("mmel-tiny", pretrained="shapes")``: committed, cached, or trained now."""
    return _resolve(COMMITTED, WEIGHTS_NAME, cache_dir, FORMAT, "shapes", PretrainConfig())


def relations_config() -> RelationsPretrainConfig:
    """The settings the committed relational weights were trained with (``make pretrain-relations``)."""
    return RelationsPretrainConfig(steps=1500, init="shapes", pair_weight=3.0, counterfactual=0.9, relational=0.9,
                                   val_every=500)  # fmt: skip


def resolve_relations_weights(cache_dir: Path) -> Path:
    """The weight file of ``load_clip("mmel-tiny", pretrained="shapes-relations")``: committed, cached, or trained
    now (from the plain world's weights, :func:`relations_config`)."""
    return _resolve(RELATIONS_FILE, RELATIONS_NAME, cache_dir, RELATIONS_FORMAT, "shapes-relations",
                    relations_config())  # fmt: skip


def _cli_args(out: Path, cfg: PretrainConfig) -> list[str]:
    default = type(cfg)()
    args = ["--out", str(out)] + (["--world", cfg.world] if cfg.world != "plain" else [])
    for f in fields(cfg):
        if f.name == "seed" or getattr(cfg, f.name) != getattr(default, f.name):
            args += [f"--{f.name.replace('_', '-')}", str(getattr(cfg, f.name))]
    return args


def main(argv: list[str] | None = None) -> None:
    """``python -m mmel.pretrain --out PATH [--seed 0] [--steps 1200] ...`` (every PretrainConfig field)."""
    p = argparse.ArgumentParser(prog="python -m mmel.pretrain", description="Train mmel-tiny on the shapes world.")
    p.add_argument("--out", type=Path, default=COMMITTED, help=f"weight file to write (default: {COMMITTED})")
    p.add_argument("--log-dir", type=Path, default=None, help="CSV logs of the run (default: none)")
    p.add_argument("--world", choices=("plain", "relations"), default="plain",
                   help="plain: the shapes world's captions; relations: the relational one")  # fmt: skip
    for f in fields(RelationsPretrainConfig):  # the plain world refuses the relational-only settings below
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default), default=f.default)
    args = vars(p.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    out, log_dir = args.pop("out"), args.pop("log_dir")
    relations = args.pop("world") == "relations"
    config = RelationsPretrainConfig if relations else PretrainConfig
    only = {f.name for f in fields(RelationsPretrainConfig)} - {f.name for f in fields(PretrainConfig)}
    given = sorted(k for k in only if args[k] != getattr(RelationsPretrainConfig(), k))
    if not relations and given:
        p.error(f"--{given[0].replace('_', '-')} is a setting of --world relations only")
    if not relations:
        args = {k: v for k, v in args.items() if k not in only}
    if relations and out == COMMITTED:  # never over the plain world's committed weights
        out = RELATIONS_FILE
    meta = pretrain(out, config(**args), log_dir=log_dir)
    print(json.dumps({k: meta[k] for k in ("command", "val_top1_present", "train_minutes")}, indent=1))
