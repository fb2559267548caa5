"""Low-precision LayerNorm: under autocast, normalize in the autocast dtype.

Autocast runs ``layer_norm`` in float32, which makes every norm read and write twice the bytes of
the bf16 activations around it. MPT trains with the norm in bf16 instead: the input, weight and
bias are cast down to the autocast dtype and the kernel runs with autocast switched off, so
nothing casts them back up. Outside autocast this is exactly ``nn.LayerNorm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or None when autocast is off there."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # devices with no autocast at all, e.g. meta
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


class LPLayerNorm(nn.LayerNorm):
    """LayerNorm that runs in the autocast dtype when autocast is on (weight, optional bias)."""

    def __init__(
        self,
        normalized_shape: int | tuple[int, ...],
        eps: float = 1e-5,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=True, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        device_type = x.device.type
        low = _autocast_dtype(device_type)
        if low is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        weight = self.weight.to(low)
        bias = self.bias.to(low) if self.bias is not None else None
        with torch.autocast(device_type=device_type, enabled=False):
            return F.layer_norm(x.to(low), self.normalized_shape, weight, bias, self.eps)
