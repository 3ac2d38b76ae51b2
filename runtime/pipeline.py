"""One checkpoint of one rank in flight: copy out, send to the peers, receive theirs.

1. **Copy out.** A copier thread copies the live state straight into the machine's
   :class:`~runtime.store.ShardStore` (a slot of its shared memory): that is the local copy, committed once complete,
   with its checksum. From a GPU it copies chunk by chunk (``schedule.chunk_bytes``); with ``buffer_bytes`` = two
   chunks this is the simulator's double-buffered device-to-host copy. On the CPU it copies tensor by tensor, the
   whole state before the first send. The optimizer update that would overwrite the state waits for the last chunk
   (:meth:`InFlight.wait_copied`).
2. **Send.** A sender thread sends each chunk to the plan's peers as soon as the chunk is in CPU memory *and* the
   schedule (runtime/schedules.py) releases it, so copying chunk k+1 overlaps sending k; up to
   :data:`~runtime.transport.WINDOW` chunks of a release are in flight at once. The peers' long-lived
   :class:`~runtime.transport.Receiver` receive straight into their store, with as many receives posted ahead.
   The manifest goes last, after the local copy is committed, so a shard is never complete on a peer before it is
   on its own machine.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist

from . import device, replicas
from .state import CHUNKS, checksum
from .schedules import Schedule
from .store import StoreError
from .transport import (MAX_CHUNKS, Groups, Progress, Receiver, Window, chunk_bounds, isend_bytes, pin_thread,
                        tag)

log = logging.getLogger("runtime")


class Worker:
    """A long-lived daemon thread that runs the jobs given to it one after the other: a checkpoint's copier and
    sender are jobs, not threads of their own, so starting one does not make the training thread wait for a new
    thread to come up (its start waits for the new thread's first turn at the interpreter's lock)."""

    def __init__(self, name: str):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, daemon=True, name=name)
        self.thread.start()

    def submit(self, job: Callable[[], None]) -> threading.Event:
        """Run ``job`` (which must not raise) after the jobs before it; the event is set when it is done."""
        done = threading.Event()
        self.jobs.put((job, done))
        return done

    def stop(self) -> None:
        """End the thread once the jobs given before have run."""
        self.jobs.put(None)

    def _loop(self) -> None:
        while (item := self.jobs.get()) is not None:
            job, done = item
            try:
                job()
            except BaseException:  # noqa: BLE001 - a job reports its own errors; the worker must outlive it
                log.exception("a checkpoint job raised")
            done.set()


@dataclass
class Link:
    """What a checkpoint needs of the rank that takes it."""
    rank: int
    store: object  # ShardStore
    groups: Groups
    send_to: list[int]
    receivers: list[Receiver]
    collectives: Progress  # training collectives ended so far (the gemini schedule anchors spans to them)
    host_cores: list[int] | None = None
    on_commit: Callable[[int], None] | None = None  # called with the iteration just before the local commit
    files: int = 0  # store files of each rank to have ready (ShardStore.prepare): the plan's keep + 1
    # peers (of send_to) that hold this rank's DTensor pieces as an HSDP replica: sent this rank's own part only
    # (runtime/replicas.py); ``replicated``: this rank sends to or receives from such a peer, so its checkpoints
    # carry the digest of their DTensor pieces
    thin: frozenset = frozenset()
    replicated: bool = False
    write_s: list[float] = field(default_factory=list)
    # the threads every checkpoint of this rank runs on: its copier and its sender
    workers: tuple[Worker, Worker] = field(default_factory=lambda: (Worker("gemini-copy"), Worker("gemini-send")))


class InFlight:
    """One checkpoint of one rank: copy-out, sends to peers, and the peers' sends to us."""

    def __init__(self, link: Link, iteration: int, entries: list[dict], views: list[torch.Tensor], skeleton,
                 schedule: Schedule, plan_schedule: dict, interval: int, ppm: int, seq: int, release_at: float,
                 released_in: int, iteration_start: float | None = None):
        self.link = link
        self.iteration = iteration
        self.seq = seq  # checkpoints this rank sent before this one: tags the messages
        self.released_in = released_in  # the iteration its traffic runs in
        # when that iteration started (blocking: before the update that precedes the release); logged times count
        # from it, as the simulator's do
        self.iteration_start = release_at if iteration_start is None else iteration_start
        self.schedule = schedule
        self.plan_schedule = plan_schedule
        self.release_at = release_at  # perf_counter of the iteration start the schedule's times count from
        self.entries, self.views, self.skeleton = entries, views, skeleton
        self.size = sum(e["nbytes"] for e in entries)
        self._shared = set(skeleton.get(CHUNKS, {})) if link.thin or link.replicated else set()
        self.own_size = sum(e["nbytes"] for e in entries if e["name"] not in self._shared)
        self.sent_bytes = 0  # to every peer (after wait)
        chunk = max(1, int(plan_schedule["chunk_bytes"]))
        self.chunk = max(chunk, math.ceil(self.size / MAX_CHUNKS))
        self.bounds = chunk_bounds(self.size, self.chunk)
        self.slot = None  # where the local copy goes in the store (the copier opens it); the sender sends from it
        self.copied = Progress()  # bytes in CPU memory
        # device tensors are copied on a side stream (runtime/device.py), after an event recorded here, on the
        # training thread: the state as of the optimizer step
        self.device = next((v.device for v in views if v.is_cuda), None)
        self.ready = device.mark(self.device) if self.device is not None else None
        self.enqueued = threading.Event()  # every device copy is queued; last_event is the last one's
        self.last_event = None
        self.stream_wait = None  # CUDA: timing events around the training stream's wait for the copy (device.wait_on)
        self.committed = threading.Event()  # local copy in the store
        self.interval = interval if schedule.defer_hash else 1
        self.starts = [release_at]  # start of every iteration its traffic may use (perf_counter)
        self.bases = [link.collectives.value]  # training collectives ended before each of them
        self.started = Progress()  # iterations started since the release
        self.started.set(1)
        self.backward = Progress()  # backward passes ended since the release
        self.releases = schedule.releases(self.bounds, plan_schedule, self.interval, ppm)
        # the deferred hash may start: the first release has opened, or the backward pass of its iteration has
        # ended (the update waits for the commit), or everything was flushed
        self.hash_go = threading.Event()
        self._hash_by = self.releases[0][0] if self.releases else -1  # the iteration whose backward ends the wait
        self.manifest: dict | None = None
        self.flushed = False
        self.errors: list[BaseException] = []
        self.done: list[threading.Event] = []  # the copier's and the sender's job done (after start)
        self.ends: list[float] = []  # when each thread finished
        self.sent: list[tuple] = []  # (chunk, posted, sent) in seconds from the release
        self.cpu: list[float] = []  # CPU seconds of each thread (user + system)
        self.copied_at: float | None = None
        self.cores: list[int] = []  # where its threads ran

    # -- threads ---------------------------------------------------------------------------------------------------
    def start(self) -> "InFlight":
        self.done = [w.submit(partial(self._guard, fn)) for w, fn in zip(self.link.workers, (self._copy, self._send))]
        return self

    def _guard(self, fn) -> None:
        pin_thread(self.link.host_cores)  # the host's work, not the accelerator's
        self.cores = sorted(os.sched_getaffinity(0))
        c0 = time.thread_time()
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported to the training thread by wait()
            self.errors.append(e)
            self.copied.set(math.inf)
            self.enqueued.set()
            self.committed.set()
            self.hash_go.set()
        self.cpu.append(time.thread_time() - c0)
        self.ends.append(time.perf_counter())

    def _copy(self) -> None:
        link = self.link
        self.slot = link.store.slot(self.iteration, link.rank, self.size)
        out, pos = self.slot.tensor, 0
        spans = []  # (start, end, tensor index) of every tensor in the shard, walked once
        for k, v in enumerate(self.views):
            spans.append((pos, pos + v.numel(), k))
            pos += v.numel()
        if self.device is not None:
            self._copy_from_device(self._pieces(out, spans))
        else:  # copied whole before the first send (see _send): tensor by tensor, not chunk by chunk
            for s0, s1, k in spans:
                out[s0:s1].copy_(self.views[k])
            self.copied.set(self.size)
        self.copied_at = time.perf_counter()
        # the next checkpoints' memory made ready in the background (once per size: the first), after this copy
        link.store.prepare(link.rank, self.size, link.files, lock=device.slot_locker(self.device))
        if self.schedule.defer_hash:  # hashing and the store's file cost host CPU: in the first idle span
            self.hash_go.wait()
        self.manifest = {"entries": self.entries, "size": self.size, **checksum(self.slot.view()),
                         "skeleton": self.skeleton}
        if link.replicated:
            self.manifest[replicas.DIGEST] = replicas.digest(self.slot.view(), self.entries, self._shared)
        t0 = time.perf_counter()
        if link.on_commit:
            link.on_commit(self.iteration)
        self.slot.commit(self.manifest)
        link.write_s.append(time.perf_counter() - t0)
        self.committed.set()

    def _pieces(self, out: torch.Tensor, spans: list) -> list:
        """Per chunk, (destination slice, source view) for every tensor it crosses."""
        pieces, j = [], 0
        for a, b in self.bounds:
            chunk = []
            while a < b:
                while spans[j][1] <= a:
                    j += 1
                s0, s1, k = spans[j]
                end = min(b, s1)
                chunk.append((out[a:end], self.views[k][a - s0:end - s0]))
                a = end
            pieces.append(chunk)
        return pieces

    def _copy_from_device(self, pieces) -> None:
        """Queue every chunk's device-to-host copy on the side stream, then mark each chunk copied as its event
        completes (the sender waits for that). The copier thread works on the state's device: a thread starts on
        device 0, and a CUDA call there would open a context on another rank's GPU."""
        with torch.cuda.device(self.device):
            device.page_lock_slot(self.slot, self.device)
            events = device.copy_out(self.device, pieces, self.ready)
            self.last_event = events[-1] if events else None
            self.enqueued.set()
            for (_, b), ev in zip(self.bounds, events):
                ev.synchronize()
                self.copied.set(b)

    def _wait_release(self, r: int, offset, after) -> None:
        """Wait until a release opens (or :meth:`flush` opens them all)."""
        if offset == "backward":
            self.backward.wait_for(r + 1)
            return
        self.started.wait_for(r + 1)
        if self.flushed:
            return
        if after is not None:  # when this rank's own collective that opens the span has ended
            c = self.link.collectives
            with c.cond:
                c.cond.wait_for(lambda: self.flushed or c.value >= self.bases[r] + after)
        else:  # at the span's time from the iteration's start
            release = self.starts[r] + offset
            if release > time.perf_counter():
                time.sleep(release - time.perf_counter())

    def flush(self) -> None:
        """Open every release now: the checkpoint is wanted complete (training waits, or has ended)."""
        self.flushed = True
        self.hash_go.set()
        self.started.set(math.inf)
        self.backward.set(math.inf)
        with self.link.collectives.cond:
            self.link.collectives.cond.notify_all()

    def _send(self) -> None:
        link, me = self.link, self.link.rank
        group = lambda dst: link.groups.between(me, dst)
        full = [dst for dst in link.send_to if dst not in link.thin]  # the rest get this rank's own part only
        thin = [dst for dst in link.send_to if dst in link.thin]
        headers = [torch.tensor([self.iteration, self.size if dst in full else self.own_size, self.chunk],
                                dtype=torch.int64) for dst in link.send_to]
        for w in [dist.isend(h, dst, group=group(dst), tag=tag(self.seq, 0)) for h, dst in zip(headers, link.send_to)]:
            w.wait()
        if self.device is None:
            # state on the CPU: the copy first, on a core of its own, then the sends. Sending while copying makes
            # the two (and the peers' shards arriving) share the host's cores: the copy, a few times faster than
            # the link, took several times as long beside the sends, and the update waits for it (bench/results.md)
            self.copied.wait_for(self.size)

        def sent(item) -> None:  # (chunk, when posted): its sends have left
            self.sent.append((item[0], item[1] - self.release_at, time.perf_counter() - self.release_at))

        for r, offset, idx, after in self.releases:
            self._wait_release(r, offset, after)
            self.hash_go.set()
            if not full:  # to HSDP replicas alone: the first release lets the hash go, nothing more is released
                break
            window = Window(landed=sent)  # a chunk's sends to every peer, up to WINDOW chunks at once
            for k in idx:
                a, b = self.bounds[k]
                self.copied.wait_for(b)
                if self.errors:
                    return
                window.add(lambda: ((k, time.perf_counter()),
                                    [dist.isend(self.slot.tensor[a:b], dst, group=group(dst), tag=tag(self.seq, 1 + k))
                                     for dst in full]))
            window.drain()  # a release's chunks have all left before the next release is waited for
        self.committed.wait()
        if self.errors:
            return
        meta = json.dumps(self.manifest).encode()
        works, own_bounds = [], chunk_bounds(self.own_size, self.chunk)
        if thin:  # a few KB: after the commit, with the manifest
            own = replicas.own_part(self.slot.tensor, self.entries, self._shared)
            works += [dist.isend(own[a:b], dst, group=group(dst), tag=tag(self.seq, 1 + k))
                      for dst in thin for k, (a, b) in enumerate(own_bounds)]
        for dst in link.send_to:
            last = 1 + len(self.bounds if dst in full else own_bounds)
            works += isend_bytes(meta, dst, group(dst), (tag(self.seq, last), tag(self.seq, last + 1)))
        for w in works:
            w.wait()
        self.sent_bytes = self.size * len(full) + self.own_size * len(thin)

    # -- the training thread's view ----------------------------------------------------------------------------------
    def iteration_started(self, t: float) -> None:
        self.bases.append(self.link.collectives.value)
        self.starts.append(t)
        self.started.set(len(self.starts))

    def backward_ended(self) -> None:
        self.backward.add(1)
        if self.backward.value > self._hash_by:
            self.hash_go.set()

    def wait_copied(self) -> None:
        """Before an update that overwrites the state: on the CPU, until the copy is in the store; on CUDA, the
        training stream waits on the last copy's event (the host does not block)."""
        if self.device is not None:
            self.enqueued.wait()
            self._raise()
            if self.last_event is not None and self.stream_wait is None:  # later updates are on the same stream
                self.stream_wait = device.wait_on(self.device, self.last_event)
            return
        self.copied.wait_for(self.size)
        self.committed.wait()
        self._raise()

    def wait(self) -> float:
        """Wait until every send and receive is done; return when the last of them finished (perf_counter)."""
        for d in self.done:
            d.wait()
        for r in self.link.receivers:
            r.stored.wait_for(self.seq + 1)
        self._raise()
        return max(self.ends + [r.done_at[self.seq] for r in self.link.receivers])

    def data_done(self) -> float:
        """When every byte was where it goes (after :meth:`wait`): this rank's copy in CPU memory and the last chunk
        from each peer that sends to us; the simulator's checkpoint completion (hashing and files come after)."""
        return max([self.copied_at or self.release_at] + [r.data_at[self.seq] for r in self.link.receivers])

    def cpu_seconds(self) -> float:
        """CPU time this checkpoint cost this rank (after :meth:`wait`): copy, hash, files, sends and receives."""
        return sum(self.cpu) + sum(r.cpu[self.seq] for r in self.link.receivers)

    def _raise(self) -> None:
        if self.errors and isinstance(self.errors[0], StoreError):  # the store's own one-line error: as it is
            raise StoreError(f"checkpoint {self.iteration} on rank {self.link.rank}: {self.errors[0]}") from None
        if self.errors:
            raise RuntimeError(f"checkpoint {self.iteration} failed on rank {self.link.rank}: "
                               f"{self.errors[0]}") from self.errors[0]
        for r in self.link.receivers:
            if r.errors:
                raise RuntimeError(f"receiving checkpoint {self.iteration} from rank {r.src} failed on rank "
                                   f"{self.link.rank}: {r.errors[0]}") from r.errors[0]
