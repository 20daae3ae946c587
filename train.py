"""Train the HSRM against a frozen CLIP: python train.py model=vitb16 data=coco (see README; installed: mmel-train)."""

import os

from mmel.cli import program  # imports mmel first: its config resolvers are registered before Hydra composes

ROOT = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("MMEL_ROOT", ROOT)  # runs write under the checkout, as always
main = program("train", config_path=os.path.join(ROOT, "conf"))  # this checkout's conf/

if __name__ == "__main__":
    main()
