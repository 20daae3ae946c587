"""MMEL's Hierarchical Semantic Relationship Module (HSRM), our reconstruction (DESIGN.md §4).

`HSRM` turns per-layer Grad-ECLIP evidence (+ keys, patch tokens and the text embedding of a frozen CLIP) into a
saliency map; `losses` holds the box objectives it is trained with. Results are "MMEL (ours, reconstructed)".
"""

from mmel.hsrm.losses import box_losses
from mmel.hsrm.module import HSRM, HSRMInputs

__all__ = ["HSRM", "HSRMInputs", "box_losses"]
