"""Where a restored byte comes from: this machine's memory, a peer's, or durable storage, for a job of the same
layout as the one that wrote the checkpoint or of another.

Recovery (:meth:`runtime.Checkpointer.recover`) picks the newest iteration complete in memory or on durable storage
(runtime/recovery.py) and reads it through one of three sources; each hands the restore the same thing, this rank's
tensors under their flat keys and its skeleton (runtime/state.py), which ``Checkpointer._restore`` copies into the
model, the optimizer and the extra state:

- **memory, same world size** (tiers ``local`` and ``peer``: :func:`runtime.recovery.fetch_from_memory`): every rank's
  shard is the one it wrote, so each rank takes its own whole, from its machine's store or received from a peer's,
  and copies it in as it arrives: the fast path, with nothing to plan.
- **memory, another world size** (tier ``resharded``: :func:`fetch_resharded`): the job that wrote the iteration had
  another number of ranks (a machine lost and not replaced, or a relaunch on more machines). Every shard records
  where each of its DTensor pieces lies in the whole tensor (``$chunks`` in its skeleton) and the world size that
  wrote it. Each new rank works out which pieces of which old shards its own shard overlaps, takes them from its
  machine's store or has them sent from a machine that holds them (only the tensors it needs, not whole shards), and
  DCP reshards them: :class:`MemoryReader` is a DCP ``StorageReader`` over those pieces, so DCP's load planner
  decides what each rank reads, exactly as it does from files.
- **durable** (tier ``storage``: :func:`load_durable`): DCP's own ``FileSystemReader``, resharding the same way.

The last two share :func:`load_through_dcp`. What is not a DTensor (buffers, scalar optimizer state, the extra state,
the skeleton's numbers) is each rank's own, taken whole from the old rank of the same number, or, where the old job
had fewer ranks, from old rank ``rank % old world``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.distributed.tensor import DTensor
from torch.futures import Future

from .state import CHUNKS, DTYPES, WORLD, StateError, key_of, unpack, verify

TAG = 100  # the tags of the pieces sent in a resharding recovery: TAG + the index of the piece in the receiver's list


def dcp_key(key: str) -> str:
    """The DCP key of a flat state key (runtime/state.py's ``/``-joined path): DCP joins the path with dots."""
    return ".".join(str(key_of(part)) for part in key.split("/"))


class MemoryReader(StorageReader):
    """A DCP ``StorageReader`` over shards held in memory: ``metadata`` describes every piece of the checkpoint (what
    DCP's planner plans with, the same on every rank), ``pieces`` holds those this rank was given, by (DCP key, offsets
    of the piece in the whole tensor)."""

    def __init__(self, metadata: Metadata, pieces: dict[tuple[str, tuple[int, ...]], torch.Tensor]):
        super().__init__()
        self.metadata, self.pieces = metadata, pieces

    def reset(self, checkpoint_id=None) -> None:
        pass

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return self.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        for req in plan.items:
            src = self.pieces[(req.storage_index.fqn, tuple(req.storage_index.offset))]
            for dim, (start, length) in enumerate(zip(req.storage_offsets, req.lengths)):
                src = src.narrow(dim, start, length)
            target = planner.resolve_tensor(req).detach()
            target.copy_(src)
            planner.commit_tensor(req, target)
        done: Future = Future()
        done.set_result(None)
        return done

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True


def metadata_of(manifests: dict[int, dict]) -> Metadata:
    """DCP's metadata of a checkpoint held in memory, from its shards' manifests (by old rank): every DTensor piece
    with its place in the whole tensor."""
    tensors: dict[str, TensorStorageMetadata] = {}
    for s in sorted(manifests):
        man = manifests[s]
        for e in man["entries"]:
            where = man["skeleton"][CHUNKS].get(e["name"])
            if where is None or not all(e["shape"]):
                continue  # not a DTensor (each rank's own), or an empty piece
            whole, offsets = where
            md = tensors.setdefault(dcp_key(e["name"]), TensorStorageMetadata(
                properties=TensorProperties(dtype=DTYPES[e["dtype"]]), size=torch.Size(whole), chunks=[]))
            md.chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(e["shape"])))
    return Metadata(state_dict_metadata=tensors)


def _overlaps(a_off, a_size, b_off, b_size) -> bool:
    return all(x < y + m and y < x + n for x, n, y, m in zip(a_off, a_size, b_off, b_size))


def needs(template: dict[str, torch.Tensor], manifests: dict[int, dict], own_from: int) -> dict[int, list[str]]:
    """The entries of which old shards this rank needs (by old rank, in each shard's order): the pieces of every
    DTensor of ``template`` (this rank's live state, flat keys) that its own piece overlaps, and everything that is
    not a DTensor piece of old rank ``own_from``."""
    mine = {}
    for k, t in template.items():
        if isinstance(t, DTensor):
            (chunk,) = t.__create_chunk_list__()
            mine[k] = (list(chunk.offsets), list(chunk.sizes))
    out: dict[int, list[str]] = {}
    for s, man in manifests.items():
        chunks = man["skeleton"][CHUNKS]
        for e in man["entries"]:
            name = e["name"]
            if name in chunks:
                if name in mine and all(e["shape"]) and all(mine[name][1]) and \
                        _overlaps(mine[name][0], mine[name][1], chunks[name][1], e["shape"]):
                    out.setdefault(s, []).append(name)
            elif s == own_from:
                out.setdefault(s, []).append(name)
    return out


def fetch_resharded(store, groups, rank: int, world: int, ppm: int, it: int, old_world: int, per_machine,
                    template: dict[str, torch.Tensor]) -> tuple[dict, object] | None:
    """Recovery of iteration ``it``, which a job of ``old_world`` ranks wrote, from the shards the stores hold, into a
    job of ``world`` ranks (see the module's docstring). Collective. Returns this rank's tensors (``template``'s
    DTensors loaded in place, the rest its own) and skeleton; None, on every rank, when a copy it needed could not
    be read or failed its checksum (it is dropped where it was read, and the caller looks again)."""
    machine, local = divmod(rank, ppm)
    holds = sorted(s for i, s in per_machine[machine] if i == it)
    # the manifests, each read once on the machine of the lowest rank that holds it (local rank 0 reads its machine's)
    mine = {}
    if local == 0:
        for s in holds:
            path = store.paths(it, s)[1]
            try:
                mine[s] = json.loads(path.read_text())
            except (OSError, ValueError):
                pass
    everyone = [None] * world
    dist.all_gather_object(everyone, mine, group=groups.control)
    manifests = {}
    for got in everyone:
        for s, man in got.items():
            manifests.setdefault(int(s), man)
    if sorted(manifests) != list(range(old_world)) or any(m["skeleton"].get(WORLD) != old_world
                                                          for m in manifests.values()):
        return None  # a manifest went meanwhile: look again
    own_from = rank % old_world
    wanted = needs(template, manifests, own_from)
    # where each old shard comes from: this machine if it holds one, else the lowest machine that does, through
    # the rank of the same local rank there
    requests = []  # (old rank, the rank that sends it, or -1: read here, entry names)
    for s in sorted(wanted):
        if s in holds:
            requests.append((s, -1, wanted[s]))
        else:
            src = min(m for m in range(world // ppm) if (it, s) in per_machine[m])
            requests.append((s, src * ppm + local, wanted[s]))
    everyone = [None] * world
    dist.all_gather_object(everyone, requests, group=groups.control)
    # every copy read here, this rank's own reads and those it serves, checked whole before it is used
    to_read = {s for s, src, _ in requests if src == -1}
    serve = [(r, i, s, names) for r, reqs in enumerate(everyone) for i, (s, src, names) in enumerate(reqs)
             if src == rank]
    to_read |= {s for _, _, s, _ in serve}
    held = {}
    for s in sorted(to_read):
        got = store.get(it, s, check=True)
        if got is None:
            store.discard(it, s)
        held[s] = got
    flag = torch.tensor([sum(v is None for v in held.values())], dtype=torch.int64)
    dist.all_reduce(flag, group=groups.control)
    if int(flag.item()):
        return None

    def slices(s: int, names: list[str]) -> list[torch.Tensor]:
        data, man = held[s]
        ends = {e["name"]: (e["offset"], e["offset"] + e["nbytes"]) for e in man["entries"]}
        raw = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
        return [raw[ends[n][0]:ends[n][1]] for n in names]

    works = []
    for r, i, s, names in serve:
        payload = torch.cat(slices(s, names)) if names else torch.empty(0, dtype=torch.uint8)
        works.append(dist.isend(payload, r, group=groups.between(rank, r), tag=TAG + i))
    arrived = {}
    for i, (s, src, names) in enumerate(requests):
        if src >= 0:
            entries = {e["name"]: e for e in manifests[s]["entries"]}
            buf = torch.empty(sum(entries[n]["nbytes"] for n in names), dtype=torch.uint8)
            works.append(dist.irecv(buf, src, group=groups.between(src, rank), tag=TAG + i))
            arrived[s] = buf
    for w in works:
        w.wait()
    pieces, own = {}, {}
    for s, src, names in requests:
        if src >= 0:  # the bytes of ``names`` one after the other: their entries, at their places in the buffer
            by_name, at, entries = {e["name"]: e for e in manifests[s]["entries"]}, 0, []
            for n in names:
                entries.append(dict(by_name[n], offset=at))
                at += by_name[n]["nbytes"]
            got = unpack(memoryview(arrived[s].numpy()), {"entries": entries}, own=True)
        else:
            got = unpack(*held[s], own=True)
        chunks = manifests[s]["skeleton"][CHUNKS]
        for n in names:
            if n in chunks:
                pieces[(dcp_key(n), tuple(chunks[n][1]))] = got[n]
            else:
                own[n] = got[n].clone()  # copied out of the store's mapping, which a later checkpoint reuses
    tensors = load_through_dcp(template, MemoryReader(metadata_of(manifests), pieces), own, groups.control)
    skeleton = {k: v for k, v in manifests[own_from]["skeleton"].items() if k not in (CHUNKS, WORLD)}
    return tensors, skeleton


def load_through_dcp(template: dict[str, torch.Tensor], reader: StorageReader, own: dict[str, torch.Tensor],
                     group) -> dict[str, torch.Tensor]:
    """Load a checkpoint through DCP: every tensor of ``template`` (this rank's live state, flat keys) that ``own``
    does not give is read by ``reader`` (in memory or from files), resharded by DCP's planner and loaded in place;
    ``own`` gives the rest. Only tensors are asked of DCP, so nothing is unpickled. Collective over ``group``."""
    shared = {k: v for k, v in template.items() if not k.startswith("extra/") and k not in own}
    dcp.load({dcp_key(k): v for k, v in shared.items()}, storage_reader=reader, process_group=group)
    return {**shared, **own}


# -- durable checkpoints -------------------------------------------------------------------------------------------
def rank_files(path: Path, rank: int) -> tuple[Path, Path]:
    """A rank's own part of a durable checkpoint: its own tensors' bytes and the skeleton with their manifest."""
    return Path(path) / f"state-rank-{rank:05d}.bin", Path(path) / f"state-rank-{rank:05d}.json"


def durable_world(path: Path) -> int:
    """The world size of the job that wrote a durable checkpoint (its ranks' own files)."""
    return len(list(Path(path).glob("state-rank-*.json")))


def load_durable(path: Path, template: dict, rank: int, group=None) -> tuple[dict, object]:
    """Load a durable checkpoint (runtime/recovery.py: ``save_durable``) into this rank's live state ``template``
    (flat keys): DTensors through DCP, resharded where the job that wrote it had another world size; this rank's own
    tensors (extra state, buffers) and skeleton from the file of the old rank of the same number, else of ``rank %
    old world``. Returns the tensors and the skeleton."""
    path = Path(path)
    old = durable_world(path) or 1
    bin_path, json_path = rank_files(path, rank % old)
    meta = json.loads(json_path.read_text())
    data = bin_path.read_bytes()
    manifest = meta.get("own", meta.get("extra"))  # "extra": before plain tensors were kept per rank
    if not verify(data, manifest):
        raise StateError(f"{path}: this rank's state file fails its checksum")
    return load_through_dcp(template, dcp.FileSystemReader(str(path)), unpack(data, manifest), group), \
        meta["skeleton"]
