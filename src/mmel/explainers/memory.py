"""Memory budgets for explainer calls: estimate before allocating, then cut a batch into chunks that fit.

The estimate (:func:`estimate_bytes`) is deliberately generous: the traced blocks keep attention logits and weights
[B, heads, T, T] (and the batched backward one more per prompt), every block keeps a few activations [B, T, width]
per pass. :func:`chunk_size` turns it into the number of images one call may take within a budget (a fraction of
the device's free memory, or an explicit byte count), so a large batch or many prompts per image degrade to more
calls, never to an out-of-memory crash. ``explain`` refuses a single image that cannot fit (``mmel.explain``).
"""

from __future__ import annotations

import torch

from mmel.families import vit_problem

#: share of the device's free memory one explainer call may plan to use
DEFAULT_FRACTION = 0.5


def estimate_bytes(clip, explainer, size: tuple[int, int], k: int, batch: int = 1) -> int:
    """Estimated peak bytes of one explainer call for ``batch`` images of ``size`` (H, W) and ``k`` prompts each."""
    visual = clip.model.visual
    if vit_problem(visual):
        # a CNN / timm tower (docs/model_families.md): no token count to square; a generous bound of ~2000 float
        # activations per input pixel per pass, one pass per prompt plus two
        return int(4 * batch * size[0] * size[1] * 2000 * (2 + k))
    blocks = visual.transformer.resblocks
    depth, heads, width = len(blocks), blocks[0].attn.num_heads, visual.transformer.width
    t = (size[0] // clip.patch_size) * (size[1] // clip.patch_size) + 1
    layers = getattr(explainer, "layers", None)
    traced = depth - min(layers) if isinstance(layers, list) and layers else depth
    per_image = traced * heads * t * t * (2 + k) + depth * t * width * (12 + 4 * k)
    return int(4 * batch * per_image)


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` (CUDA: free device memory; CPU: MemAvailable), None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def budget_bytes(device: torch.device, budget: int | None = None, fraction: float = DEFAULT_FRACTION) -> int | None:
    """The bytes one call may plan for: ``budget`` when given, else ``fraction`` of the free memory (None: unknown,
    no limit)."""
    if budget is not None:
        return int(budget)
    free = available_bytes(device)
    return None if free is None else int(free * fraction)


def chunk_size(clip, explainer, size: tuple[int, int], k: int, n: int, budget: int | None) -> int:
    """How many of ``n`` images (``k`` prompts each, input ``size``) one call takes within ``budget`` bytes (at
    least 1: a single image that does not fit is the caller's to refuse)."""
    if budget is None or n <= 1:
        return max(n, 1)
    per_image = max(estimate_bytes(clip, explainer, size, k, 1), 1)
    return int(max(1, min(n, budget // per_image)))
