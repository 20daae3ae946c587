"""CNN image towers split at a stage: the feature map a stage leaves, and the rest of the tower from it.

Two layouts are read (docs/model_families.md):
  * open_clip's ``ModifiedResNet`` (RN50, RN101, ...): ``stem`` then ``layer1`` .. ``layer4``, then ``attnpool``
    (an attention pool whose output is the embedding);
  * open_clip's ``TimmModel`` around a timm CNN with ``stem`` and ``stages`` (ConvNeXt and the like): the stages,
    ``norm_pre``, the trunk's ``forward_head`` (pooling, norm, and its classifier as projection when there is one),
    then the wrapper's ``head``.

:func:`split_tower` returns ``front(images) -> [B, C, h, w]`` (the output of stage ``stage``) and
``back(features) -> [B, E]`` so that ``back(front(x))`` equals ``model.encode_image(x)`` (tests pin it). Grad-CAM
reads the last stage, M2IB puts its bottleneck after a stage. Stages are counted from 0.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from mmel.families import MODIFIED_RESNET, TIMM_CNN


def stages(visual: nn.Module, family_name: str) -> list[nn.Module]:
    """The stages of a CNN tower, in order."""
    if family_name == MODIFIED_RESNET:
        return [visual.layer1, visual.layer2, visual.layer3, visual.layer4]
    if family_name == TIMM_CNN:
        return list(visual.trunk.stages)
    raise TypeError(f"not a CNN tower: family {family_name!r}")


def resolve_stage(stage: int, n: int, what: str) -> int:
    """A stage index (negative counts from the end) in 0..n-1, else a clear error."""
    j = int(stage) + n if int(stage) < 0 else int(stage)
    if not 0 <= j < n:
        raise ValueError(f"{what}: stage {stage} is out of range for a CNN tower with {n} stages")
    return j


def split_tower(
    visual: nn.Module, family_name: str, stage: int
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """(front, back) of the tower cut after stage ``stage`` (non-negative): see the module docstring."""
    blocks = stages(visual, family_name)
    if family_name == MODIFIED_RESNET:
        stem: Callable[[Tensor], Tensor] = lambda x: visual.stem(x.to(visual.conv1.weight.dtype))  # noqa: E731
        head: Callable[[Tensor], Tensor] = visual.attnpool
    else:
        trunk = visual.trunk
        stem = trunk.stem
        norm_pre = getattr(trunk, "norm_pre", nn.Identity())
        head = lambda x: visual.head(trunk.forward_head(norm_pre(x)))  # noqa: E731

    def front(x: Tensor) -> Tensor:
        x = stem(x)
        for blk in blocks[: stage + 1]:
            x = blk(x)
        return x

    def back(x: Tensor) -> Tensor:
        for blk in blocks[stage + 1 :]:
            x = blk(x)
        return head(x)

    return front, back
