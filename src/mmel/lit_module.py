"""LightningModule that trains the HSRM against a frozen CLIP from box annotations.

The CLIP and its Grad-ECLIP evidence source are held as plain attributes, not sub-modules: they are frozen, stay
in eval mode, and are kept out of checkpoints (a checkpoint holds only the HSRM). The CLIP still moves with the
module: wherever the trainer puts the module (``module.to(strategy.root_device)``), the CLIP goes too
(:meth:`HSRMLitModule._apply`, :mod:`mmel.utils.placement`). A batch is either raw
(``images`` [B,3,H,W], ``prompt`` list[str], ``boxes`` list of [M,4] in input pixels) — the evidence is then
computed on the fly with one forward and one batched backward through CLIP — or carries cached frozen-CLIP
features (``evidence``, ``keys``, ``patch_tokens``, ``text``), so that epochs after the first need no CLIP pass.

Validation / test log, for the same held-out pairs, the HSRM map and the Grad-ECLIP map it started from
(``*/grad_eclip_*``), so every table row of "MMEL (ours, reconstructed)" sits next to its baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from mmel.backbone import ClipBundle, check_vit
from mmel.data.transforms import box_masks
from mmel.explainers import build_explainer
from mmel.explainers.base import to_image_maps
from mmel.hsrm import HSRM, HSRMInputs, box_losses, hsrm_config, hsrm_layers, needs_map
from mmel.hsrm.module import DEFAULTS
from mmel.metrics import EnergyPointingGame, PointingGame


def union_masks(boxes: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
    """Box-union masks [P, H, W] in input-pixel coords, by the metrics' own rule (:mod:`mmel.data.boxes`)."""
    return box_masks(list(boxes), size)


class HSRMLitModule(pl.LightningModule):
    """Train :class:`mmel.hsrm.HSRM` on box objectives.

    Args:
        clip: the frozen backbone.
        layers: selected vision blocks (an int n: the last n; negative = from the end); the last one is
            Grad-ECLIP's block. Defaults of this and the next settings: :class:`mmel.hsrm.module.HSRMSettings`.
        scales, tau: HSRM propagation granularities and initial temperatures (``scales=()``: no propagation).
        layer_weights, gate: HSRM switches for ablations (``learned`` / ``uniform`` / ``last``; gate on / off).
        conditioning: ``none`` | ``prompt`` (layer / scale weights chosen per prompt).
        losses: objective weights, e.g. ``{"energy": 1.0, "dice": 0.5}``.
        optimizer: a half-built optimizer (``functools.partial`` / Hydra ``_partial_``) taking the parameters.
        evidence_fn: ``(images, prompts, layers) -> mmel.explainers.LayerEvidence`` (paired); default: native
            Grad-ECLIP of ``clip``.
        pointing_tolerance: pointing-game tolerance in input pixels.
    """

    def __init__(
        self,
        clip: ClipBundle,
        layers: Sequence[int] | int = DEFAULTS.layers,
        scales: Sequence[int] = DEFAULTS.scales,
        tau: float | Sequence[float] = DEFAULTS.tau,
        layer_weights: str = DEFAULTS.layer_weights,
        gate: bool = DEFAULTS.gate,
        conditioning: str = DEFAULTS.conditioning,
        losses: Mapping[str, float] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        evidence_fn: Callable[..., Any] | None = None,
        pointing_tolerance: float = 15.0,
    ) -> None:
        super().__init__()
        # the HSRM reads Grad-ECLIP evidence of native ViT blocks: a CNN / timm tower is refused here, by name
        depth = len(check_vit(clip.model, getattr(clip, "name", None)).transformer.resblocks)
        self.layers = hsrm_layers(layers, depth)
        self.save_hyperparameters(
            {
                "layers": self.layers,
                "scales": list(scales),
                "layer_weights": layer_weights,
                "gate": bool(gate),
                "conditioning": str(conditioning),
                "tau": tau,
                "losses": dict(losses or {"energy": 1.0}),
                "backbone": clip.name,
                "pretrained": clip.pretrained,
                "pointing_tolerance": pointing_tolerance,
            }
        )
        object.__setattr__(self, "clip", clip)  # not registered: frozen, out of checkpoints
        object.__setattr__(self, "_evidence_fn", evidence_fn)
        self.hsrm = HSRM.for_clip(
            clip.model,
            num_layers=len(self.layers),
            scales=scales,
            tau=tau,
            layer_weights=layer_weights,
            gate=gate,
            conditioning=conditioning,
        )
        self.loss_weights = dict(losses or {"energy": 1.0})
        self.optimizer_factory = optimizer
        self.metrics = torch.nn.ModuleDict({stage: self._metric_set(pointing_tolerance) for stage in ("val", "test")})
        self._loss_terms: dict[str, tuple[Tensor | float, int]] = {}  # this epoch's (sum x batch size, count)

    def _apply(self, fn, recurse: bool = True):
        """Every device / dtype move of the module (``.to``, ``.cuda``, ...) moves the unregistered CLIP too."""
        super()._apply(fn, recurse)
        clip = self.__dict__.get("clip")
        if clip is not None:
            clip.model._apply(fn, recurse)
        return self

    @staticmethod
    def _metric_set(tol: float) -> torch.nn.ModuleDict:
        return torch.nn.ModuleDict(
            {
                "pointing_game": PointingGame(tolerance=tol),
                "energy": EnergyPointingGame(),
                "grad_eclip_pointing_game": PointingGame(tolerance=tol),
                "grad_eclip_energy": EnergyPointingGame(),
            }
        )

    # -- frozen-CLIP features ---------------------------------------------------------------------------------
    def evidence_fn(self) -> Callable[..., Any]:
        if self._evidence_fn is None:
            explainer = build_explainer("grad_eclip", self.clip, mode="native")
            object.__setattr__(self, "_evidence_fn", explainer.layer_evidence)
        return self._evidence_fn

    def features(self, batch: Mapping[str, Any]) -> HSRMInputs:
        """HSRM inputs for the batch's (image, prompt) pairs, from the cache or from CLIP."""
        if "evidence" in batch:  # cached: keys, or their pooled cosines (mmel.hsrm.features)
            return HSRMInputs(
                evidence=batch["evidence"],
                keys=batch.get("keys"),
                patch_tokens=batch["patch_tokens"],
                text=batch["text"],
                cosines=batch.get("cosines"),
            ).to(self.device)
        if "valid" in batch and not bool(torch.as_tensor(batch["valid"]).all()):
            raise ValueError(
                "HSRM training needs equal-size inputs in a batch: use data.resize=fixed (keep-size "
                "batches are padded, and padding would be explained as image content)"
            )
        with torch.enable_grad():  # Lightning may run val/test under no_grad; Grad-ECLIP needs dS/d(activations)
            ev = self.evidence_fn()(batch["images"], list(batch["prompt"]), layers=self.layers, paired=True)
        return HSRMInputs.from_evidence(ev)

    # -- steps ----------------------------------------------------------------------------------------------
    def _maps_and_masks(
        self, batch: Mapping[str, Any], maps: bool = True
    ) -> tuple[HSRMInputs, Tensor | None, Tensor, Tensor]:
        """HSRM inputs, map M (None unless ``maps``: training with the energy loss alone needs E only) and box
        masks at the input resolution, energy E on the patch grid (the energy loss reads it there exactly)."""
        x = self.features(batch)
        size = tuple(batch["images"].shape[-2:]) if "images" in batch else tuple(batch["input_size"])
        if maps:
            m, energy = self.hsrm(x, out_size=size)
        else:
            m, energy = None, self.hsrm.energy(x)
        masks = union_masks(batch["boxes"], size).to(energy)
        return x, m, energy, masks

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor | None:
        if batch is None:
            return None
        _, m, energy, masks = self._maps_and_masks(batch, maps=needs_map(self.loss_weights))
        losses = box_losses(m, energy, masks, self.loss_weights)
        bs = energy.shape[0]
        # one Lightning log call per step (each costs ~0.5 ms of bookkeeping on CPU, a tiny model's step is ~15 ms);
        # the terms are summed here and logged as epoch means
        self.log("train/loss", losses["total"], batch_size=bs, prog_bar=True)
        for k, v in losses.items():
            if k != "total":
                total, n = self._loss_terms.get(k, (0.0, 0))
                self._loss_terms[k] = (total + v.detach() * bs, n + bs)
        return losses["total"]

    def on_train_epoch_start(self) -> None:
        self._loss_terms = {}

    def on_train_epoch_end(self) -> None:
        for k, (total, n) in self._loss_terms.items():
            self.log(f"train/loss_{k}", total / n, sync_dist=True)

    def _eval_step(self, batch: Mapping[str, Any], stage: str) -> None:
        if batch is None:
            return
        x, m, energy, masks = self._maps_and_masks(batch)
        size = m.shape[-2:]
        # the Grad-ECLIP map the HSRM started from, made exactly as the grad_eclip explainer makes it
        baseline = to_image_maps(F.relu(x.evidence[:, -1])[:, None], size)[:, 0]
        boxes = [b.to(m.device) for b in batch["boxes"]]
        ms = self.metrics[stage]
        ms["pointing_game"].update(m.detach(), boxes)
        ms["energy"].update(m.detach(), boxes)
        ms["grad_eclip_pointing_game"].update(baseline, boxes)
        ms["grad_eclip_energy"].update(baseline, boxes)
        losses = box_losses(m, energy, masks, self.loss_weights)
        self.log(f"{stage}/loss", losses["total"], batch_size=m.shape[0], sync_dist=True)

    def _eval_epoch_end(self, stage: str) -> None:
        for name, metric in self.metrics[stage].items():
            value = metric.compute()
            if isinstance(value, dict):
                value = value.get("accuracy", next(iter(value.values())))
            self.log(f"{stage}/{name}", value, prog_bar=name == "pointing_game")
            metric.reset()
        for name, w in (("alpha", self.hsrm.alpha), ("beta", self.hsrm.beta)):
            for i, v in enumerate(w.detach()):
                self.log(f"{stage}/hsrm_{name}{i}", v)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        factory = self.optimizer_factory or (lambda params: torch.optim.AdamW(params, lr=5e-3))
        return factory(params=self.hsrm.parameters())

    def hsrm_config(self) -> dict[str, Any]:
        """The ``config`` of ``hsrm.pt`` (:func:`mmel.hsrm.save_hsrm`): the CLIP it reads and how it was trained."""
        hp = dict(self.hparams)
        extra = {k: hp[k] for k in ("layer_weights", "gate", "conditioning", "losses", "pointing_tolerance")}
        return hsrm_config(self.clip, self.layers, hp["scales"], hp["tau"], **extra)
