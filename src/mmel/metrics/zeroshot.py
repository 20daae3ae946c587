"""Grad-ECLIP's ImageNet deletion / insertion protocol: zero-shot top-1 / 5 / 10 accuracy over the whole label set
after each perturbation step (Zhao et al., ICML 2024; their ``imagenet_eval_deletion.py`` /
``imagenet_eval_insertion.py``).

What their released code does, and what is kept here:

* **Classifier**: every class of the label set (ImageNet's 1000) is the mean of its prompt embeddings over the
  80 OpenAI ImageNet templates (each embedding L2-normalised, the mean normalised again: open_clip's
  ``build_zero_shot_classifier``); an image's logits are its normalised embedding against all of them. Kept:
  ``templates="openai_imagenet"`` reads the 80 templates from ``open_clip.zero_shot_metadata``.
* **Score at a step**: whether the true class is among the top 1 / 5 / 10 logits; each curve point is the
  accuracy over the images. Kept: per item we record the **rank** of the true class (0 = predicted) at every
  point, so every top-k follows from one forward per point.
* **Steps**: 100 sub-steps of area / 200 pixels, scored every 10th: 10 points at 5 %, ..., 50 % of the area, plus
  the clean image. Deletion curve = [clean, 5 %, ..., 50 %] with deleted pixels replaced by uniform noise;
  insertion = [5 %, ..., 50 %, clean] with the most salient pixels pasted onto black. Kept: ``step=0.05,
  max_fraction=0.5, fill=(noise, zeros)``. Our insertion curve starts at the black canvas (0 %) so that both
  curves share the x axis of :class:`mmel.metrics.DeletionInsertion`; the clean image is recorded as
  ``clean_rank``, and their 11-point insertion array is ``insertion_curve[1:] + [clean]``.
* **Explained target**: their ``eclip_gt`` explains the true class's template-averaged embedding. Here the
  explainer is given the item's prompt (the dataset's template filled with the class name): explainers take
  prompts, not embeddings.
* **Resolution**: they perturb the image at its own size (shorter side capped at 640) and CLIP-preprocess every
  step; here, as in every deletion / insertion of mmel, the perturbation is applied to the model's input.
* **Noise**: theirs is unseeded; ours the seeded pattern of :func:`mmel.metrics.perturbation.make_fill`.

AUCs (trapezoid over the 11 points, x = fraction / 50 %, the axis of :class:`DeletionInsertion`) are reported for
each k; ``deletion_auc`` / ``insertion_auc`` (top-1) keep the column names of the other deletion / insertion
metric, so tables and figures read either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from mmel.metrics.perturbation import MODES, PerturbationOptions, _deletion_insertion_update, auc
from mmel.metrics.protocol import ItemContext, Output

_NAME = "ZeroShotDeletionInsertion"
TOPK = (1, 5, 10)


def class_templates(templates: str | Sequence[str]) -> list[Any]:
    """Template list: ``"openai_imagenet"`` (open_clip's 80 callables), ``"single"`` ("a photo of a {}."), or strings
    with one ``{}``."""
    if templates == "openai_imagenet":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return list(OPENAI_IMAGENET_TEMPLATES)
    if templates == "single":
        return ["a photo of a {}."]
    if isinstance(templates, str) or not templates or any("{}" not in t for t in templates):
        raise ValueError(f"{_NAME}: templates must be 'openai_imagenet', 'single' or strings with '{{}}'; got "
                         f"{templates!r}")  # fmt: skip
    return list(templates)


def _fill(t: Any, name: str) -> str:
    return t(name) if callable(t) else t.format(name)


class ZeroShotRanker:
    """The rank of each image's true class among the template-averaged class embeddings (0 = top-1).

    ``ranker(images [M, 3, H, W], targets LongTensor [M]) -> ranks [M]`` (float, for the perturbation engine).
    """

    def __init__(self, clip: Any, classes: Sequence[str], templates: str | Sequence[str] = "openai_imagenet",
                 chunk: int = 64) -> None:  # fmt: skip
        if not classes:
            raise ValueError(f"{_NAME}: the label set is empty")
        self.clip, self.classes = clip, list(classes)
        temps = class_templates(templates)
        rows = []
        with torch.no_grad():
            for start in range(0, len(self.classes), chunk):
                names = self.classes[start : start + chunk]
                prompts = [_fill(t, n) for n in names for t in temps]
                e = F.normalize(clip.model.encode_text(clip.tokenize(prompts)).float(), dim=-1)
                e = F.normalize(e.view(len(names), len(temps), -1).mean(1), dim=-1)
                rows.append(e)
        self.weights = torch.cat(rows)  # [C, D]

    def logits(self, images: Tensor) -> Tensor:
        from mmel.explainers.vit import encode_image  # open_clip only when a CLIP is used

        with torch.no_grad():
            f = F.normalize(encode_image(self.clip.model, images.to(self.weights.device)).float(), dim=-1)
            return f @ self.weights.T

    def __call__(self, images: Tensor, targets: Tensor) -> Tensor:
        logits = self.logits(images)
        t = torch.as_tensor(targets, device=logits.device).view(-1, 1)
        true = logits.gather(1, t)
        return (logits > true).sum(1).float()  # classes strictly above the true one (ties: in its favour)


def topk_curves(ranks: Tensor) -> dict[int, Tensor]:
    """{k: hits [.., S + 1]} of rank curves (rank < k)."""
    return {k: (ranks < k).float() for k in TOPK}


class ZeroShotDeletionInsertion(Metric):
    """Grad-ECLIP's ImageNet deletion / insertion (module docstring): zero-shot top-k over the dataset's label set.

    ``update(maps [N, h, w], images [N, 3, H, W], labels [N], ranker)`` or ``update(records=...)``. ``compute()``
    returns {"deletion_auc", "insertion_auc" (top-1), "<mode>_top<k>_auc", "clean_top<k>"} for k in 1, 5, 10.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False
    needs = frozenset({"maps", "images", "labels", "classes", "scorer"})

    def __init__(self, templates: str | Sequence[str] = "openai_imagenet", **kwargs: Any) -> None:
        names = {f.name for f in fields(PerturbationOptions)}
        defaults = {"step": 0.05, "max_fraction": 0.5, "fill": ("noise", "zeros")}
        opts = {**defaults, **{k: kwargs.pop(k) for k in list(kwargs) if k in names}}
        options = PerturbationOptions(**opts)
        super().__init__(**kwargs)
        self.options = options
        self.templates = templates if isinstance(templates, str) else list(templates)
        class_templates(self.templates)  # validates (and fails early on a bad list)
        self.fractions = self.options.fractions
        self._rankers: dict[Any, ZeroShotRanker] = {}
        for m in MODES:
            self.add_state(f"{m}_ranks", [], dist_reduce_fx="cat")
        self.add_state("clean_ranks", [], dist_reduce_fx="cat")

    @property
    def outputs(self) -> tuple[Output, ...]:
        out = [
            Output("deletion_auc", False, field="deletion_auc"),
            Output("insertion_auc", True, field="insertion_auc"),
        ]
        for k in TOPK:
            out += [Output(f"{m}_top{k}_auc", m == "insertion", field=f"{m}_top{k}_auc") for m in self.options.modes]
            out.append(Output(f"clean_top{k}", True, field=f"clean_top{k}"))
        return tuple(out)

    def ranker(self, clip: Any, classes: Sequence[str]) -> ZeroShotRanker:
        """The zero-shot classifier of this CLIP and label set (built once, kept)."""
        key = (id(clip.model), tuple(classes))
        if key not in self._rankers:
            self._rankers[key] = ZeroShotRanker(clip, classes, self.templates)
        return self._rankers[key]

    def _ranks(self, maps: Tensor, images: Tensor, labels: Tensor, ranker: ZeroShotRanker) -> dict[str, Tensor]:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (maps.shape[0],) or bool((labels < 0).any() | (labels >= len(ranker.classes)).any()):
            raise ValueError(f"{_NAME}: labels must be [N={maps.shape[0]}] class indices < {len(ranker.classes)}")
        curves = _deletion_insertion_update(maps, images, ranker, labels, self.options)
        with torch.no_grad():
            curves["clean"] = ranker(images, labels)
        return {k: v.cpu() for k, v in curves.items()}

    def item_values(self, ctx: ItemContext) -> list[dict[str, Any]]:
        """Per item {"<mode>_rank" [S + 1], "clean_rank", "<mode>_curve" (top-1 hits), "<mode>_auc",
        "<mode>_top<k>_auc", "clean_top<k>"}."""
        if ctx.images is None and ctx.maps is not None:
            raise ValueError(f"{_NAME}: needs the items' images stacked (a fixed input size, data.resize=fixed)")
        ctx.require(self.needs, _NAME)
        ranks = self._ranks(ctx.maps, ctx.images, ctx.labels, self.ranker(ctx.scorer.clip, ctx.classes))
        return [self._record({k: v[i] for k, v in ranks.items()}) for i in range(len(ctx))]

    def _record(self, ranks: dict[str, Tensor]) -> dict[str, Any]:
        out: dict[str, Any] = {"clean_rank": int(ranks["clean"])}
        for k in TOPK:
            out[f"clean_top{k}"] = float(ranks["clean"] < k)
        for m in self.options.modes:
            r = ranks[m]
            out[f"{m}_rank"] = [int(v) for v in r.tolist()]
            for k, hits in topk_curves(r).items():
                a = float(auc(hits[None], self.fractions)[0])
                out[f"{m}_top{k}_auc"] = a
                if k == 1:
                    out[f"{m}_curve"], out[f"{m}_auc"] = hits.tolist(), a
        return out

    def update(
        self,
        maps: Tensor | None = None,
        images: Tensor | None = None,
        labels: Tensor | None = None,
        ranker: ZeroShotRanker | None = None,
        *,
        records: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        """Add N (map, image, label) items ranked by ``ranker``, or N per-item ``records`` of :meth:`item_values`."""
        if records is not None:
            ranks = {m: torch.tensor([r[f"{m}_rank"] for r in records], dtype=torch.float32).reshape(len(records), -1)
                     for m in self.options.modes}  # fmt: skip
            ranks["clean"] = torch.tensor([float(r["clean_rank"]) for r in records])
        else:
            if ranker is None:
                raise ValueError(f"{_NAME}: update needs a `ranker` (ZeroShotRanker) or `records`")
            ranks = self._ranks(maps, images, labels, ranker)
        for m in self.options.modes:
            getattr(self, f"{m}_ranks").append(ranks[m].to(self.device))
        self.clean_ranks.append(ranks["clean"].to(self.device))

    def _cat(self, name: str) -> Tensor:
        state = getattr(self, name)
        return dim_zero_cat(state) if not (isinstance(state, list) and not state) else torch.zeros(0)

    def compute(self) -> dict[str, Tensor]:
        nan = torch.tensor(float("nan"))
        clean = self._cat("clean_ranks")
        out: dict[str, Tensor] = {}
        for m in MODES:
            ranks = self._cat(f"{m}_ranks") if m in self.options.modes else torch.zeros(0)
            for k in TOPK:
                hits = (ranks < k).float()
                out[f"{m}_top{k}_auc"] = auc(hits, self.fractions).mean() if len(ranks) else nan
            out[f"{m}_auc"] = out[f"{m}_top1_auc"]
        for k in TOPK:
            out[f"clean_top{k}"] = (clean < k).float().mean() if len(clean) else nan
        return out

    def curves(self, k: int = 1) -> dict[str, Tensor]:
        """{"fractions": [S + 1], "<mode>": [N, S + 1] top-``k`` hits per item} for plots."""
        out = {"fractions": self.fractions}
        with self.sync_context(dist_sync_fn=self.dist_sync_fn):
            for m in self.options.modes:
                out[m] = (self._cat(f"{m}_ranks").reshape(-1, len(self.fractions)) < k).float()
        return out
