"""The `mmel` explainer: Grad-ECLIP evidence of several blocks, combined by a (trained) HSRM.

    explainer = build_explainer("mmel", clip, checkpoint="logs/train/runs/.../hsrm.pt")
    maps = explainer(images [B,3,H,W], prompts)          # -> [B, K, H, W] in [0, 1]

Without a checkpoint the HSRM is at its initialisation, which reproduces single-layer Grad-ECLIP exactly. A
checkpoint records the CLIP it was trained for (see :mod:`mmel.hsrm.checkpoint`). Registered with
``mmel.explainers`` by dotted path (that package sits below this one and never imports it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from mmel.backbone import ClipBundle
from mmel.explainers import build_explainer, register
from mmel.explainers.base import Explainer
from mmel.families import VIT_FAMILIES
from mmel.hsrm.checkpoint import load_hsrm
from mmel.hsrm.module import DEFAULTS, HSRM, HSRMInputs, hsrm_layers


@register("mmel")
class MMELExplainer(Explainer):
    """MMEL (ours, reconstructed): HSRM over native Grad-ECLIP evidence. Its one hook, :meth:`raw_maps`, returns
    the HSRM's energy map ReLU(G) * A on the patch grid; the base class normalises and resizes it as for every other
    explainer (which is also what the HSRM's own forward does, so both give the same map)."""

    needs_grad = True  # Grad-ECLIP evidence needs dS/d(activations)
    families = VIT_FAMILIES

    def __init__(
        self,
        clip: ClipBundle,
        checkpoint: str | Path | None = None,
        layers: Sequence[int] | int = DEFAULTS.layers,
        scales: Sequence[int] = DEFAULTS.scales,
        tau: float | Sequence[float] = DEFAULTS.tau,
    ) -> None:
        super().__init__(clip)
        if checkpoint is not None:
            self.hsrm, cfg = load_hsrm(checkpoint, clip)
            self.layers = cfg["layers"]
        else:
            self.layers = hsrm_layers(layers, self.depth)
            self.hsrm = HSRM.for_clip(clip.model, num_layers=len(self.layers), scales=scales, tau=tau)
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.grad_eclip = build_explainer("grad_eclip", clip, mode="native")
        self.hsrm.to(clip.device).eval()

    def __repr__(self) -> str:
        return f"MMELExplainer(layers={self.layers}, checkpoint={self.checkpoint!r})"

    def raw_maps(self, images: Tensor, prompts: list[str]) -> Tensor:
        """HSRM energy [B, K, h, w] from the Grad-ECLIP evidence of the selected blocks."""
        return self.raw_maps_text(images, self.grad_eclip.text_features(prompts))

    def raw_maps_text(self, images: Tensor, text: Tensor) -> Tensor:
        """The same for text embeddings [K, E], or [B, K, E] per image (``explain_batch``: one forward of the
        images and one VJP of K_max rows, as Grad-ECLIP; padding rows give zero maps and are dropped)."""
        ev = self.grad_eclip.layer_evidence_text(images, text, self.layers)
        b, k = ev.evidence.shape[:2]
        with torch.no_grad():
            energy = self.hsrm.energy(HSRMInputs.from_evidence(ev))
        return energy.reshape(b, k, *energy.shape[-2:])
