"""Prompt and model randomisation as evaluate metrics (the sanity checks of :mod:`mmel.metrics.sanity`, per item).

* :class:`PromptRandomisation` — each item's map against its image's map for the prompt of a category absent from
  the image (one per image, seeded), by every measure of :data:`mmel.metrics.similarity.MEASURES`. Lower: the map
  follows the prompt. ``prompt_insensitive`` flags a mean Spearman above ``flag_above``.
* :class:`ModelRandomisation` — per item and mode, the similarity of the map after each randomisation step
  (:func:`mmel.metrics.sanity.randomised_copies`, seeded) to the original map (Adebayo et al. 2018). Lower: the map
  depends on the model's weights.

Both follow :mod:`mmel.metrics.protocol`: the evaluation supplies the absent-prompt maps (``ctx.absent``) and the
randomised models' maps (``ctx.randomised``); the metric turns them into per-item records and sums records.
Per-item values are NaN-aware means over items (a constant map has no Spearman correlation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from mmel.metrics.protocol import ItemContext, Output
from mmel.metrics.sanity import MODES
from mmel.metrics.similarity import MEASURES, similarities


def _mean_rows(values: list[Tensor] | Tensor, width: int) -> Tensor:
    """Concatenated per-item rows [N, ...] (a cat state, before or after a DDP sync) -> NaN-aware mean [...]."""
    v = dim_zero_cat(values) if isinstance(values, list) and values else values
    if isinstance(v, list) or v.numel() == 0:
        return torch.full((width,), float("nan"), dtype=torch.float64)
    return torch.nanmean(v.double(), dim=0)


def _rows(values: Tensor) -> list[dict[str, float]]:
    """[N, len(MEASURES)] -> N dicts {measure: value}."""
    return [dict(zip(MEASURES, row, strict=True)) for row in values.tolist()]


class PromptRandomisation(Metric):
    """Each item's map vs its image's absent-prompt map (see the module docstring).

    ``update(maps [N, H, W], other_maps [N, H, W])`` or ``update(records=...)``; ``compute()`` -> {measure: mean
    over items, "prompt_insensitive": 1.0 when the mean Spearman exceeds ``flag_above`` else 0.0, "pairs"}.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    needs = frozenset({"maps", "absent"})

    def __init__(self, flag_above: float = 0.9, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.flag_above, self.seed = float(flag_above), int(seed)
        self.add_state("values", default=[], dist_reduce_fx="cat")

    @property
    def outputs(self) -> tuple[Output, ...]:
        return (*(Output(m, False, field=m) for m in MEASURES), Output("prompt_insensitive", False),
                Output("pairs", None))  # fmt: skip

    def item_values(self, ctx: ItemContext) -> list[dict[str, Any] | None]:
        """Per item {"prompt": the absent prompt, <measure>: similarity} (None when the image has every category)."""
        ctx.require(self.needs, "PromptRandomisation")
        absent = ctx.absent(self.seed)
        js = [j for j, (_, m, _) in enumerate(absent) if m is not None]
        out: list[dict[str, Any] | None] = [None] * len(ctx)
        if js:
            sims = similarities(ctx.maps[js].float().cpu(), torch.stack([absent[j][1] for j in js]).float())
            for j, row in zip(js, _rows(torch.stack(list(sims.values()), dim=-1)), strict=True):
                out[j] = {"prompt": absent[j][0], **row}
        return out

    def update(
        self,
        maps: Tensor | None = None,
        other_maps: Tensor | None = None,
        *,
        records: Sequence[dict[str, Any] | None] | None = None,
    ) -> None:
        """Add N map pairs, or N per-item ``records`` of :meth:`item_values` (None entries count nothing)."""
        if records is not None:
            rows = [[r[m] for m in MEASURES] for r in records if r is not None]
            values = torch.tensor(rows, dtype=torch.float32).reshape(-1, len(MEASURES))
        else:
            values = torch.stack(list(similarities(maps, other_maps).values()), dim=-1).float()
        self.values.append(values)

    def compute(self) -> dict[str, Tensor]:
        mean = _mean_rows(self.values, len(MEASURES))
        out = {m: mean[j].float() for j, m in enumerate(MEASURES)}
        v = self.values
        n = (dim_zero_cat(v).shape[0] if v else 0) if isinstance(v, list) else v.shape[0]
        out["prompt_insensitive"] = torch.tensor(float(bool(out["spearman"] > self.flag_above)))
        out["pairs"] = torch.tensor(float(n))
        return out


class ModelRandomisation(Metric):
    """Similarity of each map after every randomisation step to the original (see the module docstring).

    ``update(maps, randomised={mode: S maps [N, H, W]}, steps)`` or ``update(records=...)``; ``compute()`` ->
    {"<mode>/<measure>": mean over items after the last step (full randomisation when cascading),
    "<mode>/<measure>@<step>": the curve}.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    needs = frozenset({"maps", "randomised"})

    def __init__(self, modes: Sequence[str] = ("cascading",), seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.modes = [str(m) for m in ([modes] if isinstance(modes, str) else modes)]
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"ModelRandomisation: modes={self.modes}; expected a non-empty subset of {MODES}")
        self.seed = int(seed)
        self.steps: list[str] = []
        for mode in self.modes:
            self.add_state(f"values_{mode}", default=[], dist_reduce_fx="cat")

    @property
    def outputs(self) -> tuple[Output, ...]:
        out = []
        for mode in self.modes:
            for m in MEASURES:
                out.append(Output(f"{mode}/{m}", False, field=f"{mode}.{m}", index=-1))
                out += [Output(f"{mode}/{m}@{s.replace(' ', '')}", False) for s in self.steps]
        return tuple(out)

    def item_values(self, ctx: ItemContext) -> list[dict[str, Any]]:
        """Per item {"steps": [...], <mode>: {<measure>: [similarity after each step]}}."""
        ctx.require(self.needs, "ModelRandomisation")
        recs: list[dict[str, Any]] = [{"steps": []} for _ in range(len(ctx))]
        maps = ctx.maps.float().cpu()
        for mode in self.modes:
            steps, per_step = ctx.randomised(mode, self.seed)
            sims = [_rows(torch.stack(list(similarities(maps, torch.stack(ms)).values()), dim=-1)) for ms in per_step]
            for j, rec in enumerate(recs):
                rec["steps"] = list(steps)
                rec[mode] = {m: [s[j][m] for s in sims] for m in MEASURES}
        return recs

    def update(
        self,
        maps: Tensor | None = None,
        randomised: dict[str, Sequence[Tensor]] | None = None,
        steps: Sequence[str] | None = None,
        *,
        records: Sequence[dict[str, Any] | None] | None = None,
    ) -> None:
        """Original maps [N, H, W] and, per mode, the S maps [N, H, W] after each step named by ``steps``; or N
        per-item ``records`` of :meth:`item_values`."""
        if records is not None:
            records = [r for r in records if r is not None and r.get("steps")]
            if not records:
                return
            steps = records[0]["steps"]
            curves = {
                mode: torch.tensor(
                    [[[r[mode][m][s] for m in MEASURES] for s in range(len(steps))] for r in records],
                    dtype=torch.float32,
                )  # fmt: skip
                for mode in self.modes
            }
        else:
            curves = {
                mode: torch.stack([torch.stack(list(similarities(maps, m).values()), dim=-1) for m in step_maps], 1)
                for mode, step_maps in randomised.items()
            }
        if self.steps and list(steps) != self.steps:
            raise ValueError(f"ModelRandomisation: steps {list(steps)} differ from earlier ones {self.steps}")
        self.steps = list(steps)
        for mode, values in curves.items():
            if mode not in self.modes:
                raise ValueError(f"ModelRandomisation: mode {mode!r} is not among {self.modes}")
            getattr(self, f"values_{mode}").append(values.reshape(-1, len(self.steps), len(MEASURES)).float())

    def compute(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for mode in self.modes:
            curve = _mean_rows(getattr(self, f"values_{mode}"), len(self.steps) * len(MEASURES))
            curve = curve.reshape(len(self.steps), len(MEASURES)) if self.steps else curve.reshape(0, len(MEASURES))
            for j, m in enumerate(MEASURES):
                out[f"{mode}/{m}"] = curve[-1, j].float() if self.steps else torch.tensor(float("nan"))
                for s, step in enumerate(self.steps):
                    out[f"{mode}/{m}@{step.replace(' ', '')}"] = curve[s, j].float()
        return out
