"""Starting the job's process group on whatever the host has: a helper a training script may call instead of
``torch.distributed.init_process_group``.

``backend="auto"`` (the default, or ``$GEMINI_BACKEND``) picks

- no CUDA: ``gloo``, tensors on the CPU;
- a GPU for every rank on this host: ``cpu:gloo,cuda:nccl`` (NCCL for the GPU tensors, gloo for CPU ones), each rank
  on its own GPU;
- more ranks on this host than GPUs (the project's agent emulating several machines on one GPU, say): gloo for GPU
  tensors too, ``cpu:gloo,cuda:gloo``, ranks sharing the GPUs round robin; NCCL cannot put two ranks on one GPU.

``"nccl"`` asks for NCCL and fails at once, with the reason, where it cannot work; ``"gloo"`` keeps the GPUs but
communicates with gloo; ``"cpu"`` trains on the CPU even where there are GPUs.

Ranks on this host: ``$GEMINI_HOST_RANKS`` when the agent runs several machines on one host (this rank's index among
them: ``$GEMINI_HOST_RANK_BASE`` + ``LOCAL_RANK``), else torchrun's ``LOCAL_WORLD_SIZE`` and ``LOCAL_RANK``.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

CHOICES = ("auto", "nccl", "gloo", "cpu")


class BackendError(ValueError):
    """The requested backend cannot run on this host (one line)."""


def choose(requested: str, gpus: int, host_ranks: int) -> tuple[str, str]:
    """``(backend for init_process_group, device type)`` for ``host_ranks`` ranks on a host with ``gpus`` GPUs."""
    if requested not in CHOICES:
        raise BackendError(f"unknown backend {requested!r}; choose one of {', '.join(CHOICES)}")
    if requested == "cpu" or (requested == "auto" and gpus == 0):
        return "gloo", "cpu"
    if gpus == 0:
        raise BackendError(f"backend {requested!r} needs a GPU and this host has none (use 'auto' or 'cpu')")
    if requested == "nccl" and host_ranks > gpus:
        raise BackendError(f"NCCL needs a GPU per rank: {host_ranks} ranks on this host share {gpus} GPU(s) (use "
                           "'auto', which runs gloo on the GPUs then, or fewer ranks per host)")
    if requested == "gloo" or host_ranks > gpus:
        return "cpu:gloo,cuda:gloo", "cuda"
    return "cpu:gloo,cuda:nccl", "cuda"


def fsdp_trains_on_cpu() -> bool:
    """Can FSDP2 train on the CPU with this torch? From 2.7; 2.6's all-gather records an event on the CPU "stream",
    which has no ``record_event`` there (on GPUs FSDP2 trains from 2.6)."""
    return hasattr(torch.cpu.Stream, "record_event")


def host_ranks() -> tuple[int, int]:
    """(ranks on this host, this rank's index among them)."""
    n = os.environ.get("GEMINI_HOST_RANKS") or os.environ.get("LOCAL_WORLD_SIZE", "1")
    i = int(os.environ.get("GEMINI_HOST_RANK_BASE", "0")) + int(os.environ.get("LOCAL_RANK", "0"))
    return int(n), i


def init(backend: str | None = None, timeout_s: float = 600.0) -> torch.device:
    """Start the default process group with the backend :func:`choose` picks; return this rank's device."""
    requested = backend or os.environ.get("GEMINI_BACKEND", "auto")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    n, i = host_ranks()
    name, kind = choose(requested, gpus, n)
    device = torch.device("cuda", i % gpus) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(name, timeout=timedelta(seconds=timeout_s))
    return device
