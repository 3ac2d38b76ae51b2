"""State flattening and the shard manifest.

A rank's checkpoint is its whole training state: the model's and optimizer's state as
``torch.distributed.checkpoint.state_dict.get_state_dict`` returns it (fully qualified parameter names, so any
optimizer works), plus any extra user state (objects with ``state_dict`` / ``load_state_dict``: an LR scheduler, a
data loader's position, RNG states, DCP ``Stateful`` objects). :func:`flatten` splits that nested state into

- ``tensors``: ``{key: tensor}``, every tensor leaf under a ``/``-joined path (DTensors as their local shard), and
- ``skeleton``: the same structure as JSON, with every tensor replaced by ``{"$tensor": key}`` and tuples marked
  ``{"$tuple": [...]}``, so that numbers, strings and the like (learning rates, betas, a loader's position) travel as
  text, never pickled.

:func:`unflatten` rebuilds the nested state from both. :func:`pack` and :func:`unpack` turn tensors into one
buffer of raw bytes and back, with a manifest (names, dtypes, shapes, offsets, size, checksum); tensors are rebuilt
with ``torch.frombuffer``, never unpickled.
"""

from __future__ import annotations

import filecmp
import hashlib
import math
import os
import re
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import xxhash

DTYPES = {str(t): t for t in (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64,
                               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}
TENSOR, TUPLE = "$tensor", "$tuple"
CHUNKS = "$chunks"  # a checkpoint skeleton's key: where each DTensor shard lies in its whole tensor (capture.chunks)
WORLD = "$world"  # and the world size of the job that wrote it


class StateError(ValueError):
    """The training state cannot be checkpointed or restored as it is (one line)."""


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself, or a DTensor's local shard (a view of the live storage)."""
    return t.to_local() if hasattr(t, "to_local") else t


def flatten(state, prefix: str = "") -> tuple[dict[str, torch.Tensor], object]:
    """``(tensors, skeleton)`` of a nested state of dicts, lists, tuples, tensors and JSON scalars."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj, path: str):
        if isinstance(obj, torch.Tensor):
            tensors[path] = obj
            return {TENSOR: path}
        if isinstance(obj, Mapping):
            out = {}
            for k, v in obj.items():
                key = str(k)
                if not isinstance(k, (str, int)) or isinstance(k, bool) or "/" in key:
                    raise StateError(f"state key {k!r} under {path or '/'!r}: keys must be strings or integers "
                                     "without '/'")
                # an integer key stays an integer ("#3"); a string key that could be read as one of the skeleton's
                # own ("#3", "$tensor") is escaped with a "#" ("##3", "#$tensor")
                if isinstance(k, int) or key.startswith(("#", "$")):
                    key = f"#{key}"
                out[key] = walk(v, f"{path}/{key}" if path else key)
            return out
        if isinstance(obj, (list, tuple)):
            items = [walk(v, f"{path}/{i}") for i, v in enumerate(obj)]
            return {TUPLE: items} if isinstance(obj, tuple) else items
        if obj is None or isinstance(obj, (bool, int, str)):
            return obj
        if isinstance(obj, float):
            if not math.isfinite(obj):
                return {"$float": repr(obj)}  # JSON has no inf/nan; keep them exactly
            return obj
        raise StateError(f"state value at {path!r} is a {type(obj).__name__}: checkpoints hold tensors, numbers, "
                         "strings, None and lists/dicts of them")

    skeleton = walk(state, prefix)
    return tensors, skeleton


def key_of(key: str):
    """A state key as :func:`flatten` wrote it, back: "#3" -> 3, "##3" -> "#3", "#$tensor" -> "$tensor"."""
    if not key.startswith("#"):
        return key
    rest = key[1:]
    return int(rest) if re.fullmatch(r"-?[0-9]+", rest) else rest


def unflatten(skeleton, tensors: Mapping[str, torch.Tensor]):
    """The nested state :func:`flatten` took apart."""
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if TENSOR in skeleton:
            key = skeleton[TENSOR]
            if key not in tensors:
                raise StateError(f"checkpoint lacks tensor {key!r}")
            return tensors[key]
        if TUPLE in skeleton:
            return tuple(unflatten(v, tensors) for v in skeleton[TUPLE])
        if "$float" in skeleton:
            return float(skeleton["$float"])
        return {key_of(k): unflatten(v, tensors) for k, v in skeleton.items()}
    return skeleton


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view of its storage (no copy), on its device."""
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)


def entries_of(tensors: Mapping[str, torch.Tensor], memo: dict | None = None) -> tuple[list[dict], list[torch.Tensor]]:
    """Manifest entries and flat uint8 views of the tensors (no copy: views of the live storage). ``memo`` (a dict
    the caller keeps between calls): a tensor given again under the same name, the very same object (the live
    views a recipe captures, runtime/capture.py), reuses what was worked out for it last time."""
    entries, views, offset = [], [], 0
    seen = {}
    for name, t in tensors.items():
        known = memo.get(name) if memo is not None else None
        if known is not None and known[0] is t:
            entry, flat = known[1], known[2]
            seen[name] = known
        else:
            loc = local(t).detach()
            if str(loc.dtype) not in DTYPES:
                raise StateError(f"tensor {name!r} has dtype {loc.dtype}, which checkpoints do not hold "
                                 f"({', '.join(sorted(DTYPES))})")
            live = loc.is_contiguous()
            if not live:  # a copy: never reused, it would not follow the tensor
                loc = loc.contiguous()
            flat = as_bytes(loc)
            entry = {"name": name, "dtype": str(loc.dtype), "shape": list(loc.shape), "nbytes": flat.numel()}
            if live:
                seen[name] = (t, entry, flat)
        entries.append({**entry, "offset": offset})
        views.append(flat)
        offset += flat.numel()
    if memo is not None:
        memo.clear()
        memo.update(seen)
    return entries, views


HASH_BLOCK = 64 << 20
_hashers: ThreadPoolExecutor | None = None
_hashers_lock = threading.Lock()


def _xxh3(block) -> bytes:
    return xxhash.xxh3_128(block).digest()


def _sha256(block) -> bytes:
    return hashlib.sha256(block).digest()


def _tree(data, digest) -> str:
    """``digest`` of the ``digest``s of the 64 MiB blocks of ``data``, the blocks hashed by a pool of threads (both
    hashes let go of the GIL), as hex."""
    return tree_of([data], digest)


def tree_of(pieces, digest=_xxh3, head: bytes = b"") -> str:
    """:func:`_tree` over several buffers one after the other (``head``, hashed in first: what else the digest
    covers), each cut into blocks of at most 64 MiB, all the blocks hashed by one pool, as hex."""
    global _hashers
    views = [memoryview(p).cast("B") for p in pieces]
    blocks = [v[i:i + HASH_BLOCK] for v in views for i in range(0, len(v), HASH_BLOCK)] or [memoryview(b"")]
    if len(blocks) > 1:
        with _hashers_lock:  # one pool per process, whichever thread hashes first
            if _hashers is None:
                _hashers = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="gemini-hash")
    return digest(head + b"".join((_hashers.map if len(blocks) > 1 else map)(digest, blocks))).hex()


def checksum(data) -> dict:
    """A shard's checksum, as manifest fields: XXH3-128 over the XXH3-128 of each 64 MiB block, the blocks hashed in
    parallel, so checking a GiB-sized shard takes a fraction of one pass on a many-core host. XXH3 is not a
    cryptographic hash; it need not be, as it guards against damaged bytes, not against someone who may write the
    user's private store, and it runs at memory speed (13.5 GB/s on one core of this host against SHA-256's 1.6):
    per checkpoint, SHA-256 was most of the host CPU a checkpoint cost."""
    return {"xxh3_blocks": _tree(data, _xxh3)}


def verify(data, manifest: dict) -> bool:
    """Do ``data`` match the manifest's size and checksum (:func:`checksum`; or, from older manifests, SHA-256 over
    the SHA-256 of each block, ``sha256_blocks``, or a plain ``sha256``)?"""
    if len(data) != manifest.get("size"):
        return False
    if "xxh3_blocks" in manifest:
        return _tree(data, _xxh3) == manifest["xxh3_blocks"]
    if "sha256_blocks" in manifest:
        return _tree(data, _sha256) == manifest["sha256_blocks"]
    return "sha256" in manifest and hashlib.sha256(data).hexdigest() == manifest["sha256"]


def pack(tensors: Mapping[str, torch.Tensor]) -> tuple[bytes, dict]:
    """Concatenate tensors into bytes; the manifest says how to cut them out again."""
    entries, views = entries_of(tensors)
    data = b"".join(v.cpu().numpy().tobytes() for v in views)
    return data, {"entries": entries, "size": len(data), **checksum(data)}


def unpack(data: bytes | bytearray | memoryview, manifest: dict, own: bool = False,
           ready=None) -> dict[str, torch.Tensor]:
    """The tensors :func:`pack` (or a checkpoint) wrote, as new CPU tensors (views of one private copy of
    ``data``; ``own``: ``data`` is already the caller's private, writable buffer, such as
    :meth:`ShardStore.get`'s mapping, and the tensors view it without a copy). ``ready(n)``, for a buffer still
    being received: returns once its first ``n`` bytes are there; called before an entry is copied here (an
    unaligned one), as views read nothing until used."""
    buf = data if own else bytearray(data)
    if own and (not isinstance(buf, (bytearray, memoryview)) or getattr(buf, "readonly", False)):
        raise ValueError("unpack(own=True) needs a writable buffer")
    out = {}
    for e in manifest["entries"]:
        if e["dtype"] not in DTYPES:
            raise StateError(f"unsupported dtype {e['dtype']}")
        end = e["offset"] + e["nbytes"]
        if e["offset"] < 0 or end > len(buf):
            raise StateError(f"entry {e['name']!r} lies outside the shard's {len(buf)} bytes")
        raw = torch.frombuffer(buf, dtype=torch.uint8, offset=e["offset"], count=e["nbytes"]) if e["nbytes"] else \
            torch.empty(0, dtype=torch.uint8)
        if e["nbytes"] % DTYPES[e["dtype"]].itemsize or e["offset"] % DTYPES[e["dtype"]].itemsize:
            if ready is not None:
                ready(end)
            out[e["name"]] = raw.clone().view(DTYPES[e["dtype"]]).reshape(e["shape"])  # unaligned: its own copy
        else:
            out[e["name"]] = raw.view(DTYPES[e["dtype"]]).reshape(e["shape"])
    return out


def write_shard(stem, tensors: Mapping[str, torch.Tensor], skeleton=None) -> None:
    """Write tensors as ``STEM.bin`` (raw bytes) and ``STEM.json`` (the manifest, with ``skeleton`` if given), each
    atomically: a rank's final state (``write_shard(stem, *checkpointer.capture())``: parameters, buffers, optimizer
    and extra state, with the numbers of the skeleton), say, to compare runs bit for bit (both files) or to read back
    with :func:`unpack`."""
    import json

    from .files import write_atomic

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    data, manifest = pack(tensors)
    if skeleton is not None:
        manifest["skeleton"] = skeleton
    write_atomic(stem.with_name(stem.name + ".bin"), data)
    write_atomic(stem.with_name(stem.name + ".json"), json.dumps(manifest))


def same_shard(a, b) -> bool:
    """Did :func:`write_shard` write the same state at stems ``a`` and ``b``: the same tensors bit for bit, under the
    same names, shapes and dtypes, and the same skeleton?"""
    return all(filecmp.cmp(Path(a).with_name(Path(a).name + ext), Path(b).with_name(Path(b).name + ext), shallow=False)
               for ext in (".bin", ".json"))
