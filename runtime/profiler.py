"""Record this rank's iteration timeline and write it in gemini-sim's profile format (version 1).

Every collective that training issues goes through ``torch.distributed`` (FSDP2 calls ``all_gather_into_tensor``
and ``reduce_scatter_tensor`` up to torch 2.11, ``all_gather_single`` and ``reduce_scatter_single`` later);
:func:`Recorder.install` wraps whichever of those entry points this torch has (and ``all_reduce``), while profiling
or while a ``gemini`` schedule anchors its spans to collectives, and :func:`Recorder.uninstall` puts them back.
Each call on the training thread is timed from start to end, with the size of its result (all-gather), its input
(reduce-scatter) or its tensor (all-reduce). The wrapped call always completes before it returns (an ``async_op``
request is served synchronously), so a collective's span on the timeline is its real duration on this rank. The
recorder also counts the collectives that have ended, for ever: the ``gemini`` schedule anchors its spans to them.
Between collectives the rank computes: those gaps become compute ops named after the phase they fall in
(``forward``, ``backward``, ``optimizer``).

The profile holds the first ``iterations`` iterations of the run (20 by default); iteration times are seconds from
the iteration's start. Format: see ``gemini_sim/cluster/workload.py``.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .store import write_atomic
from .transport import Progress, pin_thread

WRAPPED = {"all_gather_single": "all_gather", "all_gather_into_tensor": "all_gather",
           "reduce_scatter_single": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
           "all_reduce": "all_reduce"}


def _arg(args, kwargs, index: int, *names):
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return args[index] if len(args) > index else None


def _nbytes(kind: str, args, kwargs) -> int:
    if kind == "all_reduce":
        t = _arg(args, kwargs, 0, "tensor")
    elif kind == "all_gather":
        t = _arg(args, kwargs, 0, "output", "output_tensor")  # the gathered result
    else:
        t = _arg(args, kwargs, 1, "input", "input_tensor")  # what is reduced and scattered
    if t is None:
        raise TypeError(f"cannot find the tensor of a {kind} call (torch.distributed changed its signature?)")
    return int(t.numel() * t.element_size())


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

    # -- wrapping ----------------------------------------------------------------------------------------------
    def install(self) -> None:
        self._originals = getattr(self, "_originals", {})
        for attr, kind in WRAPPED.items():
            original = getattr(dist, attr, None)
            if original is None or getattr(original, "_gemini_wrapped", False):
                continue
            self._originals[attr] = original
            setattr(dist, attr, self._wrap(original, kind))

    def uninstall(self) -> None:
        for attr, original in getattr(self, "_originals", {}).items():
            setattr(dist, attr, original)
        self._originals = {}

    def _wrap(self, original, kind: str):
        rec = self

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            if threading.get_ident() != rec.thread:
                return original(*args, **kwargs)
            kwargs.pop("async_op", None)
            t = time.perf_counter()
            if rec.recording():
                rec.compute_until(t)
            original(*args, **kwargs)
            if rec.recording():
                rec._add("collective", kind, t, time.perf_counter(), _nbytes(kind, args, kwargs))
            rec.collectives.set(rec.collectives.value + 1)  # checkpoint sends anchored to collective ends wait on it
            return None  # served synchronously: FSDP treats a None work as complete

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
        write_atomic(path, json.dumps(self.profile(machines, ppm, source)))


def probe(ckpt, path: Path | None = None) -> dict | None:
    """Measure what the simulator needs to know about this set-up (collective: every rank calls it): the network's
    point-to-point bandwidth between machine 0 and machine 1 (rank 0 and its counterpart, each direction, over the
    runtime's own groups), and the rate at which rank 0 copies memory on the checkpoint's cores (the stand-in for the
    GPU-to-CPU copy when training on CPU). Rank 0 writes ``probe.json`` (``path``, default in the Checkpointer's
    out_dir) and returns it; the others return None."""
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
    result = None
    if ckpt.rank == 0 and rates:
        before = os.sched_getaffinity(0)
        pin_thread(ckpt.host_cores)  # alone, where the checkpoint's copier thread runs
        a = torch.ones(64 << 20, dtype=torch.uint8)
        b = torch.empty_like(a)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            b.copy_(a)
            best = min(best, time.perf_counter() - t)
        os.sched_setaffinity(0, before)
        result = {"format": "gemini-sim-probe", "version": 1,  # gemini_sim/schema/probe-v1.schema.json
                  "network_bytes_per_s": sorted(rates)[len(rates) // 2], "network_samples": rates,
                  "copy_bytes_per_s": a.numel() / best, "probe_bytes": nbytes}
        path = Path(path) if path else (ckpt.out_dir / "probe.json" if ckpt.out_dir else None)
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(result))
    dist.barrier(group=ckpt.groups.control)
    return result
