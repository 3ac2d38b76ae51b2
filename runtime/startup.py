"""What the Checkpointer checks and agrees on before training, every rank at once: the model is FSDP2 throughout,
the job's name and record, the launch numbers ranks as the runtime assumes, and each host's store has room for what
the plan keeps (runtime/budget.py). Each refusal is one line, raised on every rank.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from . import budget, job as jobs
from .config import ConfigError
from .distributed import fsdp_trains_on_cpu
from .state import entries_of, flatten, local
from .store import StoreError


def check_model(model: torch.nn.Module) -> None:
    """The runtime checkpoints FSDP2 models: every parameter a DTensor that ``fully_shard`` made. A parameter left
    plain (``fully_shard`` on the blocks but not on the model itself, or no FSDP2 at all) would be checkpointed as one
    rank's copy, so it is refused at start, in one line. FSDP2 on the CPU of a torch where it cannot train
    (:func:`~runtime.distributed.fsdp_trains_on_cpu`) would die in the first forward pass with an AttributeError that
    names neither FSDP nor the version: that is said at start too."""
    plain = next((n for n, p in model.named_parameters() if not isinstance(p, DTensor)), None)
    if plain is not None:
        raise ConfigError(f"parameter {plain!r} is not sharded by FSDP2: the Checkpointer takes a model whose every "
                          "parameter fully_shard() made a DTensor (apply fully_shard to the model itself too, after "
                          "its blocks)")
    if not fsdp_trains_on_cpu() and any(isinstance(m, FSDPModule) for m in model.modules()) and \
            any(p.device.type == "cpu" for p in model.parameters()):
        raise ConfigError(f"FSDP2 cannot train on the CPU with torch {torch.__version__} (it can from torch 2.7): "
                          "train on GPUs, or upgrade torch")



def agree_on_job(settings, world: int, group) -> tuple[str, bool]:
    """(the job's name, whether a user named it), the same on every rank: the name the settings give, else one
    rank 0 makes for this launch. Ranks given different names are refused."""
    proposal = (settings.job or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
                settings.job is not None, settings.named)
    everyone = [None] * world
    dist.all_gather_object(everyone, proposal, group=group)
    given = {(r, name) for r, (name, had, _) in enumerate(everyone) if had}
    if given and len({name for _, name in given}) > 1 or 0 < len(given) < world:
        shown = ", ".join(f"rank {r}: {name!r}" for r, name in sorted(given)[:4])
        raise ConfigError(f"the ranks were given different job names ({shown}): give every rank the same "
                          "GEMINI_JOB (or --rdzv-id)")
    name, _, named = everyone[0]
    return name, named


def begin_job(durable, job: str, machines: int, ppm: int, rank: int, group) -> dict:
    """The job's record (runtime/job.py), read or made by rank 0 and given to every rank."""
    got = [jobs.begin(durable, job, machines, ppm) if rank == 0 else None]
    dist.broadcast_object_list(got, src=0, group=group)
    return got[0]


def check_launch(store, machine: int, ppm: int, world: int, group) -> None:
    """What the runtime assumes of the launch: ranks are numbered machine by machine (rank = machine x processes
    per machine + local rank, as torchrun numbers them, the machine being the node's rank in the rendezvous:
    ``--node-rank`` under a static rendezvous, the order nodes joined in under c10d), the ranks of a machine share
    its host, and two machines do not share a store folder (two torchrun nodes on one host without
    GEMINI_MACHINE_ID would): their copies of one shard would overwrite each other."""
    env = os.environ
    mine = (socket.gethostname(), str(store.dir.resolve()), machine, env.get("LOCAL_RANK"), env.get("GROUP_RANK"))
    everyone = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    owner: dict[tuple[str, str], int] = {}
    host_of: dict[int, str] = {}
    for rank, (host, folder, machine, local_rank, node) in enumerate(everyone):
        if (local_rank is not None and int(local_rank) != rank % ppm) or (node is not None and int(node) != machine):
            raise ConfigError(f"rank {rank} is local rank {local_rank} of node {node}, where the runtime takes it "
                              f"for local rank {rank % ppm} of machine {machine} (rank = machine x {ppm} + local "
                              f"rank): launch every node with --nproc-per-node {ppm}")
        if host_of.setdefault(machine, host) != host:
            raise ConfigError(f"machine {machine}'s ranks run on two hosts ({host_of[machine]} and {host}): "
                              f"launch {ppm} processes on each node (--nproc-per-node)")
        other = owner.setdefault((host, folder), machine)
        if other != machine:
            raise ConfigError(f"machines {other} and {machine} share the store folder {folder} on {host}: give "
                              "each node its own GEMINI_MACHINE_ID or GEMINI_STORE_ROOT (python -m runtime.agent "
                              "does), or run one node per host")


def check_room(store, plan, world: int, files: int, shard: int, exact: bool, group) -> None:
    """Refuse to start where a host's store has no room for the ``files`` files of each shard the plan keeps there
    (runtime/budget.py); ``shard``: this rank's shard's bytes."""
    st = os.statvfs(store.root)
    row = budget.Row(socket.gethostname(), os.stat(store.root).st_dev, str(store.dir), shard,
                     st.f_bavail * st.f_frsize, jobs.held_bytes(store.dir), exact)
    rows = [None] * world
    dist.all_gather_object(rows, row, group=group)
    # a copy on an HSDP replica's machine is the sender's own part only (runtime/replicas.py): a few KB, not counted
    why = budget.verdict(rows, [[s for s in plan.peers(r)[1] if not plan.replica(s, r)] for r in range(world)], files)
    if why:
        raise StoreError(why)


def shard_bytes(capture) -> tuple[int, bool]:
    """(this rank's shard's bytes, exact): exact where the optimizer has its state, else estimated
    (runtime/budget.py) without making that state, which only a throwaway optimizer step would."""
    if capture.optimizer.state:
        return sum(e["nbytes"] for e in entries_of(flatten(capture.state())[0])[0]), True
    model = sum(local(t).numel() * local(t).element_size()
                for t in [*capture.model.parameters(), *capture.model.buffers()])
    extra = sum(local(t).numel() * local(t).element_size() for t in flatten(capture.extra_state())[0].values())
    optim, _ = budget.optimizer_bytes(capture.optimizer, local)
    return model + extra + optim, False
