"""Replay a failure trace against a checkpointing policy with a SimPy model of the training job.

The job process trains until the next failure interrupts it, recovers, and goes on. Between two failures the
checkpoint schedule is periodic, so the model computes where the last complete checkpoint of each tier lies, and how
much time the checkpoint stalls took, in closed form when a failure arrives: the number of SimPy events grows with
the number of failures, never with the number of iterations or checkpoints.

Accounting. Wall time splits exactly into
``useful progress + lost progress + checkpoint stalls + retrieval + restart + degraded``:

- *lost progress*: training work rolled back because it came after the last checkpoint that recovery could use;
- *checkpoint stalls*: wall time training stood still while a checkpoint was taken;
- *retrieval*: loading the checkpoint from the tier used (local memory, a peer's memory, remote storage);
- *restart*: restarting the processes, plus replacing the lost machines when a failure took some;
- *degraded*: under a policy that goes on without lost machines (``on_loss="continue"``), the share of the wall
  time the missing machines would have trained: the job runs at (N - missing) / N of its speed until their
  replacements come ``replace_s`` after the loss, then restarts once more on all N (restart and retrieval again,
  from a peer's memory: the state is resharded onto the grown layout). A replacement that comes while the job is
  recovering joins that recovery. The checkpoint schedule keeps its wall-clock interval while degraded, and the
  placement is judged as on the whole cluster: approximations, stated.

Recovery uses the cheapest tier that still holds the state: local CPU memory when no machine was lost, a peer's
CPU memory when machines were lost but the placement kept a copy of every machine's checkpoint (checked on the
machines the failure took, drawn with the replay's seed: one machine uniformly at random; several machines rack by
rack when the cluster has racks, since multi-machine failures are switch, power or rack failures), otherwise
remote storage.
A failure during recovery starts the recovery over, with the union of the machines lost so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import simpy

from gemini_sim.cluster.config import Preset
from gemini_sim.plan import TIERS
from gemini_sim.placement.survival import burst_sampler
from gemini_sim.replay.policies import Policy, Tier, policy as make_policy
from gemini_sim.failures.traces import Trace

TIER_ORDER = TIERS  # the Plan's vocabulary: local memory, a peer's memory, durable storage


@dataclass(frozen=True)
class Outcome:
    """What one failure cost."""

    time_h: float
    kind: str
    machines: int
    tier: str
    lost_s: float
    retrieval_s: float
    restart_s: float
    during_recovery: bool = False


@dataclass(frozen=True)
class ReplayResult:
    strategy: str
    description: str
    preset: str
    trace: str
    horizon_s: float
    gpus: int
    useful_s: float
    lost_s: float
    retrieval_s: float
    restart_s: float
    stall_s: float
    outcomes: tuple[Outcome, ...] = field(repr=False)
    degraded_s: float = 0.0  # progress the missing machines would have made (on_loss="continue")
    capped_events: int = 0  # events that lost more machines than the cluster has
    sim_events: int = 0  # SimPy events processed: grows with failures, not with iterations

    @property
    def failures(self) -> int:
        return len(self.outcomes)

    @property
    def wasted_s(self) -> float:
        return self.lost_s + self.retrieval_s + self.restart_s + self.stall_s + self.degraded_s

    @property
    def wasted_hours(self) -> float:
        return self.wasted_s / 3600

    @property
    def gpu_hours_wasted(self) -> float:
        return self.wasted_hours * self.gpus

    @property
    def effective_fraction(self) -> float:
        return self.useful_s / self.horizon_s if self.horizon_s else 1.0

    def tier_counts(self) -> dict[str, int]:
        return {t: sum(o.tier == t for o in self.outcomes) for t in TIER_ORDER}

    def as_dict(self) -> dict:
        return {
            "name": self.strategy,
            "description": self.description,
            "failures": self.failures,
            "wasted_hours": self.wasted_hours,
            "gpu_hours_wasted": self.gpu_hours_wasted,
            "effective_training_fraction": self.effective_fraction,
            "components": {
                "lost_progress_hours": self.lost_s / 3600,
                "retrieval_hours": self.retrieval_s / 3600,
                "checkpoint_stall_hours": self.stall_s / 3600,
                "restart_hours": self.restart_s / 3600,
                "degraded_hours": self.degraded_s / 3600,
            },
            "recovered_from": self.tier_counts(),
            "capped_events": self.capped_events,
        }


class _TierClock:
    """A tier's periodic schedule inside the current training segment.

    ``debt`` is the training progress (seconds) made since the tier's newest complete checkpoint, at the start of
    the segment. Snapshots are taken at segment times ``first + k * interval``; each is usable ``complete_s`` later.
    """

    def __init__(self, tier: Tier):
        self.tier = tier
        self.debt = 0.0

    @property
    def first(self) -> float:
        return max(0.0, self.tier.interval_s - self.debt)

    def last_complete(self, tau: float) -> float | None:
        """Segment time of the newest snapshot complete by ``tau``, or None if none completed this segment."""
        room = tau - self.tier.complete_s - self.first
        if room < 0:
            return None
        return self.first + math.floor(room / self.tier.interval_s + 1e-12) * self.tier.interval_s

    def stall_until(self, x: float) -> float:
        """Total stall time in segment times [0, x)."""
        if self.tier.stall_s <= 0 or x <= self.first:
            return 0.0
        n = math.floor((x - self.first) / self.tier.interval_s)
        return n * self.tier.stall_s + min(self.tier.stall_s, x - self.first - n * self.tier.interval_s)


@dataclass(frozen=True)
class _Grow:
    """Replacements for ``machines`` lost machines have come: the job grows back onto them."""

    machines: int


class _Job:
    """The training job as SimPy processes: one that trains and recovers, one that injects the trace's failures (and,
    under ``on_loss="continue"``, one per loss that brings the replacements)."""

    def __init__(self, env: simpy.Environment, trace: Trace, preset: Preset, pol: Policy, seed: int,
                 progress: Callable[[int], None] | None, random_phase: bool = False):
        self.env, self.trace, self.preset, self.pol = env, trace, preset, pol
        self.rng = np.random.default_rng(seed)
        self.n = preset.cluster.machines
        self.horizon = trace.duration_h * 3600
        self.clocks = {"storage": _TierClock(pol.remote)}
        if pol.memory is not None:
            self.clocks["memory"] = _TierClock(pol.memory)
        if random_phase:  # start each schedule at a random point of its cycle (an expectation over phases)
            for clock in self.clocks.values():
                if math.isfinite(clock.tier.interval_s):
                    clock.debt = float(self.rng.uniform(0, clock.tier.interval_s))
        self.placement = pol.placement if pol.replicas > 1 else None
        per_rack = preset.cluster.machines_per_rack
        self.rack_of = tuple(i // per_rack for i in range(self.n)) if per_rack else None
        self.progress_cb = progress
        self.P = 0.0  # training progress (seconds of useful work) in the model's current state
        self.lost = self.retrieval = self.restart = self.stall = self.degraded = 0.0
        self.missing = 0  # machines the job runs without (on_loss="continue"), their replacements to come
        self.grown = 0  # replacements that came while the job recovered: it starts again with them
        self.outcomes: list[Outcome] = []
        self.capped = 0
        self.pending_failed: set[int] = set()  # machines lost and not yet replaced
        self.pending_tier: str | None = None
        # Every failure is scheduled now, before any timeout of the job's own: SimPy fires events of equal time in
        # the order they were scheduled, so a failure at the same instant as the end of the job (or of a recovery)
        # interrupts it first and is counted, and failures at one instant are counted one after the other.
        self.failures = [env.timeout(max(0.0, e.time_h * 3600)) for e in trace.events]
        env.process(self.inject())
        self.proc = env.process(self.run())

    # -- SimPy processes -------------------------------------------------------------------------------------------
    def inject(self):
        for event, due in zip(self.trace.events, self.failures):
            yield due
            if self.proc.is_alive:
                self.proc.interrupt(event)
            if self.progress_cb:
                self.progress_cb(1)

    def run(self):
        while True:
            start = self.env.now
            try:
                yield self.env.timeout(self.horizon - start)
                self._end_segment(self.env.now - start)
                return
            except simpy.Interrupt as irq:
                if isinstance(irq.cause, _Grow):  # a planned restart onto the replacements: nothing is lost
                    self._grow(self.env.now - start, irq.cause.machines)
                else:
                    self._failure(self.env.now - start, irq.cause, during_recovery=False)
            while True:  # recover; a failure during recovery starts it over, a replacement that comes joins it
                start = self.env.now
                restart, retrieve = self._recovery_parts()
                end, failure = min(start + restart + retrieve, self.horizon), None
                while True:
                    try:
                        yield self.env.timeout(end - self.env.now)
                        break
                    except simpy.Interrupt as irq:
                        if not isinstance(irq.cause, _Grow):
                            failure = irq.cause
                            break
                        self.grown += irq.cause.machines
                self._charge_recovery(self.env.now - start, restart)
                if failure is not None:
                    self._failure(0.0, failure, during_recovery=True)
                    continue
                if self.env.now >= self.horizon:
                    return
                self._recovered()
                break

    def _grow(self, tau: float, machines: int) -> None:
        """A planned restart onto ``machines`` replacements, ``tau`` into the segment: the job stops once its newest
        memory checkpoint is complete (nothing is lost) and resumes from it, resharded; the remote tier's newest
        checkpoint stays where it was."""
        remote = self.clocks["storage"]
        s = remote.last_complete(tau)
        remote.debt = self._progress_at(tau) - self._progress_at(s) if s is not None else \
            remote.debt + self._progress_at(tau)
        if "memory" in self.clocks:
            self.clocks["memory"].debt = 0.0
        self._end_segment(tau)
        self.missing -= machines
        self.pending_tier = "peer"

    def _recovered(self) -> None:
        """The job trains again: on the machines left, where it goes on without lost ones, their replacements due
        ``replace_s`` from now."""
        self.missing -= self.grown
        self.grown = 0
        if self._continues() and self.pending_failed:
            k = len(self.pending_failed)
            self.missing += k
            self.env.process(self._replace(k))
        self.pending_failed.clear()
        self.pending_tier = None

    def _replace(self, machines: int):
        yield self.env.timeout(self.preset.recovery.replace_s)
        if self.proc.is_alive:
            self.proc.interrupt(_Grow(machines))

    def _continues(self) -> bool:
        """Does the job go on without its lost machines (some left to train on)?"""
        return self.pol.on_loss == "continue" and self.missing + len(self.pending_failed) < self.n

    # -- model -----------------------------------------------------------------------------------------------------
    def _stalls(self, x: float) -> float:
        return sum(c.stall_until(x) for c in self.clocks.values())

    @property
    def rate(self) -> float:
        """The job's speed on the machines it has, as a share of the whole cluster's."""
        return (self.n - self.missing) / self.n

    def _progress_at(self, x: float) -> float:
        return self.rate * (x - self._stalls(x))

    def _degraded(self, x: float) -> float:
        return (1 - self.rate) * (x - self._stalls(x))

    def _choose_tier(self, event) -> str:
        lost_now = event.loses_machines
        if lost_now:
            k = min(event.machines, self.n)
            self.capped += event.machines > self.n
            if k == 1:  # the common case; choice(replace=False) permutes all N machines
                self.pending_failed.add(int(self.rng.integers(self.n)))
            elif self.rack_of is not None:  # a multi-machine failure takes whole racks (switch, power)
                self.pending_failed.update(burst_sampler(self.rack_of, k)(self.rng))
            else:
                self.pending_failed.update(self.rng.choice(self.n, size=k, replace=False).tolist())
        if "memory" not in self.clocks:
            tier = "storage"
        elif not self.pending_failed:
            tier = "local"
        elif self.placement is not None and self.placement.survives(self.pending_failed):
            tier = "peer"
        else:
            tier = "storage"
        if self.pending_tier is not None:
            tier = max(tier, self.pending_tier, key=TIER_ORDER.index)
        return tier

    def _restore_point(self, clock: _TierClock, tau: float, p0: float) -> float:
        s = clock.last_complete(tau)
        return p0 + self._progress_at(s) if s is not None else p0 - clock.debt

    def _failure(self, tau: float, event, during_recovery: bool) -> None:
        p0 = self.P
        tier = self._choose_tier(event)
        clock = self.clocks["storage" if tier == "storage" else "memory"]
        restore = self._restore_point(clock, tau, p0)
        now = p0 + self._progress_at(tau)
        lost = now - restore
        self.stall += self._stalls(tau)  # before the debts below move the schedules to the next segment
        self.degraded += self._degraded(tau)
        # Where every tier's newest checkpoint stands relative to the restored state.
        remote = self.clocks["storage"]
        if tier != "storage":
            remote.debt = max(0.0, restore - self._restore_point(remote, tau, p0))
        else:
            remote.debt = 0.0
        if "memory" in self.clocks:
            self.clocks["memory"].debt = 0.0  # recovery writes the restored state back into CPU memory
        self.lost += lost
        self.P = restore
        self.pending_tier = tier
        restart, retrieve = self._recovery_parts()
        self.outcomes.append(Outcome(event.time_h, event.kind, event.machines, tier, lost, retrieve, restart,
                                     during_recovery))

    def _recovery_parts(self) -> tuple[float, float]:
        rec = self.preset.recovery
        restart = rec.restart_s + (rec.replace_s if self.pending_failed and not self._continues() else 0.0)
        retrieve = {"local": self.pol.retrieve_local_s, "peer": self.pol.retrieve_peer_s,
                    "storage": self.pol.retrieve_remote_s}[self.pending_tier]
        return restart, retrieve

    def _charge_recovery(self, elapsed: float, restart: float) -> None:
        self.restart += min(elapsed, restart)
        self.retrieval += max(0.0, elapsed - restart)

    def _end_segment(self, tau: float) -> None:
        self.stall += self._stalls(tau)
        self.degraded += self._degraded(tau)
        self.P += self._progress_at(tau)


class _CountingEnvironment(simpy.Environment):
    steps = 0

    def step(self):
        self.steps += 1
        super().step()


def replay(trace: Trace, preset: Preset, strategy: str | Policy, seed: int = 0,
           progress: Callable[[int], None] | None = None, random_phase: bool = False) -> ReplayResult:
    """Replay ``trace`` on ``preset`` under one strategy (a registry name or a ready :class:`Policy`).

    ``random_phase`` starts every checkpoint schedule at a random point of its cycle (drawn with ``seed``): averaged
    over seeds, that estimates the expected waste on a short trace, where one fixed phase would be noise."""
    pol = strategy if isinstance(strategy, Policy) else make_policy(strategy, preset, trace.mtbf_h * 3600)
    env = _CountingEnvironment()
    job = _Job(env, trace, preset, pol, seed, progress, random_phase)
    env.run()
    return ReplayResult(
        strategy=pol.strategy, description=pol.description, preset=preset.name, trace=trace.name,
        horizon_s=job.horizon, gpus=preset.cluster.gpus, useful_s=job.P, lost_s=job.lost,
        retrieval_s=job.retrieval, restart_s=job.restart, stall_s=job.stall, outcomes=tuple(job.outcomes),
        capped_events=job.capped, sim_events=env.steps, degraded_s=job.degraded,
    )


def replay_all(trace: Trace, preset: Preset, strategies: list[str], seed: int = 0,
               progress: Callable[[int], None] | None = None) -> list[ReplayResult]:
    return [replay(trace, preset, s, seed, progress) for s in strategies]
