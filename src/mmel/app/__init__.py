"""The explorer: a local web app (Gradio) that compares explanations of one image side by side.

``python -m mmel.app`` (or ``make app``) serves it on http://127.0.0.1:7860; it needs the ``app`` extra
(``pip install -e '.[app]'``). :mod:`mmel.app.inputs`, :mod:`~mmel.app.models`, :mod:`~mmel.app.core` (explaining,
rendering) and :mod:`~mmel.app.samples` hold the logic as plain functions (no Gradio import),
:mod:`mmel.app.ui` the page, :mod:`mmel.app.__main__` the command line.
"""

from mmel.app.inputs import InputError
from mmel.app.models import ModelCache
from mmel.app.samples import ShapesSamples

__all__ = ["InputError", "ModelCache", "ShapesSamples", "build_app"]


def build_app(*args, **kwargs):
    """The page as a ``gr.Blocks`` (see :func:`mmel.app.ui.build_app`); imports Gradio on use."""
    from mmel.app.ui import build_app as _build

    return _build(*args, **kwargs)
