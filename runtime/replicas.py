"""Copies an HSDP replica already holds: a checkpoint sent and stored as this rank's own part only.

In an HSDP job (a mesh of replica groups x shards) the rank at the same position of another replica group holds
the same DTensor pieces, bit for bit: the parameters and the optimizer state after every update. A plan made for
it (``placement.replica_groups``, ``python -m runtime plan --hsdp R``) puts a machine's copies on machines of its
*column*, whose rank of the same local rank is such a *twin*. To such a holder a rank sends only its *own part*:
what is not a DTensor (the extra state, buffers, scalar optimizer state such as Adam's step), a few KB, with the
manifest of its whole shard. The holder stores that part as a *thin copy* beside its twin's own checkpoint of the
same iteration, and builds the whole shard from both when it is read (:func:`rebuild`, in ``ShardStore.get``),
checked against the sender's checksum of the whole shard. So no DTensor byte moves, and no machine keeps a second
copy of the DTensor pieces.

That the twin's pieces are the sender's is checked at every checkpoint, not assumed: both ranks digest their
DTensor pieces (:func:`digest`, names, dtypes and shapes included) and the holder compares the sender's with its
twin's before it commits the thin copy. A difference (a job that is not HSDP as the plan says, or replicas that
drifted apart) fails the checkpoint with an error naming both ranks, so a copy that could not be rebuilt is never
counted.
"""

from __future__ import annotations

import json

import torch

from .state import CHUNKS, tree_of

REPLICA = "replica"  # a thin copy's manifest key: {"rank": its twin, "own": {name: offset in its own bytes}}
DIGEST = "replica_digest"  # a shard's manifest key: the digest of its DTensor pieces


def shared(manifest: dict) -> set[str]:
    """The names of a shard's entries a twin holds too: its DTensor pieces."""
    return set(manifest["skeleton"].get(CHUNKS, {}))


def digest(data, entries: list[dict], names: set[str]) -> str:
    """XXH3 over the layout (name, dtype, shape, in the shard's order) and the bytes of the entries in ``names``."""
    picked = [e for e in entries if e["name"] in names]
    head = json.dumps([[e["name"], e["dtype"], e["shape"]] for e in picked]).encode()
    view = memoryview(data).cast("B")
    return tree_of([view[e["offset"]:e["offset"] + e["nbytes"]] for e in picked], head=head)


def own_offsets(entries: list[dict], names: set[str]) -> dict[str, int]:
    """Where each entry not in ``names`` starts in the shard's own part (:func:`own_part`)."""
    offsets, at = {}, 0
    for e in entries:
        if e["name"] not in names:
            offsets[e["name"]] = at
            at += e["nbytes"]
    return offsets


def own_part(data: torch.Tensor, entries: list[dict], names: set[str]) -> torch.Tensor:
    """The bytes of a shard's entries not in ``names``, one after the other (a new tensor)."""
    parts = [data[e["offset"]:e["offset"] + e["nbytes"]] for e in entries if e["name"] not in names]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def thin(manifest: dict, twin: int, nbytes: int) -> dict:
    """The manifest a holder commits for a thin copy of the shard ``manifest`` describes: its own part is ``nbytes``
    long, the rest is the shard of rank ``twin`` of the same iteration."""
    return dict(manifest, **{REPLICA: {"rank": twin, "bytes": nbytes,
                                       "own": own_offsets(manifest["entries"], shared(manifest))}})


def rebuild(manifest: dict, own: memoryview, twin: memoryview, twin_manifest: dict) -> memoryview | None:
    """A thin copy's whole shard: its own entries from ``own``, the others from the twin's shard of the same
    iteration by name; None where the twin's shard lacks one of them or holds it in another layout. Where the twin's
    shard is laid out as this one (HSDP twins' are: the same names, dtypes and shapes in the same order), ``twin``,
    a private (copy-on-write) mapping of it, becomes the shard: the own entries are written over the twin's, and
    only their pages are copied. Else the shard is put together in new memory."""
    theirs = {e["name"]: e for e in twin_manifest["entries"]}
    if len(twin) == manifest["size"] and not getattr(twin, "readonly", True) and all(
            (t := theirs.get(e["name"])) is not None and (t["offset"], t["nbytes"], t["dtype"], t["shape"])
            == (e["offset"], e["nbytes"], e["dtype"], e["shape"]) for e in manifest["entries"]):
        out = twin
    else:
        out = bytearray(manifest["size"])
    where = manifest[REPLICA]["own"]
    for e in manifest["entries"]:
        a, n = e["offset"], e["nbytes"]
        if e["name"] in where:
            src, at = own, where[e["name"]]
        elif out is twin:  # in place already
            continue
        else:
            t = theirs.get(e["name"])
            if t is None or (t["dtype"], t["shape"], t["nbytes"]) != (e["dtype"], e["shape"], n):
                return None
            src, at = twin, t["offset"]
        if at < 0 or at + n > len(src):
            return None
        out[a:a + n] = src[at:at + n]
    return memoryview(out)


class Mismatch(RuntimeError):
    """A twin's DTensor pieces are not the sender's: the holder cannot keep a thin copy."""


def accept(store, iteration: int, rank: int, src: int, manifest: dict, nbytes: int, timeout_s: float) -> dict:
    """The manifest rank ``rank`` commits for the thin copy of rank ``src``'s shard of ``iteration`` it received
    (``nbytes``: its own part), once ``rank``'s own checkpoint of that iteration is committed here and its DTensor
    pieces digest as the sender's; :class:`Mismatch` otherwise."""
    mine = store.wait_committed(iteration, rank, timeout_s)
    theirs = manifest.get(DIGEST)
    if mine is None or theirs is None or mine.get(DIGEST) != theirs:
        why = f"was not committed within {timeout_s:g} s" if mine is None else "holds other DTensor pieces"
        raise Mismatch(f"the plan makes rank {rank} an HSDP replica of rank {src} (placement.replica_groups), but "
                       f"rank {rank}'s checkpoint of iteration {iteration} {why}: is the job HSDP with the plan's "
                       f"replica groups?")
    out = thin(manifest, rank, nbytes)
    if sum(e["nbytes"] for e in manifest["entries"] if e["name"] in out[REPLICA]["own"]) != nbytes:
        raise Mismatch(f"rank {src} sent {nbytes} bytes of its own part of iteration {iteration}; its manifest "
                       f"lists another size")
    return out
