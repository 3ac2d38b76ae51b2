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

**Restarts by torchrun** (``--max-restarts``). torchrun's agent hosts a store that it shares with its workers
(``TORCHELASTIC_USE_AGENT_STORE``) and keeps across restarts, and ``init_process_group`` meets there without a
per-attempt name: a restarted worker can read the address a dead worker of the attempt before published and fail
to connect to it (gloo's ``connectFullMesh ... Connection refused``), or wait for ever. torch cannot prefix the keys
with the restart count, since a node restarted only because another failed does not count the restart. So
:func:`init` meets in a store of the attempt's own: rank 0 hosts a new one on a free port and publishes its address
and a random token in torchrun's store; every other rank connects to the address published there and takes it only
if that store holds the token, so an address left by the attempt before (whose rank 0 is gone) is passed over.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
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


_hosted: list = []  # the attempt's store, where this rank hosts it: kept as long as the process lives
_KEY, _TOKEN = "gemini/attempt-store/", "gemini/token"
started_here = False  # init() started this process's default group (the Checkpointer checks it)


def _address_towards(host: str, port: int) -> str:
    """This host's address on the interface that reaches ``host`` (no packet is sent)."""
    family, kind, _, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, kind) as s:
        s.connect(where)
        return s.getsockname()[0]


def attempt_store(timeout: timedelta):
    """A store of this attempt alone (see the module's docstring), or None where torchrun does not share its own
    (each attempt's rank 0 then hosts a new one already) or the job was not started by torchrun."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = dist.TCPStore(addr, port, is_master=False, timeout=timeout, wait_for_workers=False)
    key = _KEY + os.environ.get("TORCHELASTIC_RUN_ID", "")
    if int(os.environ["RANK"]) == 0:
        token = uuid.uuid4().hex
        host = _address_towards(addr, port)
        own = dist.TCPStore(host, 0, is_master=True, timeout=timeout, wait_for_workers=False)
        own.set(_TOKEN, token)
        agent.set(key, f"{host} {own.port} {token}")
        _hosted.append(own)
        return own
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        host, p, token = agent.get(key).decode().split()
        try:
            with socket.create_connection((host, int(p)), timeout=2):  # refused at once where nothing listens
                pass
            store = dist.TCPStore(host, int(p), is_master=False, timeout=timedelta(seconds=5),
                                  wait_for_workers=False)
            if store.get(_TOKEN).decode() == token:
                store.set_timeout(timeout)
                return store
        except (OSError, RuntimeError):  # the attempt before's store, gone; or not this attempt's
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank 0 published no store of this attempt within {timeout.total_seconds():.0f} s")
        time.sleep(0.1)


def init(backend: str | None = None, timeout_s: float = 600.0) -> torch.device:
    """Start the default process group with the backend :func:`choose` picks, in a store of this attempt's own under
    torchrun (so that torchrun's restarts resume); return this rank's device."""
    global started_here
    requested = backend or os.environ.get("GEMINI_BACKEND", "auto")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    n, i = host_ranks()
    name, kind = choose(requested, gpus, n)
    device = torch.device("cuda", i % gpus) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    store = attempt_store(timeout)
    if store is None:
        dist.init_process_group(name, timeout=timeout)
    else:
        dist.init_process_group(name, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    started_here = True
    return device


init_process_group = init  # runtime.init_process_group: the name of the call it stands in for
