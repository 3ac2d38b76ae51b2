"""GPU machine types: the hardware half of a preset's ``[cluster]`` table, with where each figure comes from.

A preset names one with ``machine_type = "p4d.24xlarge"``; the type fills every ``[cluster]`` key the preset leaves
out, and a key the preset gives wins (``network_gbps = 200`` on a p4d is a what-if). An unknown name's error lists
the types; docs/simulator.md has their table. Figures are per machine; the host-copy figures are the per-GPU figure
times the GPUs, which assumes each GPU has a PCIe link of its own to the host (true of HGX/DGX boards) and that host
memory keeps up.

The host-copy figures of the H100 machine types were measured on one H100 with torch 2.11 (``../shared/GPU.md``,
2026-11-24/25): GPU-to-CPU into page-locked memory 54.8 GB/s, CPU-to-GPU 51.6 GB/s, GPU-to-CPU into pageable
memory 12.0 GB/s, and a bf16 GEMM 1.5% slower while a 12 GiB GPU-to-CPU copy ran beside it (``copy_slowdown``).
The runtime page-locks its CPU-memory store (runtime/device.py), so the page-locked figures are the ones the
simulator uses; ``pageable_d2h_gbps`` is what a checkpoint into ordinary memory gets, for a what-if
(``pcie_gbps = <that figure>`` in the preset).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

# per GPU, measured on the lent H100 (../shared/GPU.md): GB/s -> Gbit/s
_H100_D2H_GBPS, _H100_H2D_GBPS, _H100_PAGEABLE_GBPS = 54.8 * 8, 51.6 * 8, 12.0 * 8
_H100_COPY_SLOWDOWN = 0.015


@dataclass(frozen=True)
class MachineType:
    name: str
    gpus_per_machine: int
    gpu: str
    gpu_memory_gb: float
    gpu_peak_tflops: float  # dense bf16 per GPU
    cpu_memory_gb: float
    network_gbps: float  # inter-machine, per machine
    pcie_gbps: float  # GPU -> page-locked CPU memory, all GPUs of the machine together
    h2d_gbps: float  # page-locked CPU memory -> GPU, all GPUs together (recovery)
    copy_slowdown: float  # fraction by which compute slows while a GPU-to-CPU copy runs beside it
    pageable_d2h_gbps: float  # GPU -> ordinary (pageable) CPU memory: for what-ifs, not used by default
    source: str

    def cluster_keys(self) -> dict:
        """The ``[cluster]`` keys this type fills."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("name", "source",
                                                                                      "pageable_d2h_gbps")}


MACHINE_TYPES: dict[str, MachineType] = {t.name: t for t in (
    MachineType(
        "p4d.24xlarge", 8, "A100-40GB", 40, 312, 1152, 400, 200, 200, 0.0, 200,
        "GEMINI's evaluation machine (SOSP 2023: 8 A100-40GB, 1152 GB CPU memory, 400 Gbps network); A100 dense "
        "bf16 312 TFLOP/s (NVIDIA A100 datasheet). Host copies: our estimate of 25 GB/s per machine (8 GPUs behind 4 "
        "PCIe 4.0 switches), both directions; copy slowdown not measured (0)."),
    MachineType(
        "p5.48xlarge", 8, "H100-80GB", 80, 989, 2 * 2 ** 40 / 1e9, 3200, 8 * _H100_D2H_GBPS, 8 * _H100_H2D_GBPS,
        _H100_COPY_SLOWDOWN, 8 * _H100_PAGEABLE_GBPS,
        "AWS p5.48xlarge (8 H100-80GB SXM, 2 TiB CPU memory, 3200 Gbps EFA: AWS instance page); H100 SXM dense "
        "bf16 989 TFLOP/s (NVIDIA datasheet). Host copies and copy slowdown: 8 x the H100 measured here "
        "(../shared/GPU.md)."),
    MachineType(
        "hgx-h100", 8, "H100-80GB", 80, 989, 2048, 3200, 8 * _H100_D2H_GBPS, 8 * _H100_H2D_GBPS,
        _H100_COPY_SLOWDOWN, 8 * _H100_PAGEABLE_GBPS,
        "An HGX H100 server as in Llama 3's cluster (Llama 3 paper, arXiv:2407.21783: 8 H100 per server, 8 x 400 "
        "Gbps RoCE); CPU memory is our assumption. Host copies and copy slowdown: 8 x the H100 measured here "
        "(../shared/GPU.md)."),
    MachineType(
        "h100-lent", 1, "H100-80GB", 80, 989, 125 * 2 ** 30 / 1e9, 100, _H100_D2H_GBPS, _H100_H2D_GBPS,
        _H100_COPY_SLOWDOWN, _H100_PAGEABLE_GBPS,
        "The one-H100 machine this project measures on (../shared/GPU.md: 125 GiB CPU memory, host copies, copy "
        "slowdown; a bf16 GEMM reached 722 TFLOP/s, the 989 is the SXM datasheet's). It has no network of its own: "
        "100 Gbps is a placeholder, set network_gbps for the fabric you mean."),
)}

