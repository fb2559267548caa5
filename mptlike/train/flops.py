"""Peak FLOP/s per device and model FLOPs utilization, computed one way everywhere.

MFU = achieved model FLOP/s per device / peak dense bf16 FLOP/s of the device, where model
FLOPs per token = 6 N + 12 n_layers d_model seq_len (`MPTForCausalLM.flops_per_token`: N all
parameters, attention counted without the causal halving, as llm-foundry and torchtitan do).
Activation recomputation is not counted: MFU measures useful work.
"""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks from the vendors' datasheets, by a substring of the device name
# (torch.cuda.get_device_name), most specific first: an H100 is the SXM part ("NVIDIA H100 80GB
# HBM3") unless its name says PCIe or NVL, whose clocks and power limits are lower.
_PEAKS = (
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("A100", 312e12),  # SXM and PCIe alike
)

FLOPS_FORMULA = "6*N + 12*n_layers*d_model*seq_len per token"


def peak_flops_for_name(name: str) -> float | None:
    """Peak bf16 FLOP/s of the GPU called `name`, or None when we do not know it."""
    for key, peak in _PEAKS:
        if key in name:
            return peak
    return None


def detect_peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of this device, or None when unknown (CPU, other GPUs)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def peak_flops(configured: float, device: torch.device) -> float | None:
    """The user's trainer.peak_flops when set (> 0), else the detected peak."""
    return configured if configured > 0 else detect_peak_flops(device)


def mfu(flops_per_token: float, tokens_per_sec_per_device: float, peak: float | None) -> float | None:
    if not peak:
        return None
    return flops_per_token * tokens_per_sec_per_device / peak
