"""The `mmel` explainer: Grad-ECLIP evidence of several blocks, combined by a (trained) HSRM.

    explainer = build_explainer("mmel", clip, checkpoint="logs/train/runs/.../hsrm.pt")
    maps = explainer(images [B,3,H,W], prompts)          # -> [B, K, H, W] in [0, 1]

Without a checkpoint the HSRM is at its initialisation, which reproduces single-layer Grad-ECLIP exactly.
A checkpoint records the backbone it was trained for; using it with another backbone is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from mmel.backbone import ClipBundle
from mmel.explainers import build_explainer
from mmel.hsrm.module import HSRM, HSRMInputs


class MMELExplainer:
    """MMEL (ours, reconstructed): HSRM over native Grad-ECLIP evidence."""

    def __init__(
        self,
        clip: ClipBundle,
        checkpoint: str | Path | None = None,
        layers: Sequence[int] | int = 6,
        scales: Sequence[int] = (1, 2, 4),
        tau: float | Sequence[float] = 0.1,
    ) -> None:
        from mmel.lit_module import hsrm_layers

        self.clip = clip
        state = None
        if checkpoint is not None:
            path = Path(checkpoint).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"HSRM checkpoint not found: {path} (train.py writes hsrm.pt in its run dir)")
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
                cfg, state = dict(ckpt["config"]), ckpt["hsrm"]
            except Exception as e:  # noqa: BLE001 - one message for every way a checkpoint can be unreadable
                why = f"{type(e).__name__}: {e}"
                raise ValueError(f"{path} is not an HSRM checkpoint written by train.py ({why})") from e
            if cfg.get("backbone") not in (None, clip.name):
                raise ValueError(f"{path} was trained for backbone '{cfg['backbone']}', not '{clip.name}'")
            layers, scales, tau = cfg["layers"], cfg["scales"], cfg["tau"]
        depth = len(clip.model.visual.transformer.resblocks)
        self.layers = hsrm_layers(layers, depth)
        self.grad_eclip = build_explainer("grad_eclip", clip, mode="native")
        self.hsrm = HSRM.for_clip(clip.model, num_layers=len(self.layers), scales=scales, tau=tau)
        if state is not None:
            self.hsrm.load_state_dict(state)
        self.hsrm.to(clip.device).eval()

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        """images [B,3,H,W] normalised, prompts of length K -> maps [B, K, H, W] in [0, 1]."""
        ev = self.grad_eclip.layer_evidence(images, prompts, layers=self.layers)
        b, k = ev.evidence.shape[:2]
        x = HSRMInputs(  # image quantities once per image, pair quantities image-major (see HSRMInputs)
            evidence=ev.evidence.flatten(0, 1),
            keys=ev.keys,
            patch_tokens=ev.patch_tokens,
            text=ev.text_features[None].expand(b, k, -1).flatten(0, 1),
        )
        with torch.no_grad():
            maps, _ = self.hsrm(x, out_size=tuple(images.shape[-2:]))
        return maps.reshape(b, k, *images.shape[-2:])
