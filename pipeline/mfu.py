"""The dense peak FLOP/s that MFU is measured against.

Datasheet figures (dense, no 2:4 sparsity) by exact device family and training dtype: an H100
SXM, PCIe and NVL differ by 30 %, an L40S is not an L4, and an fp32 run is measured against the
fp32 (or TF32, when torch allows it for matmuls) peak, not the bf16 one. Anything not in the
table (and any CPU) gets the matmul rate measured here, in the training dtype, instead of an
invented figure.
"""
from __future__ import annotations

import re
import time

import torch

TFLOPS = 1e12
# (pattern on torch.cuda.get_device_name, {dtype: dense peak}). Checked in order: the more
# specific names first ("H100 NVL" and "H100 PCIe" before "H100").
PEAKS: list[tuple[str, dict[str, float]]] = [
    (r"\bGH200\b", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"\bH200 NVL\b", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH200\b", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"\bH100 NVL\b", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH100 PCIe\b", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"\bH100\b.*\bHBM3\b|\bH100 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"\bA100\b", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),  # 40 and 80 GB, SXM and PCIe
    (r"\bA800\b", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\bL40S\b", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL40\b", {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"\bV100\b.*SXM", {"fp16": 125.0, "fp32": 15.7}),
    (r"\bV100\b", {"fp16": 112.0, "fp32": 14.0}),  # PCIe
]
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def dtype_key(dtype: torch.dtype, device: torch.device) -> str:
    name = DTYPE_NAMES[dtype]
    if name == "fp32" and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return name


def datasheet_peak(device_name: str, dtype_name: str) -> float | None:
    """The table's figure in FLOP/s, or None when the device or dtype is not in it."""
    for pattern, peaks in PEAKS:
        if re.search(pattern, device_name):
            if dtype_name == "tf32" and "tf32" not in peaks:  # no TF32 units (V100): fp32 it is
                dtype_name = "fp32"
            return peaks[dtype_name] * TFLOPS if dtype_name in peaks else None
    return None


def measured_peak(device: torch.device, dtype: torch.dtype) -> float:
    """The matmul rate of this device in `dtype` (a few square products, after a warm-up)."""
    n = 4096 if device.type == "cuda" else 1024
    x = torch.randn(n, n, dtype=dtype, device=device)
    y = torch.randn(n, n, dtype=dtype, device=device)
    x @ y
    reps = 10 if device.type == "cuda" else 5
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(reps):
        x @ y
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return reps * 2 * n ** 3 / (time.perf_counter() - t)


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(dense peak FLOP/s of one device in `dtype`, where the figure comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = dtype_key(dtype, device)
        peak = datasheet_peak(name, key)
        if peak is not None:
            return peak, f"datasheet {name} {key}"
        return measured_peak(device, dtype), f"measured matmul rate of {name} in {key}"
    return measured_peak(device, dtype), f"measured matmul rate of this CPU in {DTYPE_NAMES[dtype]}"
