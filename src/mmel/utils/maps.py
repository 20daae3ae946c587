"""Map arithmetic shared by the explainers and the metrics (kept free of open_clip so metrics import fast)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# A map whose range is below this fraction of its magnitude is treated as constant (float noise is not signal).
CONST_RTOL = 1e-6
CONST_ATOL = 1e-12


def minmax(x: Tensor, dims: Sequence[int] = (-2, -1)) -> Tensor:
    """Min-max normalise ``x`` over ``dims`` to [0, 1]; slices that are constant (to float noise) become zeros."""
    dims = tuple(dims)
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    span = hi - lo
    flat = span <= CONST_ATOL + CONST_RTOL * torch.maximum(hi.abs(), lo.abs())
    out = (x - lo) / torch.where(flat, torch.ones_like(span), span)
    return torch.where(flat, torch.zeros_like(out), out)
