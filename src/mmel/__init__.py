"""mmel: explain where CLIP-style models look (Grad-ECLIP, baselines) and learn better-localising maps (HSRM).

Library code lives here; the programs (`train`, `evaluate`, `explain`) are thin Hydra entry points at the repo root.
"""

__version__ = "0.1.0"
