"""In-memory checkpoint store: one directory per machine (under /dev/shm by default) that outlives the worker.

Layout::

    ROOT/machine-0003/iter-00000042/rank-00006.bin    raw bytes of every tensor of rank 6's shard, concatenated
    ROOT/machine-0003/iter-00000042/rank-00006.json   manifest: names, dtypes, shapes, offsets, size, sha256

A shard is written atomically: bytes to ``*.bin.tmp``, rename, then the manifest to ``*.json.tmp``, rename. A shard
counts only when its manifest exists and the bytes match its size and checksum; anything else (a half-written file
from a worker killed mid-write, a corrupted byte) is ignored. No pickle is involved anywhere: tensors are rebuilt
from raw bytes with ``torch.frombuffer``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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

    def _paths(self, iteration: int, rank: int) -> tuple[Path, Path]:
        d = self.dir / f"iter-{iteration:08d}"
        return d / f"rank-{rank:05d}.bin", d / f"rank-{rank:05d}.json"

    def put(self, iteration: int, rank: int, data: bytes, manifest: dict, before_commit=None) -> None:
        bin_path, json_path = self._paths(iteration, rank)
        bin_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = bin_path.with_name(bin_path.name + ".tmp")
        with open(tmp, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            if before_commit:
                before_commit()  # fault injection: die half-way through a write
            f.write(data[half:])
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

    def keep_newest(self, keep: int) -> None:
        """Drop all but the newest ``keep`` iterations."""
        its = self.iterations()
        for it in its[:-keep] if keep else its:
            shutil.rmtree(self.dir / f"iter-{it:08d}", ignore_errors=True)

    def clean_partial(self) -> None:
        for tmp in self.dir.glob("iter-*/*.tmp"):
            tmp.unlink(missing_ok=True)

    def wipe(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
