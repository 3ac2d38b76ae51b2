"""Record this rank's iteration timeline and write it in gemini-sim's profile format (version 1).

Every collective that training issues goes through ``torch.distributed`` (FSDP2 calls ``all_gather_single`` and
``reduce_scatter_single``); :func:`Recorder.install` wraps those entry points (and ``all_reduce``) so that each call
on the training thread is timed from start to end, with the size of its result (all-gather), its input
(reduce-scatter) or its tensor (all-reduce). The wrapped call always completes before it returns (an ``async_op``
request is served synchronously), so a collective's span on the timeline is its real duration on this rank. The
recorder also counts the collectives that have ended, for ever: the ``gemini`` schedule anchors its spans to them.
Between collectives the rank computes: those gaps become compute ops named after the phase they fall in
(``forward``, ``backward``, ``optimizer``).

The profile holds the first ``iterations`` iterations of the run (20 by default); iteration times are seconds from
the iteration's start. Format: see ``gemini_sim/workload.py``.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from pathlib import Path

import torch.distributed as dist

from .traffic import Progress

WRAPPED = {"all_gather_single": "all_gather", "reduce_scatter_single": "reduce_scatter",
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
    def __init__(self, iterations: int = 20):
        self.limit = iterations
        self.thread = threading.get_ident()
        self.iterations: list[dict] = []
        self._cur: dict | None = None
        self._phase = "forward"
        self._mark = 0.0  # end of the last recorded op (perf_counter)
        self._t0 = 0.0
        self.collectives = Progress()  # training collectives completed so far (all iterations)

    # -- wrapping ----------------------------------------------------------------------------------------------
    def install(self) -> None:
        for attr, kind in WRAPPED.items():
            original = getattr(dist, attr)
            if getattr(original, "_gemini_wrapped", False):
                continue
            setattr(dist, attr, self._wrap(original, kind))

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
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.profile(machines, ppm, source)))
        tmp.replace(path)
