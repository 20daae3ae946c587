"""mmel: explain where CLIP-style models look (Grad-ECLIP, baselines) and learn better-localising maps (HSRM).

Library code lives here; the programs (`train`, `evaluate`, `explain`) run as the console scripts `mmel-train`, ...
(:mod:`mmel.cli`) or through the thin Hydra shims at the repo root.
"""

from omegaconf import OmegaConf

__version__ = "0.1.0"


def _hsrm_default(key: str):
    from mmel.hsrm.module import hsrm_default  # torch only when a config asks

    v = hsrm_default(key)
    return OmegaConf.create(v) if isinstance(v, list) else v  # a container resolves in place too (--resolve)


# ${hsrm_default:<key>} in conf/: the HSRM's settings are written once, in mmel.hsrm.module.HSRMSettings
OmegaConf.register_new_resolver("hsrm_default", _hsrm_default, replace=True)
