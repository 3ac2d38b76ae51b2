"""Moving checkpoint bytes between ranks: length-prefixed messages, tags, and one long-lived receiver per peer.

All checkpoint traffic uses gloo process groups of the runtime's own, beside the training job's (which may be
NCCL): one group per direction between a pair of ranks, since in gloo sends and receives between one pair over one
connection do not overlap while a real NIC is full duplex, and a third for the runtime's own control messages
(what every machine holds, barriers).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from . import replicas

TAG_BASE = 10_000  # checkpoint traffic tags: TAG_BASE + (checkpoint sequence number % 100) * 1000 + message index
MAX_CHUNKS = 990
# chunks in flight per peer and direction: a gloo message waits for its receive to be posted, so one at a time pays
# a round trip per chunk (on loopback with 1 MiB chunks: 0.5 GB/s per direction with both ways busy, 1.5 with 8)
WINDOW = 8


class Progress:
    """A counter other threads can wait on (bytes copied, spans released...)."""

    def __init__(self):
        self.value = 0.0
        self.cond = threading.Condition()

    def set(self, value: float) -> None:
        with self.cond:
            self.value = value
            self.cond.notify_all()

    def add(self, n: float = 1) -> None:
        with self.cond:
            self.value += n
            self.cond.notify_all()

    def wait_for(self, value: float) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.value >= value)


def pin_thread(cores) -> None:
    """Run the calling thread, and the threads it starts from now on, on these cores (None or empty: leave it)."""
    if cores:
        os.sched_setaffinity(0, set(cores))


@dataclass(frozen=True)
class Groups:
    """The runtime's gloo groups: ``up`` (lower rank sends to higher), ``down`` and ``control``."""
    up: object
    down: object
    control: object

    @classmethod
    def create(cls, timeout_s: float) -> "Groups":
        """Collective: every rank of the job calls it, in the same order."""
        t = timedelta(seconds=timeout_s)
        return cls(*(dist.new_group(backend="gloo", timeout=t) for _ in range(3)))

    def between(self, src: int, dst: int):
        return self.up if src < dst else self.down


def tag(seq: int, index: int) -> int:
    """The tag of message ``index`` of the ``seq``-th checkpoint between two ranks."""
    return TAG_BASE + (seq % 100) * 1000 + index


def chunk_bounds(size: int, chunk: int) -> list[tuple[int, int]]:
    """Byte ranges of the chunks of a ``size``-byte shard (one empty chunk for an empty shard)."""
    return [(a, min(a + chunk, size)) for a in range(0, size, chunk)] or [(0, 0)]


class Window:
    """At most :data:`WINDOW` chunks of a transfer in flight: :meth:`add` waits for the oldest before it starts one
    more, :meth:`drain` waits for them all; ``landed(item)`` is called as each completes, oldest first."""

    def __init__(self, landed=None):
        self.flying: deque = deque()  # (item, its works)
        self.landed = landed

    def add(self, start) -> None:
        """``start()`` starts one chunk's sends or receives, once there is room, and returns (item, its works)."""
        if len(self.flying) == WINDOW:
            self._land()
        self.flying.append(start())

    def drain(self) -> None:
        while self.flying:
            self._land()

    def _land(self) -> None:
        item, works = self.flying.popleft()
        for w in works:
            w.wait()
        if self.landed:
            self.landed(item)


def stream(op, buf: torch.Tensor, peer: int, group, chunk: int, nbytes: int | None = None) -> None:
    """Send or receive (``op``: ``dist.isend`` or ``dist.irecv``) ``nbytes`` (default: all of ``buf``) the way
    checkpoint traffic moves: ``chunk``-byte messages in a :class:`Window`, cycling through whole chunks of ``buf``
    (at least one chunk long). For measuring a link as the runtime uses it (the probe, the state-path bench)."""
    nbytes = buf.numel() if nbytes is None else nbytes
    whole = buf.numel() // chunk * chunk or buf.numel()
    window = Window()
    for k, a in enumerate(range(0, nbytes, chunk)):
        b = a % whole
        window.add(lambda: (k, [op(buf[b:b + min(chunk, nbytes - a)], peer, group=group, tag=k)]))
    window.drain()


def both_ways(out: torch.Tensor, into: torch.Tensor, peer: int, send_group, recv_group, chunk: int,
              nbytes: int | None = None) -> None:
    """:func:`stream` ``out`` to ``peer`` and from it into ``into`` at the same time (a thread sends), as every
    machine does during a checkpoint."""
    sender = threading.Thread(target=stream, args=(dist.isend, out, peer, send_group, chunk, nbytes))
    sender.start()
    stream(dist.irecv, into, peer, recv_group, chunk, nbytes)
    sender.join()


def _isend_buffer(buffer, dst: int, group, tags: tuple[int, int]) -> list:
    """Start sending a writable buffer as it lies (no copy), its length first (tags: length, bytes)."""
    blob = torch.frombuffer(buffer, dtype=torch.uint8) if len(buffer) else torch.empty(0, dtype=torch.uint8)
    size = torch.tensor([blob.numel()], dtype=torch.int64)
    return [dist.isend(size, dst, group=group, tag=tags[0]), dist.isend(blob, dst, group=group, tag=tags[1])]


def _recv_buffer(src: int, group, tags: tuple[int, int]) -> torch.Tensor:
    """Receive what :func:`_isend_buffer` sent, into a new tensor."""
    n = torch.empty(1, dtype=torch.int64)
    dist.recv(n, src, group=group, tag=tags[0])
    buf = torch.empty(int(n.item()), dtype=torch.uint8)
    dist.recv(buf, src, group=group, tag=tags[1])
    return buf


def isend_bytes(payload: bytes, dst: int, group, tags: tuple[int, int]) -> list:
    """Start sending bytes, their length first (tags: length, bytes); returns the works."""
    return _isend_buffer(bytearray(payload), dst, group, tags)


def recv_bytes(src: int, group, tags: tuple[int, int]) -> bytes:
    """Receive what :func:`isend_bytes` sent."""
    return _recv_buffer(src, group, tags).numpy().tobytes()


RECOVERY_CHUNK = 16 << 20  # a shard sent in recovery moves in chunks of this size (more for a huge one)


def _shard_chunks(size: int) -> list[tuple[int, int]]:
    """At most :data:`MAX_CHUNKS` chunks (each tag is one), each a whole number of MiB (so of pages)."""
    return chunk_bounds(size, max(RECOVERY_CHUNK, -(-size // (MAX_CHUNKS << 20)) << 20))


def send_shard(data, manifest: dict, dst: int, group, tag_: int) -> list:
    """Start sending a stored shard: its manifest (length first), its size, then its bytes in chunks, each straight
    from where it lies (a writable buffer, such as the store's mapping, is not copied); returns the works."""
    blob = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    works = isend_bytes(json.dumps(manifest).encode(), dst, group, (tag_, tag_ + 1000))
    works.append(dist.isend(torch.tensor([blob.numel()], dtype=torch.int64), dst, group=group, tag=tag_ + 2000))
    return works + [dist.isend(blob[a:b], dst, group=group, tag=tag_ + 3000 + k)
                    for k, (a, b) in enumerate(_shard_chunks(blob.numel()))]


def recv_shard(src: int, group, tag_: int, store, iteration: int, rank: int, started=None,
               arrived: Progress | None = None) -> tuple[memoryview, dict]:
    """Receive what :func:`send_shard` sent straight into ``store`` as ``rank``'s shard of ``iteration`` (a slot of
    its memory, no second copy) and commit it there; returns its bytes (the slot's mapping, already in memory, not
    mapped again) and manifest. The slot's memory is reserved chunk by chunk by a thread of its own, ahead of the
    chunks' receives, so a new machine's store (whose memory is all new) reserves while it receives, not first.
    For using the shard as it arrives: ``started(bytes, manifest)`` is called once the slot exists, before its
    bytes come, and ``arrived`` is set to how many of its first bytes are there as each chunk lands."""
    manifest = json.loads(recv_bytes(src, group, (tag_, tag_ + 1000)))
    n = torch.empty(1, dtype=torch.int64)
    dist.recv(n, src, group=group, tag=tag_ + 2000)
    slot = store.slot(iteration, rank, int(n.item()), reserve=False)
    if started is not None:
        started(slot.view(), manifest)
    chunks = _shard_chunks(slot.size)
    reserved, failed = Progress(), []

    def reserve() -> None:
        try:
            for k, (a, b) in enumerate(chunks):
                slot.reserve(a, b)
                reserved.set(k + 1)
        except BaseException as e:  # handed to the receiving thread, which raises it
            failed.append(e)
            reserved.set(math.inf)

    threading.Thread(target=reserve, daemon=True, name="gemini-reserve").start()
    window = Window(None if arrived is None else lambda k: arrived.set(chunks[k][1]))
    for k, (a, b) in enumerate(chunks):
        reserved.wait_for(k + 1)
        if failed:
            raise failed[0]
        window.add(lambda: (k, [dist.irecv(slot.tensor[a:b], src, group=group, tag=tag_ + 3000 + k)]))
    window.drain()
    slot.commit(manifest)
    return slot.view(), manifest


class Incoming:
    """A shard :func:`recv_shard` receives in a thread of its own, to be used as it arrives: made once its manifest
    and size have come (``data``, the slot's mapping, and ``manifest``; a receive that fails before raises here),
    :meth:`wait` for its first bytes, :meth:`join` for all of it, committed. ``done_at``: when the shard was all
    there (``time.perf_counter()``)."""

    def __init__(self, src: int, group, tag_: int, store, iteration: int, rank: int):
        self.arrived, self.done_at = Progress(), None
        self.data, self.manifest, self._error = None, None, None
        began = threading.Event()

        def start(data, manifest) -> None:
            self.data, self.manifest = data, manifest
            began.set()

        def receive() -> None:
            try:
                recv_shard(src, group, tag_, store, iteration, rank, started=start, arrived=self.arrived)
                self.done_at = time.perf_counter()
            except BaseException as e:  # handed to whoever waits, which raises it
                self._error = e
            finally:
                began.set()
                self.arrived.set(math.inf)  # all there, or never to be: no waiter is left behind

        self._thread = threading.Thread(target=receive, daemon=True, name="gemini-recover-recv")
        self._thread.start()
        began.wait()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def wait(self, nbytes: int) -> None:
        """Until the shard's first ``nbytes`` are there."""
        self.arrived.wait_for(nbytes)
        self._raise()

    def join(self) -> None:
        """Until the shard is all there and committed to the store."""
        self._thread.join()
        self._raise()


class Receiver:
    """Receives, one after the other, the checkpoints one peer sends this rank, and stores them in this machine's
    store. Its receive is posted before the peer sends (a gloo send waits for the receiver to post), so a peer whose
    iteration starts a little earlier than ours is not held back. A header with a negative size ends it
    (:func:`stop`)."""

    def __init__(self, rank: int, src: int, store, groups: Groups, host_cores=None, files: int = 0,
                 replica: bool = False, timeout_s: float = 120.0, make_room: Callable[[], None] | None = None):
        self.rank, self.src, self.store, self.groups, self.host_cores = rank, src, store, groups, host_cores
        self.files = files  # store files of the peer's shards to have ready (ShardStore.prepare)
        # drops the checkpoints the plan no longer keeps, before a slot is taken for the peer's next one: a peer
        # whose iteration runs ahead of ours sends it before our own checkpoint's end drops them, and the slot would
        # then find no spare and reserve new memory (at 1 GiB a shard, 0.6-1.2 s of this host's CPU, every time)
        self.make_room = make_room
        # the peer is an HSDP twin of this rank: it sends its own part only, kept as a thin copy once the digest of
        # its DTensor pieces is that of this rank's own checkpoint of the same iteration (runtime/replicas.py)
        self.replica, self.timeout_s = replica, timeout_s
        self.stored = Progress()  # checkpoints stored
        self.done_at: dict[int, float] = {}  # seq -> when it was stored (perf_counter)
        self.data_at: dict[int, float] = {}  # seq -> when its last chunk arrived
        self.cpu: dict[int, float] = {}  # seq -> CPU seconds spent receiving and storing it
        self.sizes: dict[int, int] = {}  # seq -> bytes it stored (a thin copy: the peer's own part)
        self.memory: dict[int, str] = {}  # seq -> where its slot's memory came from (Slot.memory)
        self.arrivals: dict[int, list] = {}  # seq -> (chunk, when it was all here) of each chunk, in order
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._loop, daemon=True, name=f"gemini-recv-{src}")
        self.thread.start()

    def _loop(self) -> None:
        pin_thread(self.host_cores)
        g = self.groups.between(self.src, self.rank)
        seq = 0
        try:
            while True:
                header = torch.empty(3, dtype=torch.int64)
                dist.recv(header, self.src, group=g, tag=tag(seq, 0))
                c0 = time.thread_time()
                iteration, size, chunk = (int(x) for x in header.tolist())
                if size < 0:
                    return
                if self.make_room is not None:
                    self.make_room()
                slot = self.store.slot(iteration, self.src, size)
                self.memory[seq] = slot.memory
                body = slot.tensor
                bounds = chunk_bounds(size, chunk)
                got = self.arrivals.setdefault(seq, [])
                window = Window(landed=lambda k: got.append((k, time.perf_counter())))  # receives posted ahead
                for k, (a, b) in enumerate(bounds):
                    window.add(lambda: (k, [dist.irecv(body[a:b], self.src, group=g, tag=tag(seq, 1 + k))]))
                window.drain()
                self.data_at[seq] = time.perf_counter()
                last = 1 + len(bounds)
                meta = json.loads(recv_bytes(self.src, g, (tag(seq, last), tag(seq, last + 1))))
                if self.replica:
                    meta = replicas.accept(self.store, iteration, self.rank, self.src, meta, size, self.timeout_s)
                slot.commit(meta)
                del slot, body  # unmapped once its tensor is gone
                self.store.prepare(self.src, size, self.files)  # the next ones' memory (once per size: the first)
                self.sizes[seq] = size
                self.done_at[seq] = time.perf_counter()
                self.cpu[seq] = time.thread_time() - c0
                seq += 1
                self.stored.set(seq)
        except BaseException as e:  # noqa: BLE001 - reported by the checkpoint that waits for it
            self.errors.append(e)
            self.stored.set(math.inf)


def stop(rank: int, groups: Groups, send_to: list[int], seq: int, receivers: list[Receiver]) -> None:
    """End the peers' receivers (this rank sends no more checkpoints) and wait for ours to end."""
    works = [dist.isend(torch.tensor([-1, -1, -1], dtype=torch.int64), dst, group=groups.between(rank, dst),
                        tag=tag(seq, 0)) for dst in send_to]
    for w in works:
        w.wait()
    for r in receivers:
        r.thread.join()
