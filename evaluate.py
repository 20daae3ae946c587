"""Score an explainer: python evaluate.py explainer=grad_eclip (see README; installed: mmel-evaluate)."""

import os

from mmel.cli import program  # imports mmel first: its config resolvers are registered before Hydra composes

ROOT = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("MMEL_ROOT", ROOT)  # runs write under the checkout, as always
main = program("evaluate", config_path=os.path.join(ROOT, "conf"))  # this checkout's conf/

if __name__ == "__main__":
    main()
