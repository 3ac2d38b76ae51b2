"""Checkpoint traffic of one rank, as the plan's schedule says: the same data path the simulator models.

One checkpoint of this rank's shard (model + optimizer state, as raw bytes):

1. **Copy out.** A copier thread copies the live state, chunk by chunk (``schedule.chunk_bytes``), straight into
   the machine's :class:`~runtime.store.ShardStore` (a slot of its shared memory): that is the local copy, committed
   once complete, with its SHA-256 (under ``gemini`` the hash and the commit wait for the first idle span, as they
   cost host CPU that the training's collectives use). The optimizer update that would overwrite the state waits for the
   last chunk (:meth:`Checkpoint.wait_copied`). With ``buffer_bytes`` = two chunks this is the simulator's
   double-buffered device-to-host copy; on GPUs the chunks go through a bounded pinned staging buffer of that size.
2. **Send.** A sender thread sends each chunk to the plan's peers (the other holders of this machine's checkpoint)
   as soon as the chunk is in CPU memory *and* the schedule releases it, so copying chunk k+1 overlaps sending k.
   A long-lived :class:`Receiver` per peer that sends to us has its receive posted in advance and receives straight
   into a slot of the store. The manifest goes last,
   after the local copy is committed, so a shard is never complete on a peer
   before it is on its own machine.

Schedules (when chunks are released):

- ``blocking``: after the update, training waits while the whole checkpoint is copied and sent.
- ``naive``: everything is released when the next iteration starts, competing with training's collectives.
- ``gemini``: chunks are released into the profiled idle spans of the iteration (``schedule.spans`` in the plan, with
  the bytes each span carries); what does not fit goes when the backward pass ends. A span opens when this rank's
  collective that precedes it ends (``after_collectives``: how many of the iteration's collectives end before it),
  so the plan follows the real timeline when it drifts from the profile; spans without it open at their time from
  the iteration's start (``start_s``), as the simulator plays them.

Point-to-point traffic uses two process groups of its own (one per direction between a pair of ranks): in gloo,
sends and receives between one pair over one connection do not overlap, while a real NIC is full duplex.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time

import torch
import torch.distributed as dist

SCHEDULES = ("blocking", "naive", "gemini")
TAG_BASE = 10_000  # checkpoint traffic tags: TAG_BASE + (checkpoint sequence number % 100) * 1000 + message index
MAX_CHUNKS = 990


class Progress:
    """A counter other threads can wait on (bytes copied, spans released...)."""

    def __init__(self):
        self.value = 0.0
        self.cond = threading.Condition()

    def set(self, value: float) -> None:
        with self.cond:
            self.value = value
            self.cond.notify_all()

    def wait_for(self, value: float) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.value >= value)


def pin_thread(cores: set[int] | None) -> None:
    """Run the calling thread, and the threads it starts from now on, on these cores (None: leave it be)."""
    if cores:
        os.sched_setaffinity(0, cores)


def chunk_bounds(size: int, chunk: int) -> list[tuple[int, int]]:
    """Byte ranges of the chunks of a ``size``-byte shard (one empty chunk for an empty shard)."""
    return [(a, min(a + chunk, size)) for a in range(0, size, chunk)] or [(0, 0)]


def isend_bytes(payload: bytes, dst: int, group, tags: tuple[int, int]) -> list:
    """Start sending bytes, their length first (tags: length, bytes); returns the works."""
    blob = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    size = torch.tensor([blob.numel()], dtype=torch.int64)
    return [dist.isend(size, dst, group=group, tag=tags[0]), dist.isend(blob, dst, group=group, tag=tags[1])]


def recv_bytes(src: int, group, tags: tuple[int, int]) -> bytes:
    """Receive what :func:`isend_bytes` sent."""
    n = torch.empty(1, dtype=torch.int64)
    dist.recv(n, src, group=group, tag=tags[0])
    buf = torch.empty(int(n.item()), dtype=torch.uint8)
    dist.recv(buf, src, group=group, tag=tags[1])
    return buf.numpy().tobytes()


def entries_of(tensors: dict[str, torch.Tensor]) -> tuple[list[dict], list[torch.Tensor]]:
    """The manifest entries (as :func:`runtime.store.pack` writes them) and flat uint8 views of the live tensors."""
    entries, views, offset = [], [], 0
    for name, t in tensors.items():
        flat = t.detach().reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        entries.append({"name": name, "dtype": str(t.dtype), "shape": list(t.shape), "offset": offset,
                        "nbytes": flat.numel()})
        views.append(flat)
        offset += flat.numel()
    return entries, views


class Checkpoint:
    """One checkpoint of one rank in flight: copy-out, sends to peers, receives from peers."""

    def __init__(self, worker, iteration: int, schedule: dict, release_at: float, seq: int, released_in: int,
                 iteration_start: float | None = None):
        self.w = worker
        self.iteration = iteration
        self.seq = seq  # checkpoints this rank sent before this one: tags the messages
        self.released_in = released_in  # the iteration its traffic runs in
        # when that iteration started (blocking: before the update that precedes the release); logged times count
        # from it, as the simulator's do
        self.iteration_start = release_at if iteration_start is None else iteration_start
        self.schedule = schedule
        self.release_at = release_at  # perf_counter of the iteration start the schedule's times count from
        tensors = worker._tensors()
        self.entries, self.views = entries_of(tensors)
        self.size = sum(e["nbytes"] for e in self.entries)
        chunk = max(1, int(schedule["chunk_bytes"]))
        self.chunk = max(chunk, math.ceil(self.size / MAX_CHUNKS))
        self.bounds = chunk_bounds(self.size, self.chunk)
        self.slot = None  # where the local copy goes in the store (the copier opens it); the sender sends from it
        self.copied = Progress()  # bytes in CPU memory
        self.committed = threading.Event()  # local copy in the store
        self.interval = int(worker.ckpt["interval_iters"]) if schedule["name"] == "gemini" else 1
        self.starts = [release_at]  # start of every iteration its traffic may use (perf_counter)
        self.bases = [worker.recorder.collectives.value]  # training collectives ended before each of them
        self.started = Progress()  # iterations started since the release
        self.started.set(1)
        self.backward = Progress()  # backward passes ended since the release
        self.releases = self._releases()
        self.manifest: dict | None = None
        self.errors: list[BaseException] = []
        send_to, recv_from = worker._peers()
        self.send_to, self.recv_from = send_to, recv_from
        self.threads = [threading.Thread(target=self._guard, args=(self._copy,), daemon=True),
                        threading.Thread(target=self._guard, args=(self._send,), daemon=True)]
        self.ends: list[float] = []  # when each thread finished
        self.sent: list[tuple] = []  # (chunk, posted, sent) in seconds from the release
        self.cpu: list[float] = []  # CPU seconds of each thread (user + system)
        self.copied_at: float | None = None
        self.cores: list[int] = []  # where its threads ran

    # -- threads ---------------------------------------------------------------------------------------------------
    def start(self) -> "Checkpoint":
        for t in self.threads:
            t.start()
        return self

    def _guard(self, fn, *args) -> None:
        pin_thread(self.w.host_cores)  # the host's work, not the accelerator's (see runtime/worker.py)
        self.cores = sorted(os.sched_getaffinity(0))
        c0 = time.thread_time()
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - reported to the main thread by wait()
            self.errors.append(e)
            self.copied.set(math.inf)
            self.committed.set()
        self.cpu.append(time.thread_time() - c0)
        self.ends.append(time.perf_counter())

    def _copy(self) -> None:
        self.slot = self.w.store.slot(self.iteration, self.w.rank, self.size)
        out, pos = self.slot.tensor, 0
        spans = []  # (tensor index, start within it) of every byte range, walked once
        for k, v in enumerate(self.views):
            spans.append((pos, pos + v.numel(), k))
            pos += v.numel()
        j = 0
        for a, b in self.bounds:
            while a < b:
                while spans[j][1] <= a:
                    j += 1
                s0, s1, k = spans[j]
                end = min(b, s1)
                out[a:end].copy_(self.views[k][a - s0:end - s0])
                a = end
            self.copied.set(b)
        self.copied_at = time.perf_counter()
        if self.schedule["name"] == "gemini":  # hashing and the store's file cost host CPU: in the first idle span
            r, offset, _, after = self.releases[0]
            while not (self._opened(r, offset, after) or self.backward.value > r):  # at the latest: backward's end
                time.sleep(0.002)
        digest = hashlib.sha256(self.slot.view()).hexdigest()
        self.manifest = {"entries": self.entries, "size": self.size, "sha256": digest}
        self.w._commit_local(self.slot, self.manifest)
        self.committed.set()

    def _group(self, src: int, dst: int):
        return group_for(self.w.repl_groups, src, dst)

    def _tag(self, index: int) -> int:
        return tag(self.seq, index)

    def _releases(self):
        """(iteration r of the interval, offset in seconds or "backward", [chunk indices]) in order."""
        n = len(self.bounds)
        if self.schedule["name"] != "gemini" or not self.schedule.get("spans"):
            return [(0, 0.0, list(range(n)), None)]
        ppm = self.w.ppm
        out, k, planned = [], 0, 0.0
        for r in range(self.interval):  # the profiled idle spans of every iteration of the interval
            for span in self.schedule["spans"]:
                planned += span["bytes"] / ppm  # the plan's bytes are the machine's; this rank sends its share
                idx = []
                while k < n and self.bounds[k][1] <= planned + self.chunk / 2:  # the chunks nearest the plan
                    idx.append(k)
                    k += 1
                if idx:
                    out.append((r, span["start_s"], idx, span.get("after_collectives")))
        if k < n:  # what did not fit goes when the interval's last backward pass ends
            out.append((self.interval - 1, "backward", list(range(k, n)), None))
        return out

    def _opened(self, r: int, offset, after) -> bool:
        """Has this release of :meth:`_releases` opened?"""
        if offset == "backward":
            return self.backward.value > r
        if self.started.value <= r:
            return False
        if after is not None:
            return self.w.recorder.collectives.value >= self.bases[r] + after
        return time.perf_counter() >= self.starts[r] + offset

    def _wait_release(self, r: int, offset, after) -> None:
        """Wait until a release of :meth:`_releases` opens."""
        if offset == "backward":
            self.backward.wait_for(r + 1)
        elif after is not None:  # when this rank's own collective that opens the span has ended
            self.started.wait_for(r + 1)
            self.w.recorder.collectives.wait_for(self.bases[r] + after)
        else:  # at the span's time from the iteration's start
            self.started.wait_for(r + 1)
            release = self.starts[r] + offset
            if release > time.perf_counter():
                time.sleep(release - time.perf_counter())

    def _send(self) -> None:
        me = self.w.rank
        header = torch.tensor([self.iteration, self.size, self.chunk], dtype=torch.int64)
        works = [dist.isend(header, dst, group=self._group(me, dst), tag=self._tag(0)) for dst in self.send_to]
        for r, offset, idx, after in self.releases:
            self._wait_release(r, offset, after)
            for k in idx:
                a, b = self.bounds[k]
                self.copied.wait_for(b)
                if self.errors:
                    return
                t = time.perf_counter()
                works += [dist.isend(self.slot.tensor[a:b], dst, group=self._group(me, dst), tag=self._tag(1 + k))
                          for dst in self.send_to]
                for w in works:  # one chunk in flight per peer: the next is sent when this one has left
                    w.wait()
                works = []
                self.sent.append((k, t - self.release_at, time.perf_counter() - self.release_at))
        self.committed.wait()
        if self.errors:
            return
        last = 1 + len(self.bounds)
        meta = json.dumps(self.manifest).encode()
        for dst in self.send_to:
            works += isend_bytes(meta, dst, self._group(me, dst), (self._tag(last), self._tag(last + 1)))
        for w in works:
            w.wait()

    # -- the main thread's view --------------------------------------------------------------------------------------
    def iteration_started(self, t: float) -> None:
        self.bases.append(self.w.recorder.collectives.value)
        self.starts.append(t)
        self.started.set(len(self.starts))

    def backward_ended(self) -> None:
        self.backward.set(self.backward.value + 1)

    def wait_copied(self) -> None:
        self.copied.wait_for(self.size)
        self.committed.wait()
        self._raise()

    def wait(self) -> float:
        """Wait until every send and receive is done; return when the last of them finished (perf_counter)."""
        for t in self.threads:
            t.join()
        for r in self.receivers():
            r.stored.wait_for(self.seq + 1)
        self._raise()
        return max(self.ends + [r.done_at[self.seq] for r in self.receivers()])

    def data_done(self) -> float:
        """When every byte was where it goes (after :meth:`wait`): this rank's copy in CPU memory and the last chunk
        from each peer that sends to us; the simulator's checkpoint completion (hashing and files come after)."""
        return max([self.copied_at or self.release_at] + [r.data_at[self.seq] for r in self.receivers()])

    def cpu_seconds(self) -> float:
        """CPU time this checkpoint cost this rank (after :meth:`wait`): copy, hash, files, sends and receives."""
        return sum(self.cpu) + sum(r.cpu[self.seq] for r in self.receivers())

    def _raise(self) -> None:
        if self.errors:
            raise RuntimeError(f"checkpoint {self.iteration} failed on rank {self.w.rank}") from self.errors[0]
        for r in self.receivers():
            if r.errors:
                raise RuntimeError(f"receiving checkpoint {self.iteration} from rank {r.src} failed on rank "
                                   f"{self.w.rank}") from r.errors[0]

    def receivers(self) -> list["Receiver"]:
        return [self.w.receivers[src] for src in self.recv_from]


def tag(seq: int, index: int) -> int:
    """The tag of message ``index`` of the ``seq``-th checkpoint between two ranks."""
    return TAG_BASE + (seq % 100) * 1000 + index


def group_for(groups, src: int, dst: int):
    return groups[0 if src < dst else 1]


class Receiver:
    """Receives, one after the other, the checkpoints one peer sends this rank, and stores them. Its receive is
    posted before the peer sends (a gloo send waits for the receiver to post), so a peer whose iteration starts a
    little earlier than ours is not held back. A header with a negative size ends it (sent by :func:`stop`)."""

    def __init__(self, worker, src: int):
        self.w, self.src = worker, src
        self.stored = Progress()  # checkpoints stored
        self.done_at: dict[int, float] = {}  # seq -> when it was stored (perf_counter)
        self.data_at: dict[int, float] = {}  # seq -> when its last chunk arrived
        self.cpu: dict[int, float] = {}  # seq -> CPU seconds spent receiving and storing it
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        pin_thread(self.w.host_cores)
        g = group_for(self.w.repl_groups, self.src, self.w.rank)
        seq = 0
        try:
            while True:
                header = torch.empty(3, dtype=torch.int64)
                dist.recv(header, self.src, group=g, tag=tag(seq, 0))
                c0 = time.thread_time()
                iteration, size, chunk = (int(x) for x in header.tolist())
                if size < 0:
                    return
                slot = self.w.store.slot(iteration, self.src, size)
                body = slot.tensor
                bounds = chunk_bounds(size, chunk)
                # one chunk's receive at a time (posting them all at once was tried: no gain beyond the noise for
                # gemini, README "Closing the loop")
                for k, (a, b) in enumerate(bounds):
                    dist.recv(body[a:b], self.src, group=g, tag=tag(seq, 1 + k))
                self.data_at[seq] = time.perf_counter()
                last = 1 + len(bounds)
                meta = json.loads(recv_bytes(self.src, g, (tag(seq, last), tag(seq, last + 1))))
                slot.commit(meta)
                del slot, body  # unmapped once its tensor is gone
                self.done_at[seq] = time.perf_counter()
                self.cpu[seq] = time.thread_time() - c0
                seq += 1
                self.stored.set(seq)
        except BaseException as e:  # noqa: BLE001 - reported by Checkpoint.wait
            self.errors.append(e)
            self.stored.set(math.inf)


def stop(worker, send_to: list[int], seq: int, receivers: list[Receiver]) -> None:
    """End the peers' receivers (this rank sends no more checkpoints) and wait for ours to end."""
    me = worker.rank
    works = [dist.isend(torch.tensor([-1, -1, -1], dtype=torch.int64), dst,
                        group=group_for(worker.repl_groups, me, dst), tag=tag(seq, 0)) for dst in send_to]
    for w in works:
        w.wait()
    for r in receivers:
        r.thread.join()
