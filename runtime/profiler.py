"""Record this rank's iteration timeline and write it in gemini-sim's profile format (version 1).

How collectives are seen. FSDP2 lets its user supply the all-gather and the reduce-scatter it runs
(``FSDPModule.set_custom_all_gather`` / ``set_custom_reduce_scatter``, public since torch 2.9): :meth:`Recorder.install`
gives every FSDP module of the model a timed pair (:class:`_TimedAllGather`, :class:`_TimedReduceScatter`) that runs
the same collective through the public ``torch.distributed`` API. While the recorder serves (profiling, or a
``gemini`` schedule anchoring its spans to collectives), each call of the profiling window completes before it
returns (an ``async_op`` request is served synchronously; on CUDA the collective's stream is synchronized), so its
span on the timeline is its real duration on this rank, and the recorder counts the collectives that have ended, for
ever: the ``gemini`` schedule anchors its spans to them. After the window a CUDA collective is only counted, and the
host does not wait for it (that would take away FSDP's overlap of communication with compute for the whole run): it
runs as FSDP asked, and a thread of the recorder's counts it once a CUDA event after it has completed (NCCL, and
any synchronous call) or once its work's future has (gloo's asynchronous calls, whose futures complete when the
transfer does). Otherwise the pair passes the call through unchanged, asynchronous if asked.

On a torch without these hooks (2.6 to 2.8), or a model with no FSDP2 module, the recorder falls back to wrapping
the ``torch.distributed`` entry points FSDP calls (``all_gather_into_tensor``/``reduce_scatter_tensor``, or the
``_single`` forms of later versions, and ``all_reduce``) while it serves, and puts them back after;
:attr:`Recorder.mechanism` says which is in use. Each recorded call has the size of its result (all-gather), its
input (reduce-scatter) or its tensor (all-reduce). Between collectives the rank computes: those gaps become compute
ops named after the phase they fall in (``forward``, ``backward``, ``optimizer``).

The profile holds the first ``iterations`` iterations of the run (20 by default); iteration times are seconds from
the iteration's start. Format: see ``gemini_sim/cluster/workload.py``.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import socket
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .state import checksum
from .files import write_atomic
from .transport import Progress, both_ways, pin_thread

WRAPPED = {"all_gather_single": "all_gather", "all_gather_into_tensor": "all_gather",
           "reduce_scatter_single": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
           "all_reduce": "all_reduce"}


def _arg(args, kwargs, index: int, *names):
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return args[index] if len(args) > index else None


def _tensor_of(kind: str, args, kwargs) -> torch.Tensor:
    """The tensor whose size a collective is recorded with: the result of an all-gather, the input of a
    reduce-scatter, the tensor of an all-reduce."""
    if kind == "all_reduce":
        t = _arg(args, kwargs, 0, "tensor")
    elif kind == "all_gather":
        t = _arg(args, kwargs, 0, "output", "output_tensor")  # the gathered result
    else:
        t = _arg(args, kwargs, 1, "input", "input_tensor")  # what is reduced and scattered
    if t is None:
        raise TypeError(f"cannot find the tensor of a {kind} call (torch.distributed changed its signature?)")
    return t


class _Comm:
    """FSDP2's comm protocol (``allocate`` and ``__call__``), run through the public torch.distributed API."""

    def __init__(self, rec: "Recorder"):
        self.rec = rec

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(size, dtype=dtype, device=device)


class _TimedAllGather(_Comm):
    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        run = functools.partial(dist.all_gather_into_tensor, output_tensor, input_tensor, group=group)
        return self.rec.collective("all_gather", output_tensor, run, async_op, group)


class _TimedReduceScatter(_Comm):
    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        run = functools.partial(dist.reduce_scatter_tensor, output_tensor, input_tensor, op=op, group=group)
        return self.rec.collective("reduce_scatter", input_tensor, run, async_op, group)


class Recorder:
    def __init__(self, iterations: int = 20, collectives: Progress | None = None):
        self.limit = iterations
        self.thread = threading.get_ident()
        self.iterations: list[dict] = []
        self._cur: dict | None = None
        self._phase = "forward"
        self._mark = 0.0  # end of the last recorded op (perf_counter)
        self._t0 = 0.0
        self.collectives = collectives or Progress()  # training collectives completed so far (all iterations)
        self.serving = False  # collectives are timed and counted
        self.mechanism = "none"  # "fsdp2-comm" (supported hooks) or "wrapped" (fallback), once installed
        self._originals: dict = {}
        self._ends = None  # queue of the CUDA events after collectives counted without waiting (see _count_later)
        self._streams: dict = {}  # device -> the stream that waits for asynchronous NCCL collectives

    # -- seeing collectives ------------------------------------------------------------------------------------
    def install(self, model: torch.nn.Module | None = None) -> None:
        """Time and count training collectives from now on (see the module docstring)."""
        if self.mechanism == "none" and model is not None:
            modules = [m for m in model.modules() if callable(getattr(m, "set_custom_all_gather", None))]
            try:
                for m in modules:
                    m.set_custom_all_gather(_TimedAllGather(self))
                    m.set_custom_reduce_scatter(_TimedReduceScatter(self))
            except (ValueError, RuntimeError):  # e.g. several parameter groups per module: not supported there
                modules = []
            self.mechanism = "fsdp2-comm" if modules else "wrapped"
        elif self.mechanism == "none":
            self.mechanism = "wrapped"
        if self.mechanism == "wrapped":
            self._wrap_all()
        self.serving = True

    def uninstall(self) -> None:
        """Stop timing: the FSDP comms pass calls through; wrapped functions are put back."""
        self.serving = False
        if self._ends is not None:
            self._ends.put(None)  # the counting thread ends once it has counted what was queued
            self._ends = None
        for attr, original in self._originals.items():
            setattr(dist, attr, original)
        self._originals = {}

    def collective(self, kind: str, tensor: torch.Tensor, run, async_op: bool = False, group=None):
        """Run one of FSDP's collectives: timed and counted while serving, else passed through."""
        if not self.serving or threading.get_ident() != self.thread:
            return run(async_op=async_op)
        if tensor.is_cuda and not self.recording():  # only counted: the host does not wait for it
            work = run(async_op=async_op)
            self._count_later(tensor.device, work, group)
            return work
        t = time.perf_counter()
        if self.recording():
            self.compute_until(t)
        run()
        if tensor.is_cuda:  # the collective ran on the current stream: wait for it to finish
            torch.cuda.current_stream(tensor.device).synchronize()
        if self.recording():
            self._add("collective", kind, t, time.perf_counter(), int(tensor.numel() * tensor.element_size()))
        self.collectives.add()  # checkpoint sends anchored to collective ends wait on it
        return None  # served synchronously: FSDP treats a None work as complete

    def _count_later(self, device: torch.device, work, group) -> None:
        """Count a CUDA collective once it has ended, without the host waiting for it. A synchronous call ended on
        the current stream (a CUDA event recorded there after it); an asynchronous NCCL call is waited for by a
        stream of the recorder's own, which records the event; a gloo call's future completes when it has."""
        if work is not None and "nccl" not in str(dist.get_backend(group)):
            work.get_future().add_done_callback(lambda _: self.collectives.add())
            return
        stream = torch.cuda.current_stream(device)
        if work is not None:
            stream = self._streams.setdefault(device, torch.cuda.Stream(device))
            with torch.cuda.stream(stream):
                work.wait()  # on NCCL, this stream waits on the device; the host does not
        if self._ends is None:
            self._ends = queue.SimpleQueue()
            threading.Thread(target=self._count_ends, args=(self._ends, device), daemon=True,
                             name="gemini-collectives").start()
        self._ends.put(stream.record_event())

    def _count_ends(self, ends, device: torch.device) -> None:
        with torch.cuda.device(device):  # not device 0, where a new thread's CUDA calls go (another rank's GPU)
            while (event := ends.get()) is not None:
                event.synchronize()
                self.collectives.add()

    def _wrap_all(self) -> None:
        for attr, kind in WRAPPED.items():
            original = getattr(dist, attr, None)
            if original is None or getattr(original, "_gemini_wrapped", False):
                continue
            self._originals[attr] = original
            setattr(dist, attr, self._wrap(original, kind))

    def _wrap(self, original, kind: str):
        rec = self

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            async_op = kwargs.pop("async_op", False)
            return rec.collective(kind, _tensor_of(kind, args, kwargs),
                                  lambda async_op=False: original(*args, async_op=async_op, **kwargs), async_op,
                                  kwargs.get("group"))

        wrapper._gemini_wrapped = True
        return wrapper

    # -- the timeline ------------------------------------------------------------------------------------------
    def recording(self) -> bool:
        return self._cur is not None and threading.get_ident() == self.thread

    def begin(self, iteration: int) -> None:
        if len(self.iterations) >= self.limit:
            self._cur = None
            return
        self._t0 = self._mark = time.perf_counter()
        self._phase = "forward"
        self._cur = {"iteration": iteration, "start_s": 0.0, "ops": []}

    def phase(self, name: str) -> None:
        """Close the compute span of the current phase and start another."""
        if self._cur is not None:
            self.compute_until(time.perf_counter())
            self._phase = name

    def skip_until(self, t: float) -> None:
        """Time up to ``t`` is not training work (a wait on checkpoint traffic): left out of the compute spans."""
        if self._cur is not None:
            self._mark = max(self._mark, t)

    def compute_until(self, t: float) -> None:
        if t - self._mark > 1e-6:
            self._add("compute", self._phase, self._mark, t)
        self._mark = max(self._mark, t)

    def _add(self, kind: str, name: str, a: float, b: float, nbytes: int | None = None) -> None:
        op = {"kind": kind, "name": name, "start_s": round(a - self._t0, 7), "end_s": round(b - self._t0, 7)}
        if nbytes is not None:
            op["bytes"] = nbytes
        self._cur["ops"].append(op)
        self._mark = max(self._mark, b)

    def end(self) -> bool:
        """Close the iteration; True when the profiling window just completed."""
        if self._cur is None:
            return False
        self.compute_until(time.perf_counter())
        self._cur["end_s"] = round(self._mark - self._t0, 7)
        self.iterations.append(self._cur)
        self._cur = None
        return len(self.iterations) == self.limit

    def profile(self, machines: int, ppm: int, source: str) -> dict:
        return {"format": "gemini-sim-profile", "version": 1, "machines": machines, "processes_per_machine": ppm,
                "source": source, "iterations": self.iterations}

    def write(self, path: Path, machines: int, ppm: int, source: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(self.profile(machines, ppm, source), allow_nan=False))


def device_rates(device: torch.device, nbytes: int = 256 << 20, reps: int = 5) -> dict:
    """The GPU half of the probe (rank 0, CUDA only): GPU -> page-locked CPU memory and back, in bytes/s (the best of
    ``reps`` copies of ``nbytes``), and by how much a bf16 matrix-multiply loop slows while a GPU -> CPU copy runs
    beside it on the checkpoint's side stream (the median of ``reps`` paired runs, timed with CUDA events on the
    compute stream; 0 when it does not slow). ../shared/GPU.md measured 54.8 / 51.6 GB/s and 1.5% on an H100."""
    from .device import side_stream, staging

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    host = staging(nbytes, pinned=True)  # ordinary memory where pinning is refused: the rates checkpoints get then

    def best(run) -> float:
        out = float("inf")
        for _ in range(reps):
            torch.cuda.synchronize(device)
            t = time.perf_counter()
            run()
            torch.cuda.synchronize(device)
            out = min(out, time.perf_counter() - t)
        return out

    d2h = nbytes / best(lambda: host.copy_(src, non_blocking=True))
    h2d = nbytes / best(lambda: src.copy_(host, non_blocking=True))
    a = torch.randn(4096, 4096, dtype=torch.bfloat16, device=device)

    def gemms(copies: int = 0) -> float:  # seconds of 50 matmuls on the current stream, beside ``copies`` copies
        torch.cuda.synchronize(device)
        if copies:
            with torch.cuda.stream(side_stream(device)):
                for _ in range(copies):
                    host.copy_(src, non_blocking=True)
        start = torch.cuda.current_stream(device).record_event(torch.cuda.Event(enable_timing=True))
        for _ in range(50):
            a @ a
        end = torch.cuda.current_stream(device).record_event(torch.cuda.Event(enable_timing=True))
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3

    gemms()  # warm-up: cuBLAS picks its kernel
    alone = gemms()
    copies = int(alone * 1.5 * d2h / nbytes) + 1  # enough copies to last longer than the matmuls
    ratios = sorted(gemms(copies) / gemms() for _ in range(reps))
    return {"device": torch.cuda.get_device_name(device), "d2h_bytes_per_s": d2h, "h2d_bytes_per_s": h2d,
            "copy_compute_slowdown": min(0.99, max(0.0, ratios[len(ratios) // 2] - 1))}


def cpu_ticks(stat: str = "/proc/stat") -> list[int] | None:
    """The host's CPU time since boot, all CPUs together, in clock ticks by kind, from the ``cpu`` line of
    ``/proc/stat``: user, nice, system, idle, iowait, irq, softirq, steal (and more on newer kernels); None where it
    cannot be read."""
    try:
        with open(stat) as f:
            fields = f.readline().split()
        ticks = [int(v) for v in fields[1:]]
    except (OSError, ValueError):
        return None
    return ticks if fields and fields[0] == "cpu" and len(ticks) >= 8 else None


def host_busy_s() -> float | None:
    """Seconds the host's CPUs have been busy since boot, all of them together, by ``/proc/stat`` (user, nice,
    system, irq and softirq time; a guest's time is in user, a hypervisor's steal is not the host's work); None
    where there is no ``/proc/stat``. Its resolution is the kernel's clock tick (10 ms), per CPU."""
    ticks = cpu_ticks()
    if ticks is None:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = ticks[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _transfer_cpu(ckpt, other: int | None, rate: float | None, seconds: float = 3.0) -> dict | None:
    """What a byte of checkpoint traffic costs the hosts' CPUs (collective). Ranks 0 and ``other`` send each other
    about ``seconds`` of data at once (at the measured ``rate``; 16 MiB to 1 GiB each way), as every machine sends
    and receives during a checkpoint, the way the runtime moves it (:func:`~runtime.transport.both_ways`, the
    plan's chunk size); each reads its process CPU time and its host's busy CPU (:func:`host_busy_s`, less the rate at
    which that host was busy while nothing moved, for as long just before) around it. The seconds are many because
    busy time comes in clock ticks. Returns CPU seconds per byte moved (one byte from one machine to another):
    ``transfer``, the two processes' (sender's and receiver's, gloo's threads included), and ``kernel``, the hosts'
    extra busy time less the processes' (each host once: both ends on one host here, one per host on a cluster): the
    kernel's work on sockets, TCP, virtual links and traffic shaping, which no process is charged for (absent
    without ``/proc/stat``; never negative). None without a second machine."""
    chunk = min(8 << 20, max(64 << 10, int(ckpt.plan.schedule.get("chunk_bytes", 1 << 20))))
    size = [min(1 << 30, max(16 << 20, int(seconds * rate))) if rate else 0]
    dist.broadcast_object_list(size, src=0, group=ckpt.groups.control)  # rank 0 measured the rate: it decides
    if other is None or not size[0]:
        return None
    peer = {0: other, other: 0}.get(ckpt.rank)
    if peer is not None:
        b0, t0 = host_busy_s(), time.perf_counter()
        time.sleep(max(0.2, size[0] / rate))  # both ends measured the rate (each received)
        quiet = None if b0 is None else (host_busy_s() - b0) / (time.perf_counter() - t0)  # busy s per s, idle
    dist.barrier(group=ckpt.groups.control)
    mine = None
    if peer is not None:
        n = min(size[0], 64 << 20)  # the buffers each end cycles through
        out, into = torch.ones(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
        b0, t0, c0 = host_busy_s(), time.perf_counter(), time.process_time()
        both_ways(out, into, peer, ckpt.groups.between(ckpt.rank, peer), ckpt.groups.between(peer, ckpt.rank), chunk,
                  size[0])
    dist.barrier(group=ckpt.groups.control)  # both ends' windows hold both transfers
    if peer is not None:
        cpu, dt = time.process_time() - c0, time.perf_counter() - t0
        mine = (socket.gethostname(), None if quiet is None else host_busy_s() - b0 - quiet * dt, cpu)
    seen = [None] * ckpt.world
    dist.all_gather_object(seen, mine, group=ckpt.groups.control)
    seen = [s for s in seen if s]
    moved = 2 * size[0]
    per = {"transfer": sum(s[2] for s in seen) / moved}
    if all(s[1] is not None for s in seen):
        hosts: dict = {}
        for host, extra, _ in seen:  # both ends on one host read the same CPUs: count them once
            hosts.setdefault(host, []).append(extra)
        busy = sum(sum(v) / len(v) for v in hosts.values())
        per["kernel"] = max(0.0, busy - sum(s[2] for s in seen)) / moved
    return per


def _checkpoint_cpu(ckpt, repeats: int = 3) -> dict | None:
    """What one whole checkpoint of the current state costs a rank's process in CPU seconds (collective): every
    rank takes checkpoints the runtime's way (its store, the plan's peers and chunks, its receivers, gloo's threads)
    with nothing else running, all sent at once as ``naive`` sends them; after ``keep + 1`` to warm up (the store's
    files made), ``repeats`` are timed with the process's CPU clock, all its threads together: copy, hash, commit,
    sends, receives and the runtime's own bookkeeping, which a cost per byte sent alone leaves out. The mean over
    the ranks, with the shard's bytes and the copies each rank sent. Left where they were not made: None where a
    store already holds a checkpoint (the probe's must not mix with a job's) or no rank sends a copy. The store
    keeps none of them."""
    from .schedules import get

    busy = torch.tensor([len(ckpt.store.iterations()) + (ckpt._inflight is not None) + (ckpt._pending is not None)])
    dist.all_reduce(busy, group=ckpt.groups.control)
    copies = torch.tensor([len(ckpt.send_to)])
    dist.all_reduce(copies, op=dist.ReduceOp.MAX, group=ckpt.groups.control)
    if int(busy.item()) or not int(copies.item()):
        return None
    naive = dict(ckpt.plan.schedule, name="naive")
    warm, cpu = ckpt.plan.keep + 1, 0.0
    for k in range(warm + repeats):
        state = ckpt.capture()
        dist.barrier(group=ckpt.groups.control)
        c0 = time.process_time()
        flight = ckpt._start(k + 1, time.perf_counter(), k + 1, state=state, schedule=(get("naive"), naive, 1))
        ckpt._inflight = None  # waited for here: not one of the job's checkpoints, not in its records
        flight.flush()
        flight.wait()
        ckpt.store.keep_newest(ckpt.plan.keep, ranks=ckpt.held_ranks)
        dist.barrier(group=ckpt.groups.control)  # both ends' threads are done with it
        if k >= warm:
            cpu += time.process_time() - c0
    ckpt.store.drop_after(-1, ckpt.held_ranks)
    mine = torch.tensor([cpu / repeats, flight.size, len(ckpt.send_to)], dtype=torch.float64)
    dist.all_reduce(mine, group=ckpt.groups.control)
    per, shard, sent = (float(x) / ckpt.world for x in mine)
    return {"cpu_s": per, "shard_bytes": round(shard), "copies": sent}


def probe(ckpt, path: Path | None = None, compute_cores=None) -> dict | None:
    """Measure what the simulator needs to know about this set-up (collective: every rank calls it): the network's
    point-to-point bandwidth between machine 0 and machine 1 (rank 0 and its counterpart, each direction, over the
    runtime's own groups), and the rate at which rank 0 copies memory on the checkpoint's cores (the stand-in for the
    GPU-to-CPU copy when training on CPU). It also measures what a checkpoint costs the host: CPU seconds per byte
    copied and checksummed (runtime/state.py's checksum), sent, received and spent by the kernel on the way
    (:func:`_transfer_cpu`), what a whole checkpoint costs a rank's process (:func:`_checkpoint_cpu`: call the
    probe once the optimizer has its state), and whether the checkpoint's threads share cores with training's
    (``compute_cores``: the cores of training's own thread; None: not pinned, so shared). On a GPU it adds :func:`device_rates` and how
    many of the job's ranks share rank 0's GPU (``ranks_per_device``: the copies of ranks sharing a GPU share its
    PCIe link). Rank 0 writes ``probe.json`` (``path``, default in the Checkpointer's out_dir) and returns it; the
    others return None."""
    nbytes, reps = 8 << 20, 3
    rates = []
    other = ckpt.ppm if ckpt.world > ckpt.ppm else None
    for src, dst in ((0, other), (other, 0)) if other is not None else ():
        for _ in range(reps):
            dist.barrier(group=ckpt.groups.control)
            t = time.perf_counter()
            g = ckpt.groups.between(src, dst)
            if ckpt.rank == src:
                dist.send(torch.ones(nbytes, dtype=torch.uint8), dst, group=g)
            elif ckpt.rank == dst:
                dist.recv(torch.empty(nbytes, dtype=torch.uint8), src, group=g)
                rates.append(nbytes / (time.perf_counter() - t))
    rate = sorted(rates)[len(rates) // 2] if rates else None  # this rank's, where it received
    transfer = _transfer_cpu(ckpt, other, rate)
    whole = _checkpoint_cpu(ckpt)
    device = next(ckpt.model.parameters()).device
    sharing = None
    if device.type == "cuda":
        where = [None] * ckpt.world
        dist.all_gather_object(where, (socket.gethostname(), device.index if device.index is not None
                                          else torch.cuda.current_device()), group=ckpt.groups.control)
        sharing = where.count(where[0])
    result = None
    if ckpt.rank == 0 and rates:
        before = os.sched_getaffinity(0)
        pin_thread(ckpt.host_cores)  # alone, where the checkpoint's copier thread runs
        a = torch.ones(64 << 20, dtype=torch.uint8)
        b = torch.empty_like(a)
        best = copy_cpu = hash_cpu = float("inf")
        for _ in range(5):
            t, c = time.perf_counter(), time.process_time()
            b.copy_(a)
            best, copy_cpu = min(best, time.perf_counter() - t), min(copy_cpu, time.process_time() - c)
            c = time.process_time()
            checksum(memoryview(b.numpy()))
            hash_cpu = min(hash_cpu, time.process_time() - c)
        os.sched_setaffinity(0, before)
        shared = ckpt.host_cores is None or not compute_cores or bool(set(ckpt.host_cores) & set(compute_cores))
        result = {"format": "gemini-sim-probe", "version": 1,  # gemini_sim/schema/probe-v1.schema.json
                  "network_bytes_per_s": rate, "network_samples": rates,
                  "copy_bytes_per_s": a.numel() / best, "probe_bytes": nbytes,
                  "host_cpu_s_per_byte": {"copy": copy_cpu / a.numel(), "hash": hash_cpu / a.numel(), **transfer},
                  "checkpoint_shares_training_cores": shared}
        if whole:
            result["checkpoint_cpu"] = whole
        if sharing:
            result.update(device_rates(device), ranks_per_device=sharing)
        path = Path(path) if path else (ckpt.out_dir / "probe.json" if ckpt.out_dir else None)
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(result, allow_nan=False))
    dist.barrier(group=ckpt.groups.control)
    return result
