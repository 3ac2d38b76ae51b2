"""The public API: :class:`Checkpointer`, which a user's own FSDP2 training loop calls to run a Plan.

::

    ckpt = Checkpointer(plan, model, optimizer, extra={"sched": lr_scheduler, "data": loader_state})
    start = ckpt.recover()                    # required: 0 on a fresh start, else the iteration it resumed from
    for it in range(start + 1, iters + 1):
        loss = loss_fn(model(x), y)
        loss.backward()
        ckpt.after_backward()                 # before the optimizer step: the update waits for the copy out
        optimizer.step(); optimizer.zero_grad()
        ckpt.after_step(it)                   # the plan's checkpoint of this iteration, and persistence
    ckpt.close()

What it does (the modules beside it hold each concern):

- **State** (runtime/state.py): ``get_state_dict(model, optimizer)`` plus every ``extra`` object's ``state_dict()``
  (anything with ``state_dict``/``load_state_dict``: an LR scheduler, a data loader's position, RNG states), any
  optimizer, flattened into tensors and a JSON skeleton (taken by runtime/capture.py: ``get_state_dict`` once, then
  a checked recipe). Parameters and optimizer state change only at the update,
  so they are copied out while the next iteration trains; everything else (buffers, extra state) is copied at
  :meth:`after_step`.
- **Store** (runtime/store.py): every checkpoint goes to this machine's CPU memory (``/dev/shm``), which outlives
  a crashed process, and to the peers the plan's placement names (runtime/transport.py), with the traffic released
  as the plan's schedule says (runtime/schedules.py, runtime/pipeline.py).
- **Durable** (runtime/recovery.py): every ``persist_interval_iters`` a standard DCP checkpoint.
- **Recovery** (:meth:`recover`): the newest iteration complete in memory or on durable storage, from this
  machine's memory, a peer's, or DCP; rank 0 prints one line saying where from.
- **The job** (runtime/job.py): its name decides what a launch resumes; :meth:`close` finishes it (final state
  durable, memory freed).
- **Profiling** (runtime/profiler.py): the first ``profile_iters`` iterations, written in gemini-sim's profile
  format, with the per-iteration and per-checkpoint timings at :meth:`close`.

Every rank of the job creates its Checkpointer, after ``runtime.init_process_group`` (or torch's own, without
torchrun's restarts), in the same order (its constructor and :meth:`recover` and :meth:`close` are collective).
Settings not given come from the environment (runtime/config.py lists it), so a script runs unchanged under plain
``torchrun`` and under the agent.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from . import config, device, distributed, job as jobs, recovery, restore, schedules, sources, startup
from .capture import StateCapture
from .config import ConfigError
from .pipeline import InFlight, Link
from .preempt import Preemption
from .plan import PlanError
from .profiler import Recorder
from .state import entries_of, flatten, local, unpack
from .files import write_atomic
from .store import ShardStore
from .transport import Groups, Progress, Receiver, stop

log = logging.getLogger("runtime")
HOOKS = ("before_update", "before_commit")


def _anchored(schedule: dict) -> bool:
    """Does the schedule open spans when this rank's own collectives end (gemini with ``after_collectives``)?"""
    return any("after_collectives" in s for s in schedule.get("spans", []))


def emit_line(line: str) -> None:
    """Print one line on stdout in a single write. The ranks of a machine share their agent's stdout, a pipe; with
    unbuffered output (``PYTHONUNBUFFERED``) ``print`` writes the text and its newline apart, so two ranks' lines
    could interleave, and the agent would lose both. One write of a line under the pipe's atomic size (4 KiB) is
    never interleaved."""
    data = (line + "\n").encode()
    try:
        sys.stdout.flush()  # what was printed before goes first
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # stdout replaced by something without a file
        print(line, flush=True)
        return
    while data:
        data = data[os.write(fd, data):]


class Checkpointer:
    """In-memory checkpoints of every rank's training state, replicated and scheduled as a Plan says.

    plan: a :class:`~runtime.plan.Plan`, a path to plan.json or its parsed dict (default: ``$GEMINI_PLAN``).
    model, optimizer: the FSDP2 model (every parameter sharded by ``fully_shard``) and its optimizer, any kind.
    extra: ``{name: object}`` with ``state_dict()``/``load_state_dict()`` (per rank), checkpointed alongside.
    job: the job's name: what a relaunch resumes (default ``$GEMINI_JOB``, else torchrun's ``--rdzv-id``, else this
        launch's own, which no later launch resumes; runtime/job.py).
    store_root: where machines keep checkpoints in memory, in ``ROOT/JOB/machine-NAME`` (default
        ``$GEMINI_STORE_ROOT``, else ``/dev/shm/gemini-UID``).
    durable_dir: DCP checkpoints, in ``DURABLE/JOB`` on storage every machine sees (default ``$GEMINI_DURABLE_DIR``,
        else ``./gemini-durable``).
    out_dir: where the profile and timings are written (default ``$GEMINI_OUT_DIR``; None: not written).
    profile_iters: iterations profiled from the start (0: none). checkpoint: False runs without checkpoints (a
    baseline). host_cores: cores for the checkpoint's threads (default: not pinned). timeout_s: of the runtime's
    own process groups. preempt_grace_s: on SIGTERM or SIGINT, write the newest checkpoint in memory durably within
    this many seconds, then let the signal go on (default ``$GEMINI_PREEMPT_GRACE_S``, else off; runtime/preempt.py).
    runtime/config.py lists every environment variable read.
    """

    def __init__(self, plan=None, model: torch.nn.Module | None = None, optimizer=None, *, extra: dict | None = None,
                 store_root=None, job: str | None = None, durable_dir=None, out_dir=None, profile_iters: int = 20,
                 checkpoint: bool = True, host_cores=None, timeout_s: float = 120.0,
                 preempt_grace_s: float | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError("call runtime.init_process_group() (or torch.distributed.init_process_group()) before "
                              "creating the Checkpointer")
        if model is None or optimizer is None:
            raise ConfigError("the Checkpointer needs the model and its optimizer")
        self.settings = s = config.resolve(plan, job=job, store_root=store_root, durable_dir=durable_dir,
                                           out_dir=out_dir, profile_iters=profile_iters, checkpoint=checkpoint,
                                           host_cores=host_cores, timeout_s=timeout_s,
                                           preempt_grace_s=preempt_grace_s)
        self.plan = s.plan
        startup.check_model(model)
        self.model, self.optimizer = model, optimizer
        self.extra = dict(extra or {})
        for name, obj in self.extra.items():
            if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
                raise ConfigError(f"extra[{name!r}] has no state_dict()/load_state_dict()")
        self._capture = StateCapture(model, optimizer, self.extra)
        self._layout: dict = {}  # what entries_of worked out for the captured tensors, reused while they are the same
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.ppm = int(os.environ.get("LOCAL_WORLD_SIZE", self.plan.processes_per_machine))
        if self.world != self.plan.machines * self.plan.processes_per_machine \
                or self.ppm != self.plan.processes_per_machine:
            raise PlanError(f"{self.plan.source}: the plan is for {self.plan.machines} machines x "
                            f"{self.plan.processes_per_machine} processes, this job has "
                            f"{self.world // max(self.ppm, 1)} x {self.ppm}")
        self.machine = self.rank // self.ppm
        if self.rank == 0 and not distributed.started_here and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == \
                "True" and os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") not in ("", "0"):
            print("gemini: warning: torchrun may restart this job (--max-restarts), and a process group started by "
                  "torch.distributed.init_process_group() can fail to start again after a restart (its workers may "
                  "read the addresses of the attempt before's): start it with runtime.init_process_group()",
                  file=sys.stderr)
        self.groups = Groups.create(s.timeout_s)
        self.job, self.named = startup.agree_on_job(s, self.world, self.groups.control)
        self.durable = s.durable(self.job)
        self.out_dir = s.out_dir
        try:
            self.durable.mkdir(parents=True, exist_ok=True)
            if not os.access(self.durable, os.W_OK | os.X_OK):
                raise ConfigError(f"durable checkpoint folder {self.durable} is not writable")
            if self.out_dir:
                self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create {e.filename}: {e.strerror}") from None
        mid = s.machine_id  # the agent names machines by their index; under torchrun: one store folder a host
        self.store = ShardStore(s.store_dir(self.job), int(mid) if mid.isdigit() else mid)
        # a crashed run's half-written shards go; before the ranks meet in _check_stores, so none of this machine's
        # ranks can have begun a new shard that another, later here, would take for a crashed run's
        self.store.clean_partial()
        startup.check_launch(self.store, self.machine, self.ppm, self.world, self.groups.control)
        self._job_record = startup.begin_job(self.durable, self.job, self.plan.machines, self.ppm, self.rank,
                                             self.groups.control)
        self.host_cores = list(s.host_cores) if s.host_cores else None
        self.send_to, self.recv_from = self.plan.peers(self.rank)
        self.held_ranks = self.plan.held_on(self.machine)  # the shards this machine's store holds, of every rank
        self.schedule_dict = self.plan.schedule
        self.schedule = schedules.get(self.schedule_dict["name"])
        self.checkpointing = s.checkpoint
        self.iteration = 0  # the last iteration whose after_step ran (or that recover() resumed from)
        self._hooks: dict[str, list[Callable[[int], None]]] = {h: [] for h in HOOKS}
        self._link_obj: Link | None = None  # made at the first checkpoint: the peers' receivers are posted then
        self._inflight: InFlight | None = None
        # naive/gemini: (iteration, its captured state) whose checkpoint goes out in the next iteration
        self._pending: tuple[int, tuple] | None = None
        self._seq = 0
        self._began = False  # the current iteration has begun (its pending checkpoint started)
        self._recovered = False  # recover() has run: the stores hold nothing newer than where training resumed
        self._t0 = self._c0 = 0.0
        # this iteration's seconds: waiting for a checkpoint (stall: the last one's end; update: the copy out),
        # and the training thread's own work on checkpoints (capturing the state, starting one)
        self._stall = self._waited = self._host = 0.0
        self._record: dict = {}
        self._backward_done = False
        self.timings: dict[str, list[float]] = {}
        self.iterations: list[dict] = []  # one record per iteration
        self.checkpoints: list[dict] = []  # one record per checkpoint
        self._on_device: list[tuple[dict, tuple | None]] = []  # GPU checkpoints' records with their wait's marks
        self.collectives = Progress()
        self.recorder = Recorder(s.profile_iters, self.collectives)
        if s.profile_iters or _anchored(self.schedule_dict):
            self.recorder.install(self.model)
        self._handles = [model.register_forward_pre_hook(self._on_forward, prepend=True),  # before FSDP's gather
                         model.register_forward_hook(lambda *_: self.recorder.phase("backward"))]
        self._closed = False
        self._preempted = False  # a signal came: no checkpoint starts any more (runtime/preempt.py)
        self._preemption = Preemption(self, s.preempt_grace_s) if s.preempt_grace_s and s.checkpoint else None
        if os.environ.get("GEMINI_FAULT"):  # test-only fault injection (the project's fault tests)
            from .testing import faults

            faults.install(self, os.environ["GEMINI_FAULT"])

    # -- hooks -------------------------------------------------------------------------------------------------
    def add_hook(self, point: str, fn: Callable[[int], None]) -> None:
        """Call ``fn(iteration)`` at ``point``: ``before_update`` (in :meth:`after_backward`, once the state is
        copied out) or ``before_commit`` (just before this rank's copy of a checkpoint is committed)."""
        if point not in self._hooks:
            raise ConfigError(f"unknown hook point {point!r}; points: {', '.join(HOOKS)}")
        self._hooks[point].append(fn)

    def _fire(self, point: str, iteration: int) -> None:
        for fn in self._hooks[point]:
            fn(iteration)

    # -- events ------------------------------------------------------------------------------------------------
    def event(self, msg: str, **fields) -> None:
        """Report an event: a log line, and a machine-readable one on stdout under the agent (GEMINI_EVENTS)."""
        rec = {"t": round(time.time(), 4), "rank": self.rank, "msg": msg, **fields}
        if os.environ.get("GEMINI_EVENTS"):
            emit_line("GEMINI " + json.dumps(rec))
        log.info("rank %d: %s %s", self.rank, msg, fields)

    # -- state ---------------------------------------------------------------------------------------------------
    def capture(self) -> tuple[dict[str, torch.Tensor], object]:
        """This rank's state now (runtime/capture.py): tensors (parameters and optimizer state as live views, the
        rest copied) and the JSON skeleton."""
        return self._capture()

    def _restore(self, tensors: dict[str, torch.Tensor], skeleton, ready=None) -> None:
        """Load a checkpoint's tensors and skeleton into the model, the optimizer and the extra state
        (runtime/restore.py)."""
        restore.restore(self._capture, tensors, skeleton, ready)

    # -- recovery ------------------------------------------------------------------------------------------------
    def recover(self) -> int:
        """Agree with every rank on the newest complete checkpoint, load it, return its iteration (0: fresh).
        Required before training: it also drops from the stores what a run that got no further left behind, which
        would otherwise count as newer than the checkpoints this run takes."""
        dist.barrier(group=self.groups.control)  # every rank is up: the time below is recovery's alone
        t0 = time.perf_counter()
        fetched = None
        while True:  # again only when a copy could not be read or failed its checksum: gone from the next inventory
            per_machine, worlds = recovery.gather_inventory(self.store, self.groups.control, self.world, self.ppm)
            target, where, old_world = recovery.choose(per_machine, self.world,
                                                       recovery.durable_iterations(self.durable), worlds)
            if where == "memory" and old_world != self.world:  # written by a job of another world size
                t = time.perf_counter()
                template, _ = flatten(self._capture.state())
                got = sources.fetch_resharded(self.store, self.groups, self.rank, self.world, self.ppm, target,
                                              old_world, per_machine, template)
                if got is None:  # a copy could not be read or failed its checksum: gone from the next inventory
                    continue
                where, resharded = "resharded", time.perf_counter() - t
                self._restore(*got)
                break
            if where != "memory":
                break
            t0_fetch = time.perf_counter()
            fetched = recovery.fetch_from_memory(self.plan, self.store, self.groups, self.rank, self.world,
                                                 self.ppm, target, per_machine)
            if fetched is None:
                continue
            t = time.perf_counter()
            # its checksum is checked meanwhile, in the background; the tensors view the store's mapping, and
            # the restore copies every one out of it, from a peer each as soon as its bytes have come
            self._restore(unpack(fetched.data, fetched.manifest, own=True, ready=fetched.ready),
                          fetched.manifest["skeleton"], ready=fetched.entry_ready())
            restore_s = time.perf_counter() - t
            fetched.finish()
            # until the shard was all in this machine's memory: reading it, or receiving it beside the restore
            fetch_s = (fetched.incoming.done_at if fetched.incoming else t) - t0_fetch
            t = time.perf_counter()
            failed = recovery.confirm(self.store, self.groups.control, self.rank, self.world, target, fetched)
            confirm_s = time.perf_counter() - t  # the rest of the checksum, and the ranks' agreement
            if not failed:
                break
            self.event("checksum-failed", iteration=target, ranks=failed)  # those copies are gone: look again
            if self.rank == 0:
                print(f"gemini: job {self.job}: the copies of iteration {target} of rank(s) "
                      f"{', '.join(map(str, failed))} failed their checksums; dropped, looking again", file=sys.stderr)
        # newer iterations here are from a run that did not get past `target`: never to be mixed with their retraining
        abandoned = self.store.drop_after(target, ranks=self.held_ranks)
        tier, source, more = "fresh", None, {}
        if where == "storage":
            template, _ = flatten(self._capture.state())
            path = recovery.step_dir(self.durable, target)
            self._restore(*sources.load_durable(path, template, self.rank, self.groups.control))
            tier, more = "storage", {"from_world": sources.durable_world(path)}
        elif where == "resharded":
            tier, more = "resharded", {"from_world": old_world, "fetch_s": round(resharded, 4)}
        elif where == "memory":
            tier, source = fetched.tier, fetched.source
            more = {"fetch_s": round(fetch_s, 4), "restore_s": round(restore_s, 4), "confirm_s": round(confirm_s, 4)}
        seconds = round(time.perf_counter() - t0, 4)
        everyone = [None] * self.world  # every rank has loaded its state; rank 0 reports for the job (gathered
        # before the next checkpoints' memory is made ready below, which would compete with it for the host's cores)
        dist.all_gather_object(everyone, (self.machine, tier, source, seconds), group=self.groups.control)
        if self.checkpointing:  # before the next checkpoints' memory is made ready, or training starts
            size, exact = (fetched.manifest["size"], True) if where == "memory" else startup.shard_bytes(self._capture)
            startup.check_room(self.store, self.plan, self.world, self._store_files, size, exact, self.groups.control)
        if where == "memory" and self.checkpointing:  # the shard's size is known: the next checkpoints' memory
            # (this machine's files of this rank, an earlier process's or new) made ready while training goes on
            self.store.prepare(self.rank, fetched.manifest["size"], self._store_files,
                               lock=device.slot_locker(next((p.device for p in self.model.parameters()), None)))
        finished = self._job_record.get("finished")
        if self.rank == 0:
            emit_line(self._report(target, where, everyone, finished, more.get("from_world")))
            if finished:
                self._job_record = jobs.reopen(self.durable, self._job_record)  # it goes on from here
        if target == 0:
            self.event("start", tier="fresh", iteration=0, job=self.job, store=str(self.store.root),
                       durable=str(self.durable), abandoned=abandoned)
        else:
            self.event("recovered", iteration=target, tier=tier, source_machine=source, seconds=seconds,
                       abandoned=abandoned, **more)
        self.iteration = target
        self._recovered = True
        self._begin(target + 1)
        return target

    def _report(self, target: int, where: str | None, everyone: list, finished: dict | None,
                from_world: int | None = None) -> str:
        """The line rank 0 prints for the job once it has started or resumed."""
        head = f"gemini: job {self.job}"
        if target == 0:
            line = (f"{head} starts afresh: {self.plan.machines} machine(s) x {self.ppm} process(es), a checkpoint "
                    f"every {self.plan.interval} iteration(s) in memory ({len(self.plan.holders[0])} "
                    f"cop{'y' if len(self.plan.holders[0]) == 1 else 'ies'}), durable every "
                    f"{self.plan.persist_interval} in {self.durable}")
        else:
            seconds = max(e[3] for e in everyone)
            changed = f", resharded from {from_world} ranks to {self.world}" if from_world not in (None, self.world) \
                else ""
            if where == "storage":
                how = f"from durable storage ({recovery.step_dir(self.durable, target)}){changed}"
            elif where == "resharded":
                how = f"from the machines' memory{changed} (DCP reading the stores)"
            else:
                kinds: dict[str, list[int]] = {}
                for m in range(self.plan.machines):
                    mine = {(t, src) for machine, t, src, _ in everyone if machine == m}
                    text = "its own memory" if mine == {("local", m)} else "; ".join(
                        "its own memory" if t == "local" else f"machine {src}'s memory" for t, src in sorted(mine))
                    kinds.setdefault(text, []).append(m)
                how = "; ".join(f"machine{'s' if len(ms) > 1 else ''} {', '.join(map(str, ms))} from "
                                f"{text.replace('its own', 'their own') if len(ms) > 1 else text}"
                                for text, ms in kinds.items())
            line = f"{head} resumed at iteration {target} in {seconds:.2f} s: {how}"
            if finished:
                line = (f"{head} finished at iteration {finished['iteration']} ({finished['at']}); resumed at "
                        f"{target} in {seconds:.2f} s, {how}, to train on where the loop goes further")
        if not self.named:
            line += "; a job of this launch alone (set GEMINI_JOB to name one that a later launch resumes)"
        return line

    # -- the training loop's calls -------------------------------------------------------------------------------
    def _on_forward(self, *_) -> None:
        if not self._began:
            self._begin(self.iteration + 1)

    def _begin(self, iteration: int) -> None:
        """The iteration begins (its first forward): the checkpoint pending from the last one goes out now."""
        self._began = True
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        if self._pending is not None:
            (pending, state), self._pending = self._pending, None
            self._stall += self.wait()  # a checkpoint starts only when the one before it is done
            self._timed(self._start, pending, time.perf_counter(), released_in=iteration, state=state)
        elif self._inflight is not None:
            self._inflight.iteration_started(self._t0)  # an interval of K > 1: its traffic may use this one too
        self.recorder.begin(iteration)

    def after_backward(self) -> None:
        """Call where the backward pass ends, before the optimizer step: the gemini schedule releases what did not
        fit the idle spans, and the update waits until the checkpoint in flight is copied out of the state it
        overwrites."""
        if not self._began:
            self._begin(self.iteration + 1)
        self.recorder.phase("host")
        if self._inflight is not None:
            self._inflight.backward_ended()
            t = time.perf_counter()
            self._inflight.wait_copied()
            self._waited += time.perf_counter() - t
            self.recorder.skip_until(time.perf_counter())
        self._fire("before_update", self.iteration + 1)
        self.recorder.skip_until(time.perf_counter())
        self.recorder.phase("optimizer")
        self._backward_done = True

    def after_step(self, iteration: int) -> None:
        """Call after the optimizer step of ``iteration`` (1, 2, ...): takes the plan's checkpoint of it (blocking
        schedule: now; the others: while the next iteration trains) and, every ``persist_interval_iters``, a
        durable one."""
        if not self._recovered:
            raise RuntimeError("call recover() before training (on every rank): it resumes from the newest "
                               "checkpoint, or starts afresh, dropping what a previous run left in the stores")
        if not isinstance(iteration, int) or iteration != self.iteration + 1:
            raise ConfigError(f"after_step({iteration!r}): expected iteration {self.iteration + 1} (iterations count "
                             "up by one from what recover() returned)")
        if self._inflight is not None and not self._backward_done:
            raise RuntimeError("after_backward() was not called before the optimizer step while a checkpoint was "
                               "being copied out: the checkpoint may mix two iterations")
        if not self._began:
            self._begin(iteration)
        if self.recorder.end():  # the profiling window is complete
            if self.out_dir:
                self._write_profile()
            if not _anchored(self.schedule_dict):  # nothing needs collectives counted: off the training's path
                self.recorder.uninstall()
        if self.checkpointing and not self._preempted and iteration % self.plan.interval == 0:
            if self.schedule.blocking:  # training waits while the whole checkpoint is copied out and sent
                self._timed(self._start, iteration, time.perf_counter(), released_in=iteration,
                            iteration_start=self._t0)
                self._stall += self.wait()
            else:  # the state as of now: parameters and optimizer state as live views, the rest copied
                self._pending = (iteration, self._timed(self.capture))
        if self.checkpointing and not self._preempted and iteration % self.plan.persist_interval == 0:
            self.persist(iteration)
        dt = time.perf_counter() - self._t0
        self.timings.setdefault("iteration_s", []).append(dt)
        self.iterations.append({"iteration": iteration, "iteration_s": dt, "stall_s": self._stall,
                                "update_wait_s": self._waited, "checkpoint_s": self._host,
                                "cpu_s": time.process_time() - self._c0,
                                "schedule": self.schedule.name if self.checkpointing else "none", **self._record})
        self.event("iteration", iteration=iteration, machine=self.machine)
        self.iteration = iteration
        self._stall = self._waited = self._host = 0.0
        self._record = {}
        self._began = self._backward_done = False

    def _stop_checkpoints(self) -> None:
        """A signal came (runtime/preempt.py): no checkpoint starts from now on; the one in flight completes."""
        self._preempted = True
        self._pending = None

    def annotate(self, **fields) -> None:
        """Extra fields for the current iteration's record in the timings (e.g. a calibration block's position)."""
        self._record.update(fields)

    def set_schedule(self, schedule: dict | None) -> None:
        """Between iterations: run another schedule from now on (a plan's ``schedule`` object), or none (None:
        no checkpoints). The checkpoint in flight completes; one not yet started is dropped."""
        if schedule is not None:
            self.plan.with_schedule(schedule)  # validated like a plan's
        self._stall += self.wait()
        self._pending = None
        self.checkpointing = schedule is not None
        if schedule is not None:
            self.schedule_dict, self.schedule = schedule, schedules.get(schedule["name"])
            if _anchored(schedule):  # its spans open when this rank's collectives end: count them
                self.recorder.install(self.model)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _link(self) -> Link:
        if self._link_obj is None:  # receives posted once, before any peer sends
            replica = self.plan.replica
            receivers = [Receiver(self.rank, src, self.store, self.groups, self.host_cores, self._store_files,
                                  replica(src, self.rank), self.settings.timeout_s, make_room=self._make_room)
                         for src in self.recv_from]
            thin = frozenset(dst for dst in self.send_to if replica(self.rank, dst))
            self._link_obj = Link(self.rank, self.store, self.groups, self.send_to, receivers, self.collectives,
                                  self.host_cores, on_commit=lambda it: self._fire("before_commit", it),
                                  files=self._store_files, thin=thin,
                                  replicated=bool(thin) or any(r.replica for r in receivers))
        return self._link_obj

    def _make_room(self) -> None:
        """Drop what this machine holds beyond the plan's ``keep`` newest complete checkpoints (their files become
        spares): after every checkpoint, and before a peer's next one is received."""
        self.store.keep_newest(self.plan.keep, ranks=self.held_ranks)

    @property
    def _store_files(self) -> int:
        """The files of each rank this machine's store holds: the ``keep`` kept checkpoints and the one being
        written (ShardStore.prepare makes them ready)."""
        return self.plan.keep + 1

    def _timed(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, its time counted as the training thread's work on checkpoints this iteration."""
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self._host += time.perf_counter() - t

    def _start(self, iteration: int, release_at: float, released_in: int, iteration_start: float | None = None,
               state=None, schedule: tuple | None = None) -> InFlight:
        """Start the checkpoint of ``iteration`` (``state``: captured already) under this job's schedule, or
        ``schedule`` = (Schedule, the plan's schedule object, interval); it is the one in flight."""
        tensors, skeleton = state or self.capture()
        entries, views = entries_of(tensors, self._layout)
        sched, sched_dict, interval = schedule or (self.schedule, self.schedule_dict, self.plan.interval)
        self._inflight = InFlight(self._link(), iteration, entries, views, skeleton, sched, sched_dict, interval,
                                  self.ppm, self._seq, release_at, released_in, iteration_start).start()
        self._seq += 1
        self._backward_done = False
        return self._inflight

    def wait(self) -> float:
        """Wait for the checkpoint in flight (copy, sends, receives); return how long this waited (seconds)."""
        ck, self._inflight = self._inflight, None
        if ck is None:
            return 0.0
        t = time.perf_counter()
        ck.flush()  # what the schedule has not released yet goes now (after an interval's last backward: nothing)
        done = ck.wait()
        self._make_room()
        t0 = ck.iteration_start
        self.checkpoints.append({"iteration": ck.iteration, "schedule": ck.schedule.name,
                                 "released_in": ck.released_in, "start_s": ck.release_at - t0,
                                 "copied_s": (ck.copied_at or done) - ck.release_at, "complete_s": done - t0,
                                 "data_s": ck.data_done() - t0, "cpu_s": ck.cpu_seconds(), "bytes": ck.size,
                                 "sent_bytes": ck.sent_bytes, "peers": len(ck.link.send_to),
                                 "held_bytes": ck.size + sum(r.sizes.pop(ck.seq) for r in ck.link.receivers),
                                 "cores": ck.cores, "memory": ck.slot.memory,
                                 "peer_memory": [r.memory.pop(ck.seq) for r in ck.link.receivers],
                                 "chunks": [[k, round(a, 5), round(b, 5)] for k, a, b in ck.sent],
                                 "arrived": [[k, round(t - ck.release_at, 5)] for r in ck.link.receivers
                                             for k, t in r.arrivals.pop(ck.seq, [])]})
        if ck.device is not None:
            self._on_device.append((self.checkpoints[-1], ck.stream_wait))
            self._settle()
        self.timings.setdefault("replicated_s", []).append(done - ck.release_at)
        self.timings.setdefault("local_write_s", []).extend(ck.link.write_s)
        ck.link.write_s.clear()
        return time.perf_counter() - t

    def _settle(self, block: bool = False) -> None:
        """Give each checkpoint on a GPU its ``stream_wait_s``, the training stream's wait for its copy out, once the
        stream has got past that wait: the host is not made to wait for the device for it (at close it is)."""
        left = []
        for rec, marks in self._on_device:
            waited = 0.0 if marks is None else device.waited_s(marks, block)
            if waited is None:
                left.append((rec, marks))
            else:
                rec["stream_wait_s"] = waited
        self._on_device = left

    def persist(self, iteration: int) -> None:
        """A durable DCP checkpoint of the current state (collective)."""
        t0 = time.perf_counter()
        state = self._capture.state()
        tensors, skeleton = flatten(state)
        # this rank's own: the extra state, and every tensor that is not a DTensor (buffers, scalar optimizer state),
        # whose value is per rank, where DCP keeps one copy of a key
        own = {k: local(v) for k, v in tensors.items() if k.startswith("extra/") or not isinstance(v, DTensor)}
        recovery.save_durable(recovery.step_dir(self.durable, iteration), {"model": state["model"],
                              "optim": state["optim"]}, own, skeleton, self.rank, self.groups.control)
        self.timings.setdefault("persist_s", []).append(time.perf_counter() - t0)

    # -- the end -------------------------------------------------------------------------------------------------
    def _write_profile(self) -> None:
        n = self.world // self.ppm
        src = f"runtime rank {self.rank}, {n} x {self.ppm} ranks, {dist.get_backend()}, schedule " \
              f"{self.schedule.name}" + ("" if self.checkpointing else " (no checkpoint)") + \
              f", collectives seen by {self.recorder.mechanism}"
        self.recorder.write(self.out_dir / f"profile-rank-{self.rank:05d}.json", n, self.ppm, src)
        if self.rank == 0:
            self.recorder.write(self.out_dir / "profile.json", n, self.ppm, src)

    def close(self, finished: bool = True) -> None:
        """Finish the checkpoint traffic (the last pending checkpoint too, so the final state is in memory), stop
        the receivers, write the profile and timings. Collective.

        ``finished`` (the default): the job is done. Its final iteration is written durably (unless it was already),
        its record says it finished, and its memory is freed on every machine; a later launch of the job says that
        it finished and resumes from that final checkpoint (runtime/job.py). ``finished=False``: the memory and the
        job stay, and a later launch resumes from memory (a loop that stops early, to go on later)."""
        if self._closed:
            return
        self._closed = True
        if self._preemption is not None:  # a durable write a signal started ends first
            self._preemption.wait()
            self._preemption.uninstall()
        self.wait()
        if self._pending is not None:
            pending, state = self._pending
            self._start(pending, time.perf_counter(), released_in=pending + 1, state=state)
            self._pending = None
            self.wait()
            self.checkpoints[-1]["at_close"] = True
        if self._link_obj is not None:
            stop(self.rank, self.groups, self.send_to, self._seq, self._link_obj.receivers)
            for w in self._link_obj.workers:
                w.stop()
        if self.recorder.iterations and len(self.recorder.iterations) < self.recorder.limit and self.out_dir:
            self._write_profile()  # a run shorter than the profiling window: what it has
        self.recorder.uninstall()
        for h in self._handles:
            h.remove()
        self._settle(block=True)
        if self.out_dir:
            self._write_timings()
        dist.barrier(group=self.groups.control)
        if finished and self.settings.checkpoint:
            self._finish()
        self.event("done", iterations=self.iteration)

    def _finish(self) -> None:
        """The job's clean end (see :meth:`close`). Collective."""
        if self.iteration and self.iteration not in recovery.durable_iterations(self.durable):
            self.persist(self.iteration)
        self.store.release()  # this process's mappings of the store go, so that freeing it frees the memory
        dist.barrier(group=self.groups.control)
        if self.rank % self.ppm == 0:
            jobs.free(self.store.dir)
            try:
                self.store.root.rmdir()  # the job's folder, once no machine of this host has one in it
            except OSError:
                pass
        if self.rank == 0:
            self._job_record = jobs.finish(self.durable, self._job_record, self.iteration)
        dist.barrier(group=self.groups.control)

    def _write_timings(self) -> None:
        stats: dict = {"format": "gemini-sim-timings", "version": 1}  # gemini_sim/schema/timings-v1.schema.json
        stats.update({k: sum(v) / len(v) for k, v in self.timings.items() if v})
        stats["shard_bytes"] = sum(e["nbytes"] for e in entries_of(flatten(self._capture.state())[0])[0])
        stats["params"] = sum(p.numel() for p in self.model.parameters())  # DTensor numel: the whole model's
        stats["schedule"] = self.schedule.name
        stats["checkpointing"] = self.checkpointing
        stats["cores"] = sorted(os.sched_getaffinity(0))  # where training's own thread ran
        stats["backend"] = dist.get_backend()
        p = next(self.model.parameters(), None)
        stats["device"] = torch.cuda.get_device_name(p.device) if p is not None and p.is_cuda else "cpu"
        if why := device.refused():  # the checkpoints' copies ran at pageable speed
            stats["page_lock_refused"] = why
        stats["iterations"] = self.iterations
        stats["checkpoints"] = self.checkpoints
        write_atomic(self.out_dir / f"timings-rank-{self.rank:05d}.json", json.dumps(stats, allow_nan=False))

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
