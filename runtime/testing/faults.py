"""Fault injection for the project's fault tests; not part of the library's path.

The Checkpointer loads this module only when ``GEMINI_FAULT`` is set (the agent's ``--fault``). Each fault strikes
once: every event it causes names it (``fault: KIND:WHO:ITERATION``), and the agent leaves the faults that struck
out of the next attempt's ``GEMINI_FAULT``, so faults at later iterations strike in later attempts (a second
failure after the first recovery). Under plain torchrun, they strike only before its first restart. It attaches to
the Checkpointer's hook points, so any training script that uses the public API can be struck, unchanged. Faults,
comma-separated:

- ``kill:RANK:ITER``: SIGKILL rank RANK just before iteration ITER's update;
- ``lose:MACHINE:ITER``: local rank 0 of MACHINE announces ``lose-me`` there and waits, so that the agent kills the
  whole machine (its agent and workers) and replaces it with an empty memory;
- ``corrupt-kill:RANK:ITER``: once iteration ITER's checkpoint is replicated (at ITER + 1, before the update), flip
  a byte of RANK's own stored copy, then SIGKILL it;
- ``corrupt-copies:RANK:ITER``: at the same moment, flip a byte of every other machine's copy of RANK's shard of ITER
  (the replicas a replacement would be sent), killing no one;
- ``kill-write:RANK:ITER``: SIGKILL RANK once its shard of ITER is written into its machine's store, before it is
  committed, and once every other rank has committed its own shard of ITER (all machines' stores are on this host
  under the agent), so the other machines are left holding an iteration that recovery must abandon;
- ``lag:RANK:ITER``: RANK waits :data:`LAG_S` seconds just before iteration ITER's update, killing no one (a
  straggler: the other ranks' checkpoints of ITER reach its machine before its own checkpoint of ITER - 1 ends).

Those that strike before an update first let every rank finish the checkpoint traffic in flight, with a barrier, so
which copies exist when the fault strikes is deterministic.
"""

from __future__ import annotations

import os
import signal
import time

import torch.distributed as dist

from ..store import ShardStore

KINDS = ("kill", "lose", "corrupt-kill", "corrupt-copies", "kill-write", "lag")
LAG_S = 1.0


def parse(text: str) -> list[tuple[str, int, int]]:
    out = []
    for item in filter(None, text.split(",")):
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in KINDS or not (parts[1].isdigit() and parts[2].isdigit()):
            raise ValueError(f"fault {item!r}: expected KIND:WHO:ITERATION with KIND one of {', '.join(KINDS)}")
        out.append((parts[0], int(parts[1]), int(parts[2])))
    return out


def spec(kind: str, who: int, iteration: int) -> str:
    return f"{kind}:{who}:{iteration}"


def install(ckpt, text: str) -> None:
    faults = parse(text)
    if not faults or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    local = ckpt.rank % ckpt.ppm

    def mine(kind: str, iteration: int) -> bool:
        if kind == "lose":
            return local == 0 and (kind, ckpt.machine, iteration) in faults
        return (kind, ckpt.rank, iteration) in faults

    def flip(iteration: int, rank: int) -> None:
        path = ckpt.store.paths(iteration, rank)[0]
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 3] ^= 0xFF
        path.write_bytes(bytes(raw))

    def die(why: str, fault: str) -> None:
        ckpt.event("fault", what=why, fault=fault)
        os.kill(os.getpid(), signal.SIGKILL)

    def before_update(iteration: int) -> None:
        if mine("lag", iteration):
            ckpt.event("fault", what=f"waited {LAG_S:g} s before the update", fault=spec("lag", ckpt.rank, iteration))
            time.sleep(LAG_S)
        due = [f for f in faults if (f[0] in ("kill", "lose") and f[2] == iteration)
               or (f[0] in ("corrupt-kill", "corrupt-copies") and f[2] == iteration - 1)]
        if not due:
            return
        ckpt.wait()
        dist.barrier(group=ckpt.groups.control)
        for kind, rank, it in faults:  # the replicas this process's machine holds for a rank of another machine
            if kind == "corrupt-copies" and it == iteration - 1 and rank % ckpt.ppm == local \
                    and rank // ckpt.ppm != ckpt.machine and ckpt.store.paths(it, rank)[0].exists():
                flip(it, rank)
                ckpt.event("fault", what=f"corrupted this machine's copy of rank {rank}'s shard",
                           fault=spec(kind, rank, it))
        # every copy is corrupted before a process dies or a machine goes: the agent's restart kills every worker,
        # and one killed while it rewrote a copy left a short file, never listed, instead of a corrupted one
        dist.barrier(group=ckpt.groups.control)
        if mine("kill", iteration):
            die("killed mid-iteration", spec("kill", ckpt.rank, iteration))
        if mine("lose", iteration):
            ckpt.event("lose-me", iteration=iteration, machine=ckpt.machine,
                       fault=spec("lose", ckpt.machine, iteration))
            time.sleep(3600)  # the agent kills this machine now
        if mine("corrupt-kill", iteration - 1):  # the peers have it: a bit flips in this machine's copy
            flip(iteration - 1, ckpt.rank)
            die("corrupted its stored shard", spec("corrupt-kill", ckpt.rank, iteration - 1))

    def before_commit(iteration: int) -> None:
        if mine("kill-write", iteration):
            others = [ShardStore(ckpt.store.root, r // ckpt.ppm).paths(iteration, r)[1]
                      for r in range(ckpt.world) if r != ckpt.rank]
            deadline = time.monotonic() + 60
            while not all(p.exists() for p in others) and time.monotonic() < deadline:
                time.sleep(0.01)
            die("killed while writing a checkpoint", spec("kill-write", ckpt.rank, iteration))

    ckpt.add_hook("before_update", before_update)
    ckpt.add_hook("before_commit", before_commit)
