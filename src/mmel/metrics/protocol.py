"""The per-item protocol of mmel's metrics: what a metric needs, what it records per item, what it outputs.

Every metric of :mod:`mmel.metrics` is a ``torchmetrics.Metric`` that also declares

* ``needs`` — the :class:`ItemContext` entries its per-item values read (``maps``, ``boxes``, ``sizes``,
  ``images``, ``prompts``, ``categories``, ``difficult``, ``scorer``, the trust entries ``others``,
  ``absent`` and ``randomised`` that an evaluation supplies when a metric asks for them, and the dense / labelled
  targets ``masks``, ``points``, ``labels``, ``classes`` of datasets that have them);
* ``item_values(ctx) -> list[dict | None]`` — one JSON-able dict of record fields per item of the context (what the
  evaluate engine writes under ``metrics.<name>`` in ``items.jsonl``; None: nothing to record for that item);
* ``update(records=[...])`` — torchmetrics' own ``update`` fed with such per-item dicts (the replay after a resume,
  a DDP run, or any program that stored the records): the metric's state after replaying an item's record equals
  its state after ``update`` on that item's maps;
* ``outputs`` — its :class:`Output` s: the keys ``compute()`` returns (``""`` for a metric that returns one
  scalar), whether higher is better, and, for an output that is a mean over items, the record field it averages.

The evaluation engine, its replay, the figures and the paper tables read these declarations and nothing else: no
metric is named there by its type, its config key or its ``_target_``. Adding a metric is its module, its config
entry and its tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor

# what an evaluation can put into a context (each metric's ``needs`` is a subset)
CONTEXT = frozenset(
    {"maps", "ids", "boxes", "sizes", "images", "prompts", "categories", "difficult", "scorer", "others", "absent",
     "randomised", "masks", "points", "labels", "classes", "lookalikes", "mentioned", "swapped", "counterfactuals",
     "evidence"}
)  # fmt: skip


@dataclass(frozen=True)
class Output:
    """One value a metric's ``compute()`` returns.

    Args:
        name: its key in ``compute()``'s dict ("" when ``compute()`` returns one scalar); in ``metrics.json`` it is
            ``<stage>/<metric name>/<name>`` (``<stage>/<metric name>`` for "").
        higher_is_better: the direction a table marks as best (None: neither, e.g. a count).
        field: the per-item record field whose mean over items this output is (dotted path into nested dicts), or
            None when it is not a plain mean over items (per-category means, ratios of sums, counts).
        where: a boolean record field selecting the items averaged (e.g. the difficult subset), or None (all).
        index: for a list-valued field, the entry to take (e.g. -1: the last step of a curve).
    """

    name: str
    higher_is_better: bool | None
    field: str | None = None
    where: str | None = None
    index: int | None = None

    def item_value(self, fields: Mapping[str, Any] | None) -> float | None:
        """This output's value for one item from the item's record fields (None: the item does not count)."""
        if self.field is None or not fields:
            return None
        if self.where is not None and not fields.get(self.where):
            return None
        v: Any = fields
        for part in self.field.split("."):
            if not isinstance(v, Mapping) or part not in v:
                return None
            v = v[part]
        if self.index is not None:
            if not v:
                return None
            v = v[self.index]
        return None if v is None else float(v)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ItemContext:
    """What one batch of N scored items offers the metrics (each entry None when the evaluation does not have it).

    maps [N, h, w] in [0, 1]; ids the items' sample ids; boxes N tensors [M_i, 4] xyxy in the frame of ``sizes`` [N,
    2]; images [N, 3, H, W] as fed to the model (None when the items' images differ in size); prompts / categories N
    strings; difficult [N] bool; scorer a :class:`mmel.metrics.ClipScorer`. Trust entries (callables, computed once
    per batch when first asked; see :mod:`mmel.evaluation.context`): ``others()`` -> per item (the image's other
    objects' boxes [M', 4], their categories, every object's boxes [M'', 4]), boxes in the scored frame;
    ``absent(seed)`` -> per item (the image's absent prompt or None, its map [h, w] or None, whether the item is the
    image's first in the split); ``randomised(mode, seed)`` -> (step names, per step the N maps [h, w]).
    Dense targets, where the dataset has them (:mod:`mmel.data.dense`): masks N int8 tensors [H_i, W_i] in the frame
    of ``sizes`` (1 the target, 0 background, -1 ignored); points N float tensors [P_i, 3] (x, y in pixels of that
    frame, label 1 = the target is there, 0 = it is not); labels LongTensor [N], each item's class index into
    ``classes``, the dataset's whole label set (class names).
    Relational items (:mod:`mmel.data.relations`): lookalikes / mentioned N tensors [M_i, 4] (the look-alike's and
    the mentioned context objects' boxes, in the frame of ``sizes``), swapped N strings (the relation-swapped
    expression), counterfactuals N images [3, H, W] as fed to the model (or None: the scene without the
    look-alike). ``evidence(seed)`` (a trust entry) -> per item (unnormalised evidence for its prompt, for its
    image's absent prompt or None, whether the item is its image's first).
    """

    maps: Tensor
    ids: Sequence[str] | None = None
    boxes: Sequence[Tensor] | None = None
    sizes: Tensor | None = None
    images: Tensor | None = None
    prompts: Sequence[str] | None = None
    categories: Sequence[str] | None = None
    difficult: Tensor | None = None
    scorer: Any = None
    others: Callable[[], list[tuple[Tensor, list[str], Tensor]]] | None = None
    absent: Callable[[int], list[tuple[str | None, Tensor | None, bool]]] | None = None
    randomised: Callable[[str, int], tuple[list[str], list[list[Tensor]]]] | None = None
    masks: Sequence[Tensor] | None = None
    points: Sequence[Tensor] | None = None
    labels: Tensor | None = None
    classes: Sequence[str] | None = None
    lookalikes: Sequence[Tensor] | None = None
    mentioned: Sequence[Tensor] | None = None
    swapped: Sequence[str] | None = None
    counterfactuals: Sequence[Tensor | None] | None = None
    evidence: Callable[[int], list[tuple[float, float | None, bool]]] | None = None

    def require(self, needs: frozenset[str], who: str) -> None:
        """Raise a clear error when an entry a metric needs is missing."""
        missing = sorted(n for n in needs if getattr(self, n) is None)
        if missing:
            raise ValueError(f"{who}: this evaluation provides no {missing} (the metric needs {sorted(needs)})")

    def __len__(self) -> int:
        return int(self.maps.shape[0])


def outputs_of(metrics: Mapping[str, Any], stage: str) -> dict[str, dict[str, Any]]:
    """``{"<stage>/<name>[/<output>]": Output as a dict plus "metric": name}`` for every metric (for metrics.json:
    the paper tables and figures read what each key means from here)."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in metrics.items():
        for o in m.outputs:
            key = f"{stage}/{name}/{o.name}" if o.name else f"{stage}/{name}"
            out[key] = {"metric": name, **o.to_dict()}
    return out


def output_of(declared: Mapping[str, Any]) -> Output:
    """The :class:`Output` of one entry of :func:`outputs_of` (as read back from metrics.json)."""
    return Output(**{k: declared.get(k) for k in ("name", "higher_is_better", "field", "where", "index")})


def records_of(records: Sequence[Mapping[str, Any]], name: str) -> list[Any]:
    """Metric ``name``'s fields of every scored record (skipped records left out), in order."""
    return [r["metrics"].get(name) for r in records if "skip" not in r]
