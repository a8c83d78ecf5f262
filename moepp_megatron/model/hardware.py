"""The GPUs the estimates know: vendor data-sheet numbers (SXM parts unless named), as the
MFU in the training log and the step-time estimate (model/step_time.py) use them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float  # dense bf16 tensor-core peak, FLOP/s
    memory_bandwidth: float  # HBM, bytes/s
    nvlink: float  # NVLink per GPU and direction, bytes/s
    # Inter-node bandwidth per GPU and direction, bytes/s: the NIC per GPU of the vendor's
    # reference node (DGX A100: 8 x HDR 200 Gb/s; DGX H100/H200: 8 x NDR 400 Gb/s).
    network: float
    memory: int  # bytes


# Longest names first: "H100 PCIe" must match before "H100".
GPUS = (
    GPU("H100 PCIe", 756e12, 2.0e12, 300e9, 50e9, 80 * 10**9),
    GPU("H200", 989e12, 4.8e12, 450e9, 50e9, 141 * 10**9),
    GPU("H100", 989e12, 3.35e12, 450e9, 50e9, 80 * 10**9),
    GPU("H800", 989e12, 3.35e12, 200e9, 50e9, 80 * 10**9),
    GPU("A100", 312e12, 2.039e12, 300e9, 25e9, 80 * 10**9),  # the 80 GB part
)


def find_gpu(device_name: str) -> GPU | None:
    """The entry whose name occurs in ``device_name`` (``torch.cuda.get_device_name()``,
    e.g. "NVIDIA A100-SXM4-80GB"), or None."""
    return next((gpu for gpu in GPUS if gpu.name in device_name), None)


def peak_flops(device_name: str) -> float | None:
    gpu = find_gpu(device_name)
    return gpu.bf16_flops if gpu else None
