"""MMEL's Hierarchical Semantic Relationship Module (HSRM), our reconstruction (docs/hsrm.md).

`HSRM` turns per-layer Grad-ECLIP evidence (+ keys, patch tokens and the text embedding of a frozen CLIP) into a
saliency map; `HSRMInputs.from_evidence` is the one conversion from Grad-ECLIP's evidence; `losses` holds the box
objectives it is trained with; `save_hsrm` / `load_hsrm` write and read `hsrm.pt`. The `mmel` explainer
(:mod:`mmel.hsrm.explainer`) is built through ``mmel.explainers.build_explainer("mmel", clip, checkpoint=...)``.
Results are "MMEL (ours, reconstructed)".
"""

from mmel.hsrm.checkpoint import FORMAT_VERSION, hsrm_config, load_hsrm, read_hsrm, save_hsrm
from mmel.hsrm.losses import box_losses, needs_map
from mmel.hsrm.module import HSRM, HSRMInputs, hsrm_layers

__all__ = [
    "FORMAT_VERSION",
    "HSRM",
    "HSRMInputs",
    "box_losses",
    "needs_map",
    "hsrm_config",
    "hsrm_layers",
    "load_hsrm",
    "read_hsrm",
    "save_hsrm",
]
