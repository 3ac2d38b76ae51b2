"""Recovery: what is complete where, which copy to take, and the durable DCP tier.

On start every rank tells every other what its machine's store holds (an all-gather of fixed-size tensors over the
runtime's gloo group). An iteration is *complete in memory* when every rank's shard of it is intact on some machine.
The ranks resume from the newest iteration that is complete in memory or on durable storage, whichever is newer; from
memory each rank takes its shard from its own machine if it is there (tier ``local``), else from the first machine in
the plan's retrieval order that holds it (tier ``peer``, sent over the network by the rank with the same local rank
there). Where the job that wrote the iteration had another world size (every shard says which), the ranks reshard
it from the stores through DCP instead (tier ``resharded``, runtime/sources.py). Otherwise every rank loads the
durable checkpoint (tier ``storage``, resharded by DCP where the world size changed). The inventory lists committed shards of
the right size without reading them; each rank checksums only the copy it uses, once, while it loads it (a served
copy is checked by the rank that receives it); a copy that fails is dropped where it was read and every rank takes
the inventory again, so a corrupted copy costs a second round, never a wrong state.

Durable checkpoints are standard DCP checkpoints (``dcp.save`` of ``{"model": ..., "optim": ...}`` as
``get_state_dict`` returns them), beside two files per rank: the state's skeleton as JSON (learning rates, a loader's
position: runtime/state.py) and, as raw bytes, the rank's own tensors: the user's extra state and every plain (not
DTensor) tensor of the model and optimizer, such as buffers, whose values are per rank where DCP's keys are global.
Loading asks DCP for tensors only and takes everything else from the JSON, so nothing is ever unpickled. A
``COMPLETE`` marker, written by rank 0 after every rank finished, makes one count.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from .sources import rank_files
from .state import pack, verify
from .files import write_atomic
from .transport import Incoming, send_shard

COMPLETE = "COMPLETE"


def gather_inventory(store, group, world: int, ppm: int) -> tuple[list[set[tuple[int, int]]], dict[int, int]]:
    """What every machine's store holds, as seen by every rank: ``per_machine[m]`` = {(iteration, rank)}, and the
    world size of the job that wrote each iteration (``worlds[it]``; -1 where its shards do not say, from before
    they did: taken as this job's). Every entry of every store: a machine of 8 ranks with 4 copies holds 32 shards
    an iteration, and with an iteration being written beside the kept ones a fixed number of rows would cut the
    newest complete one short."""
    inv = store.listing()
    rows = torch.tensor([len(inv)], dtype=torch.int64)
    dist.all_reduce(rows, op=dist.ReduceOp.MAX, group=group)
    t = torch.full((max(1, int(rows.item())), 3), -1, dtype=torch.int64)
    if inv:
        t[: len(inv)] = torch.tensor(inv, dtype=torch.int64)
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    per_machine: list[set] = [set() for _ in range(world // ppm)]
    seen: dict[int, set[int]] = {}
    for r, rows in enumerate(out):
        for it, rank, w in rows.tolist():
            if it >= 0:
                per_machine[r // ppm].add((it, rank))
                seen.setdefault(it, set()).add(w)
    # an iteration two layouts wrote (one abandoned, its shards left where recovery did not run) is no one's
    worlds = {it: ws.pop() if len(ws) == 1 else AMBIGUOUS for it, ws in seen.items()}
    return per_machine, worlds


AMBIGUOUS = -2


def complete_in_memory(per_machine, world: int, worlds: dict[int, int] | None = None) -> list[tuple[int, int]]:
    """(iteration, the world size that wrote it) of the iterations of which every rank's shard is intact somewhere,
    oldest first; ``world``: this job's, for iterations whose shards do not say."""
    held = set().union(*per_machine) if per_machine else set()
    out = []
    for it in sorted({it for it, _ in held}):
        w = (worlds or {}).get(it, -1)
        w = world if w == -1 else w
        if w > 0 and all((it, r) in held for r in range(w)):
            out.append((it, w))
    return out


def step_dir(durable: Path, iteration: int) -> Path:
    return Path(durable) / f"step-{iteration:08d}"


def durable_iterations(durable: Path) -> list[int]:
    """Iterations with a complete durable checkpoint, oldest first."""
    out = []
    for p in Path(durable).glob("step-*"):
        tail = p.name.split("-", 1)[1]
        if tail.isdigit() and (p / COMPLETE).exists():
            out.append(int(tail))
    return sorted(out)


def choose(per_machine, world: int, durable: list[int], worlds: dict[int, int] | None = None) \
        -> tuple[int, str | None, int]:
    """(iteration to resume from, ``"memory"`` or ``"storage"``, the world size that wrote it in memory, else this
    job's); (0, None, world) for a fresh start. Memory wins a tie."""
    complete = complete_in_memory(per_machine, world, worlds)
    mem, mem_world = complete[-1] if complete else (0, world)
    disk = durable[-1] if durable else 0
    if mem == 0 and disk == 0:
        return 0, None, world
    return (mem, "memory", mem_world) if mem >= disk else (disk, "storage", world)


def source_of(plan, it: int, rank: int, per_machine, ppm: int) -> int:
    """The machine a shard is fetched from: its own machine, else the plan's holders in retrieval order."""
    return next(m for m in plan.retrieval_order(rank // ppm) if (it, rank) in per_machine[m])


@dataclass(frozen=True)
class Fetched:
    """This rank's shard as recovery fetched it (:func:`fetch_from_memory`): from a peer still arriving, the shards
    this rank serves still being sent, its checksum still being checked."""
    data: memoryview  # a mapping of the copy in this machine's store, writable: the restore copies out of it
    manifest: dict
    tier: str  # "local" or "peer"
    source: int  # the machine it came from
    served: list[int]  # the ranks whose shards this rank sent from its machine's store
    intact: Future  # -> bool: this rank's copy matches its checksum
    sends: list  # the works of the shards this rank serves
    incoming: Incoming | None = None  # the copy from a peer, as it arrives (None: it was in this machine's memory)

    def ready(self, nbytes: int) -> None:
        """Until the shard's first ``nbytes`` are in this machine's memory."""
        if self.incoming is not None:
            self.incoming.wait(nbytes)

    def entry_ready(self):
        """``ready(name)``: until the bytes of the shard's tensor ``name`` are in this machine's memory."""
        ends = {e["name"]: e["offset"] + e["nbytes"] for e in self.manifest["entries"]}
        return lambda name: self.ready(ends[name])

    def finish(self) -> None:
        """Until this rank's copy is all here and committed, and what it serves is sent."""
        if self.incoming is not None:
            self.incoming.join()
        for w in self.sends:
            w.wait()


_verifier = ThreadPoolExecutor(1, thread_name_prefix="gemini-verify")  # checks a fetched copy beside the load


def fetch_from_memory(plan, store, groups, rank: int, world: int, ppm: int, it: int, per_machine) -> Fetched | None:
    """This rank's shard of ``it`` from memory, serving the shards this machine holds for ranks of other machines
    that need them. Collective. Copies are sent and used before their checksums are known: each rank checks only
    the copy it uses (its machine's, or the one it received), in the background while it loads the state, and
    :func:`confirm` tells every rank afterwards whether all were intact. So no machine hashes what it serves, and
    the checks run on every machine at once, beside the transfers and the loading. Returns as soon as this rank's
    copy can be loaded: from a peer, once its manifest has come (the caller loads each tensor as its bytes arrive,
    :meth:`Fetched.ready`), with the shards this rank serves still being sent; :meth:`Fetched.finish` waits for
    both. None, on every rank, when a copy the inventory listed can no longer be read (it is dropped, and the caller
    looks again)."""
    machine, local = divmod(rank, ppm)
    sources = {r: source_of(plan, it, r, per_machine, ppm) for r in range(world)}
    # one sender per shard: the rank with the same local rank on the source machine
    serve = [r for r, m in sources.items() if m == machine and r // ppm != machine and r % ppm == local]
    mine = sources[rank]
    held = {r: store.get(it, r, check=False) for r in serve + ([rank] if mine == machine else [])}
    unreadable = [r for r, got in held.items() if got is None]
    for r in unreadable:
        store.discard(it, r)  # not listed again, so the next round looks elsewhere
    flag = torch.tensor([len(unreadable)], dtype=torch.int64)
    dist.all_reduce(flag, group=groups.control)
    if int(flag.item()):
        return None
    works = []
    for r in serve:
        works += send_shard(*held[r], r, groups.between(rank, r), 1)
    incoming = None
    if mine != machine:  # received into this machine's store: the local copy is back
        src = mine * ppm + local
        incoming = Incoming(src, groups.between(src, rank), 1, store, it, rank)
        held[rank] = incoming.data, incoming.manifest
    data, manifest = held[rank]

    def check() -> bool:  # once it is all here
        if incoming is not None:
            incoming.join()
        return verify(data, manifest)

    return Fetched(data, manifest, "local" if mine == machine else "peer", mine, serve, _verifier.submit(check),
                   works, incoming)


def confirm(store, group, rank: int, world: int, it: int, fetched: Fetched) -> list[int]:
    """Collective, once every rank has loaded its fetched shard: the ranks whose copies failed their checksums (none:
    all intact). A failed copy is dropped from the store it was read from (by the rank that served it, and by the
    rank that received it or read it from its own machine), so the next inventory does not list it and the caller
    looks again."""
    bad = torch.zeros(world, dtype=torch.int64)
    bad[rank] = 0 if fetched.intact.result() else 1
    dist.all_reduce(bad, group=group)
    failed = [r for r in range(world) if bad[r]]
    for r in failed:
        if r == rank or r in fetched.served:
            store.discard(it, r)
    return failed


def save_durable(path: Path, state: dict, own: dict, skeleton, rank: int, group) -> None:
    """A standard DCP checkpoint of ``state`` (``{"model": ..., "optim": ...}`` as ``get_state_dict`` returns them:
    plain DCP code loads it), and this rank's own part beside it: the skeleton as JSON and, as raw bytes, the tensors
    that are this rank's alone: the extra state, and every tensor of the model and optimizer that is not a DTensor
    (buffers such as BatchNorm's running statistics, which FSDP2 leaves to each rank, and scalar optimizer state),
    since DCP keeps a single copy of a plain tensor's key."""
    path = Path(path)
    dcp.save(state, checkpoint_id=str(path), process_group=group)
    data, manifest = pack(own)
    bin_path, json_path = rank_files(path, rank)
    write_atomic(bin_path, data)
    write_atomic(json_path, json.dumps({"skeleton": skeleton, "own": manifest}))
    dist.barrier(group=group)
    if rank == 0:
        (path / COMPLETE).write_text("")  # DCP writes .metadata before every rank has finished its files
