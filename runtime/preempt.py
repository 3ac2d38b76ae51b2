"""Preemption: on SIGTERM or SIGINT, the newest checkpoint complete in memory is written durably, within a grace
period the user sets, before the handler that was there before runs.

``Checkpointer(..., preempt_grace_s=60)`` (or ``GEMINI_PREEMPT_GRACE_S``) installs a handler for both signals. A
scheduler that preempts a job sends its processes SIGTERM (torchrun passes it on to its workers) and kills them a
grace period later; what the job holds in memory would die with the machines. The handler, on the training thread:

1. stops the Checkpointer from starting checkpoints (the one in flight completes), and
2. starts a thread that does the rest, so that the training thread goes on and the other ranks, which may be
   waiting for it in a collective, can take the signal too (a handler that ran collectives itself could wait for
   ever on a rank stuck in the training's own all-gather);
3. that thread agrees with every rank, over a gloo group of its own, on the newest iteration whose shard every rank
   holds committed in its machine's store, copies this rank's shard of it out of the store and checks it, and
   writes it as a durable checkpoint (runtime/recovery.py's format: DCP for the DTensor pieces, made DTensors again
   with the live layout, and the rank's own file for the rest), unless that iteration is durable already;
4. then sends the signal again, to the handlers that were there before (put back when it came), so that they run
   (by default: SIGTERM ends the process, SIGINT raises KeyboardInterrupt).

If the writing is not done within the grace period (a rank died, a collective timed out, storage is slow), the
signal goes on all the same and the job exits with what durable storage holds. A second signal goes to the handlers
before at once (a second Ctrl-C stops waiting). The flush is opt-in: torchrun itself sends SIGTERM to the other workers when one fails, and a flush
then only finds that a rank is gone (gloo says so at once).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.tensor import DTensor

from . import recovery
from .sources import dcp_key
from .state import unpack, verify

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """The handler of one Checkpointer (see the module's docstring). Made collectively, with the Checkpointer."""

    def __init__(self, ckpt, grace_s: float):
        self.ckpt, self.grace_s = ckpt, grace_s
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=grace_s))
        self.previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
        self.thread: threading.Thread | None = None
        self.done = threading.Event()
        self.written: int | None = None  # the iteration the flush wrote (or found durable), once it has
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.uninstall()  # (only the training thread may set handlers) a second signal goes to those before at once
        self.ckpt._stop_checkpoints()
        self.thread = threading.Thread(target=self._run, args=(signum,), daemon=True, name="gemini-preempt")
        self.thread.start()

    def _run(self, signum: int) -> None:
        name = signal.Signals(signum).name
        timer = threading.Timer(self.grace_s, self._give_up, args=(signum, name))
        timer.daemon = True
        timer.start()
        t0 = time.perf_counter()
        try:
            self.written = self.flush()
            if self.ckpt.rank == 0:
                where = recovery.step_dir(self.ckpt.durable, self.written) if self.written else None
                print(f"gemini: job {self.ckpt.job}: {name}: " + (
                    f"iteration {self.written} is durable in {where} ({time.perf_counter() - t0:.2f} s)"
                    if self.written else "no iteration complete in memory to write"), file=sys.stderr, flush=True)
            self.ckpt.event("preempted", signal=name, iteration=self.written,
                            seconds=round(time.perf_counter() - t0, 4))
        except Exception as e:  # noqa: BLE001 - the signal must go on whatever went wrong
            print(f"gemini: job {self.ckpt.job}: {name}: the newest checkpoint in memory was not written durably "
                  f"on rank {self.ckpt.rank}: {e}", file=sys.stderr, flush=True)
        finally:
            timer.cancel()
            self._pass_on(signum)

    def _give_up(self, signum: int, name: str) -> None:
        print(f"gemini: job {self.ckpt.job}: {name}: the durable write did not finish within {self.grace_s:g} s "
              f"(rank {self.ckpt.rank}); going on with the signal", file=sys.stderr, flush=True)
        self._pass_on(signum)

    def _pass_on(self, signum: int) -> None:
        """Once: the signal again, for the handlers that were there before (put back when it came)."""
        if self.done.is_set():
            return
        self.done.set()
        os.kill(os.getpid(), signum)

    def flush(self) -> int | None:
        """Write the newest iteration every rank holds in memory durably (collective over this handler's group);
        return it (None: there is none)."""
        ckpt = self.ckpt
        mine = sorted(it for it, r in ckpt.store.inventory() if r == ckpt.rank)
        everyone = [None] * ckpt.world
        dist.all_gather_object(everyone, mine, group=self.group)
        common = set(everyone[0]).intersection(*everyone[1:])
        if not common:
            return None
        target = max(common)
        if target in recovery.durable_iterations(ckpt.durable):
            return target
        got = ckpt.store.get(target, ckpt.rank, check=False)
        data, manifest = (bytearray(got[0]), got[1]) if got else (bytearray(), {})
        ok = bool(got) and verify(data, manifest)  # copied first: the store may reuse that file meanwhile
        flags = [None] * ckpt.world
        dist.all_gather_object(flags, ok, group=self.group)
        if not all(flags):
            raise RuntimeError(f"a copy of iteration {target} could not be read intact (ranks "
                               f"{[r for r, f in enumerate(flags) if not f]})")
        tensors = unpack(data, manifest, own=True)
        layouts = ckpt._capture.layouts
        sharded, own = {}, {}
        for k, t in tensors.items():
            if k in layouts:
                mesh, placements, shape, stride = layouts[k]
                sharded[dcp_key(k)] = DTensor.from_local(t, mesh, placements, run_check=False, shape=shape,
                                                         stride=stride)
            else:
                own[k] = t
        recovery.save_durable(recovery.step_dir(ckpt.durable, target), sharded, own, manifest["skeleton"],
                              ckpt.rank, self.group)
        return target

    def wait(self) -> None:
        """Until a flush under way has ended (at most the grace period)."""
        if self.thread is not None:
            self.thread.join(self.grace_s + 5)

    def uninstall(self) -> None:
        """Put the handlers that were there before back (a signal came, or the Checkpointer closes); on the
        training thread."""
        for sig, handler in self.previous.items():
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, handler)
