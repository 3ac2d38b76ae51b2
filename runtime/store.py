"""In-memory checkpoint store: one directory per machine (under /dev/shm by default) that outlives the worker.

Layout::

    ROOT/machine-0003/iter-00000042/rank-00006.bin    raw bytes of every tensor of rank 6's shard, concatenated
    ROOT/machine-0003/iter-00000042/rank-00006.json   manifest: names, dtypes, shapes, offsets, size, sha256

A shard is written atomically: bytes to ``*.bin.tmp``, rename, then the manifest to ``*.json.tmp``, rename. A shard
counts only when its manifest exists and the bytes match its size and checksum; anything else (a half-written file
from a worker killed mid-write, a corrupted byte) is ignored. No pickle is involved anywhere: tensors are rebuilt
from raw bytes with ``torch.frombuffer``.

Checkpoints are written in place (:meth:`ShardStore.slot`): the ``*.bin.tmp`` file is mapped into the process and
the checkpoint is copied (or received) straight into it, so the store costs no second copy of every checkpoint.
Files of dropped iterations are not freed but kept as spares (``ROOT/machine-0003/spare/``, one per rank) and
become the next checkpoint's file, so their memory is not allocated and zeroed again every iteration.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import threading
from pathlib import Path

import torch

DTYPES = {str(t): t for t in (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64,
                               torch.int32, torch.uint8)}


def pack(tensors: dict[str, torch.Tensor]) -> tuple[bytes, dict]:
    """Concatenate tensors into bytes; the manifest says how to cut them out again."""
    entries, chunks, offset = [], [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        entries.append({"name": name, "dtype": str(t.dtype), "shape": list(t.shape), "offset": offset,
                        "nbytes": len(raw)})
        chunks.append(raw)
        offset += len(raw)
    data = b"".join(chunks)
    return data, {"entries": entries, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def unpack(data: bytes, manifest: dict) -> dict[str, torch.Tensor]:
    buf = bytearray(data)
    out = {}
    for e in manifest["entries"]:
        if e["dtype"] not in DTYPES:
            raise ValueError(f"unsupported dtype {e['dtype']}")
        raw = torch.frombuffer(buf, dtype=torch.uint8, offset=e["offset"], count=e["nbytes"]) if e["nbytes"] else \
            torch.empty(0, dtype=torch.uint8)
        out[e["name"]] = raw.view(DTYPES[e["dtype"]]).reshape(e["shape"]).clone()
    return out


class ShardStore:
    def __init__(self, root: str | Path, machine: int):
        self.root = Path(root)
        self.dir = self.root / f"machine-{machine:04d}"
        self.dir.mkdir(parents=True, exist_ok=True)
        # this process's mappings of the files it wrote through slots: committed, by (iteration, rank), and the one
        # spare per rank (see keep_newest); each holds its file open, so its inode cannot be another file's
        self._held: dict[tuple[int, int], Slot] = {}
        self._spares: dict[int, Slot] = {}
        self._lock = threading.Lock()

    def _paths(self, iteration: int, rank: int) -> tuple[Path, Path]:
        d = self.dir / f"iter-{iteration:08d}"
        return d / f"rank-{rank:05d}.bin", d / f"rank-{rank:05d}.json"

    def slot(self, iteration: int, rank: int, size: int) -> "Slot":
        """Room for ``size`` bytes of ``rank``'s shard of ``iteration``, in the store's memory: write the shard into
        ``slot.tensor``, then :meth:`Slot.commit` it. Takes this rank's spare file when there is one of that size,
        and the mapping of it this process still holds, if any (then nothing is mapped or faulted in again)."""
        bin_path, _ = self._paths(iteration, rank)
        bin_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = bin_path.with_name(bin_path.name + ".tmp")
        with self._lock:
            held = self._spares.pop(rank, None)
        found = False
        for spare in sorted(self.spare_dir.glob(f"rank-{rank:05d}-*.bin")):
            try:
                st = spare.stat()
                if st.st_size == size:
                    os.replace(spare, tmp)
                    found = True
                    if held is not None and held.ino == st.st_ino:  # the very file we hold mapped
                        held.reopen(iteration, tmp)
                        return held
                    break
                spare.unlink()
            except FileNotFoundError:  # another process of this machine dropped it meanwhile
                continue
        if held is not None:
            held.close()
        if not found:
            tmp.unlink(missing_ok=True)
        return Slot(self, iteration, rank, tmp, size)

    @property
    def spare_dir(self) -> Path:
        return self.dir / "spare"

    def put(self, iteration: int, rank: int, data: bytes, manifest: dict) -> None:
        """Write a whole shard from bytes (a plain new file; checkpoints in flight go through :meth:`slot`)."""
        bin_path, _ = self._paths(iteration, rank)
        bin_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = bin_path.with_name(bin_path.name + ".tmp")
        tmp.write_bytes(data)
        self._commit(tmp, iteration, rank, manifest)

    def _commit(self, tmp: Path, iteration: int, rank: int, manifest: dict) -> None:
        bin_path, json_path = self._paths(iteration, rank)
        os.replace(tmp, bin_path)
        meta = dict(manifest, iteration=iteration, rank=rank)
        tmp = json_path.with_name(json_path.name + ".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, json_path)  # the manifest is committed last

    def get(self, iteration: int, rank: int) -> tuple[bytes, dict] | None:
        """The shard's bytes and manifest if it is complete and intact, else None."""
        bin_path, json_path = self._paths(iteration, rank)
        try:
            manifest = json.loads(json_path.read_text())
            data = bin_path.read_bytes()
        except (OSError, ValueError):
            return None
        if len(data) != manifest.get("size") or hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
            return None
        return data, manifest

    def inventory(self) -> list[tuple[int, int]]:
        """(iteration, rank) of every intact shard held here."""
        out = []
        for d in sorted(self.dir.glob("iter-*")):
            it = int(d.name.split("-")[1])
            for j in sorted(d.glob("rank-*.json")):
                rank = int(j.stem.split("-")[1])
                if self.get(it, rank) is not None:
                    out.append((it, rank))
        return out

    def iterations(self) -> list[int]:
        return sorted(int(d.name.split("-")[1]) for d in self.dir.glob("iter-*"))

    def keep_newest(self, keep: int, recycle=()) -> None:
        """Drop all but the newest ``keep`` iterations. The files of the shards of the ranks in ``recycle`` (those
        this process writes) become spares for :meth:`slot`, at most one per rank; the rest are freed."""
        its = self.iterations()
        for it in its[:-keep] if keep else its:
            d = self.dir / f"iter-{it:08d}"
            for rank in recycle:
                bin_path, json_path = self._paths(it, rank)
                json_path.unlink(missing_ok=True)  # no longer a shard before its bytes change hands
                spare = self.spare_dir / f"rank-{rank:05d}-{it:08d}.bin"
                with self._lock:
                    held = self._held.pop((it, rank), None)
                try:
                    if not any(self.spare_dir.glob(f"rank-{rank:05d}-*.bin")):
                        self.spare_dir.mkdir(exist_ok=True)
                        os.replace(bin_path, spare)
                        if held is not None and held.ino == spare.stat().st_ino:
                            with self._lock:
                                self._spares[rank], held = held, None
                except FileNotFoundError:  # another process of this machine dropped the iteration first
                    pass
                if held is not None:
                    held.close()
            shutil.rmtree(d, ignore_errors=True)
        kept = set(self.iterations())
        with self._lock:  # mappings of iterations another process of this machine dropped
            gone = [k for k in self._held if k[0] not in kept]
            slots = [self._held.pop(k) for k in gone]
        for slot in slots:
            slot.close()

    def clean_partial(self) -> None:
        for tmp in self.dir.glob("iter-*/*.tmp"):
            tmp.unlink(missing_ok=True)

    def wipe(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)


class Slot:
    """One shard being written in place (see :meth:`ShardStore.slot`). Nothing of it counts until :meth:`commit`.
    It keeps its file open and mapped (``tensor`` is the mapping) until :meth:`close`."""

    def __init__(self, store: ShardStore, iteration: int, rank: int, tmp: Path, size: int):
        self.store, self.iteration, self.rank, self.tmp, self.size = store, iteration, rank, tmp, size
        self.fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o644)
        st = os.fstat(self.fd)
        self.ino = st.st_ino
        if st.st_size != size:
            os.ftruncate(self.fd, size)
        # MAP_POPULATE: the pages are mapped in one go, not faulted in one by one while the checkpoint is copied
        mem = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)) if size else None
        self.tensor = torch.frombuffer(mem, dtype=torch.uint8, count=size) if size else \
            torch.empty(0, dtype=torch.uint8)

    def reopen(self, iteration: int, tmp: Path) -> None:
        """The same file and mapping, now for another iteration's shard (the file was moved to ``tmp``)."""
        self.iteration, self.tmp = iteration, tmp

    def view(self) -> memoryview:
        return memoryview(self.tensor.numpy())

    def commit(self, manifest: dict, before_commit=None) -> None:
        """The shard is complete: make it count (bytes renamed into place, then the manifest)."""
        if before_commit:
            before_commit()  # fault injection: die with the bytes written and the shard not committed
        self.store._commit(self.tmp, self.iteration, self.rank, manifest)
        with self.store._lock:
            old = self.store._held.pop((self.iteration, self.rank), None)
            self.store._held[(self.iteration, self.rank)] = self
        if old is not None and old is not self:
            old.close()

    def close(self) -> None:
        """Let the file go (the mapping is freed with the last tensor that uses it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tensor = None
