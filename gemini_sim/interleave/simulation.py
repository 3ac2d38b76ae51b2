"""The public entry point: :func:`simulate` plays an interval without and with a checkpoint under a schedule, and
searches the smallest checkpoint interval whose overhead stays under a threshold.

A checkpoint every K iterations (the interval) is played as K iterations back to back with one checkpoint whose
sends may spread over all K; its period is the later of the K iterations' end and the checkpoint's completion (the
next checkpoint cannot start before), and the overhead is that period against K baseline iterations.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from gemini_sim.cluster.config import Preset
from gemini_sim.cluster.workload import Timeline, zero3
from gemini_sim.errors import UserError
from gemini_sim.interleave.model import (InterleaveConfig, IterationRun, _Cluster, _mean_idle, _simulate,
                                         build_placement, symmetric_slice)
from gemini_sim.interleave.planner import _spans_of, plan_gemini


@dataclass(frozen=True)
class InterleaveResult:
    schedule: str
    preset: str
    machines: int
    replicas: int
    interval: int
    iteration_time_s: float
    baseline_iteration_time_s: float
    checkpoint_time_s: float  # from the first chunk's copy to the last byte on the last replica
    checkpoint_complete_s: float  # from the start of the interval's first iteration
    min_interval_iters: int | None  # smallest interval with overhead under the threshold (None: none up to max)
    overhead_threshold_pct: float
    idle_network_s: float  # mean over machines of NIC idle time left in the iteration
    baseline_idle_network_s: float
    checkpoint_bytes_per_machine: float
    sim_events: int
    flows: int
    simulated_machines: int  # < machines when a symmetric slice stood in for the cluster
    run: IterationRun = field(repr=False, compare=False)
    baseline: IterationRun = field(repr=False, compare=False)
    timeline: Timeline = field(repr=False, compare=False)
    spans: tuple = field(default=(), repr=False, compare=False)  # gemini: (start, end, bytes) of machine 0
    host_cpu_per_iteration_s: float = 0.0  # of the iteration time: the checkpoint's CPU on training's cores
    copy_slowdown_per_iteration_s: float = 0.0  # of the iteration time: compute slowed beside the GPU-to-CPU copy
    intervals_played: tuple = ()  # the intervals K simulated with a checkpoint, in order (the search's after the first)

    @property
    def overhead_pct(self) -> float:
        return 100 * (self.iteration_time_s / self.baseline_iteration_time_s - 1)

    def as_dict(self) -> dict:
        return {"schedule": self.schedule, "preset": self.preset, "machines": self.machines,
                "replicas": self.replicas, "interval_iters": self.interval, "iteration_time_s": self.iteration_time_s,
                "baseline_iteration_time_s": self.baseline_iteration_time_s, "overhead_pct": self.overhead_pct,
                "checkpoint_time_s": self.checkpoint_time_s, "checkpoint_complete_s": self.checkpoint_complete_s,
                "min_interval_iters": self.min_interval_iters,
                "overhead_threshold_pct": self.overhead_threshold_pct,
                "idle_network_s": self.idle_network_s, "baseline_idle_network_s": self.baseline_idle_network_s,
                "checkpoint_gb_per_machine": self.checkpoint_bytes_per_machine / 1e9,
                "host_cpu_per_iteration_s": self.host_cpu_per_iteration_s,
                "copy_slowdown_per_iteration_s": self.copy_slowdown_per_iteration_s,
                "timeline": self.timeline.source, "simulated_machines": self.simulated_machines,
                "sim_events": self.sim_events, "flows": self.flows}


MAX_SIM_EVENTS = 500_000  # SimPy events one interleave run may take: a minute or two on a 2-core host
MAX_SIMULATED_MACHINES = 16_384  # machines simulated one by one (a coupled cluster): 2,048 took 0.9 s an iteration


def simulate(preset: Preset, cfg: InterleaveConfig = InterleaveConfig(), timeline: Timeline | None = None,
             threshold_pct: float = 1.0, find_interval: bool = True, max_interval: int = 32) -> InterleaveResult:
    """Simulate ``cfg.interval`` iterations without and with one checkpoint under ``cfg.schedule``."""
    timeline = timeline or zero3(preset)
    if timeline.machines != preset.cluster.machines:
        raise UserError(f"the timeline is for {timeline.machines} machines but the preset has "
                        f"{preset.cluster.machines}")
    replicas = cfg.replicas or preset.recovery.replicas
    if not 1 <= replicas <= preset.cluster.machines:
        raise UserError(f"replicas ({replicas}) must be between 1 and machines ({preset.cluster.machines})")
    full, preset = preset, symmetric_slice(preset, cfg)
    if preset.cluster.machines > MAX_SIMULATED_MACHINES:  # a coupled cluster (a slow NIC, an oversubscribed spine)
        raise UserError(f"--slow-nic and --oversubscription simulate every machine, and this cluster has "
                        f"{preset.cluster.machines:,}; at most {MAX_SIMULATED_MACHINES:,} (2,048 took about a second "
                        "an iteration on a 2-core host)")
    # The profile GEMINI plans with: one iteration without checkpoint traffic, with other jitter draws than the run.
    pl = build_placement(preset, cfg)  # once, for the profile, every interval tried and the plan
    cluster = _Cluster(preset, cfg.oversubscription, cfg.slow_nic)  # once too: topology, paths, flow groups
    profile = _simulate(preset, timeline, dataclasses.replace(cfg, seed=cfg.seed + 1), pl, with_checkpoint=False,
                        iterations=1, full=full, cluster=cluster)

    # the work is bounded before it is done: an interval of K iterations costs some K x (one iteration's events),
    # played with and without the checkpoint
    need = 2 * cfg.interval * profile.sim_events
    if need > MAX_SIM_EVENTS:
        fits = max(1, MAX_SIM_EVENTS // (2 * max(1, profile.sim_events)))
        raise UserError(f"--interval {cfg.interval}: simulating {cfg.interval} iterations of this cluster takes some "
                        f"{need:,} events (one iteration: {profile.sim_events:,}); at most {MAX_SIM_EVENTS:,}, that "
                        f"is an interval of up to {fits:,} here")
    plans: dict = {}

    def run_with(k: int, record: bool = False) -> tuple[IterationRun, IterationRun]:
        c = dataclasses.replace(cfg, interval=k)
        plan = (plan_gemini(full.checkpoint_bytes_per_machine, profile, cluster, pl, c)
                if cfg.schedule == "gemini" else None)
        plans[k] = plan
        base = _simulate(preset, timeline, c, pl, with_checkpoint=False, full=full, record=record,
                         cluster=cluster) if (cfg.jitter or k > 1) else profile
        return _simulate(preset, timeline, c, pl, plan, full=full, record=record, cluster=cluster), base

    run, base = run_with(cfg.interval, record=True)
    slowdown = full.cluster.copy_slowdown
    min_k = None
    if find_interval and cfg.schedule == "blocking":
        # One stall per checkpoint, amortized over the interval: closed form from the measured stall.
        stall = (run.iteration_s - base.iteration_s + host_delay(cfg, run, slowdown)) * cfg.interval
        need = math.ceil(100 * stall / (threshold_pct * base.iteration_s) - 1e-9) if threshold_pct > 0 else 0
        min_k = max(1, need) if threshold_pct > 0 and need <= max_interval else None
    elif find_interval:
        min_k = _min_interval(run_with, threshold_pct, max_interval, cfg, slowdown)
    host_part, copy_part = delay_parts(cfg, run, slowdown)
    return InterleaveResult(
        schedule=cfg.schedule, preset=full.name, machines=full.cluster.machines, replicas=replicas,
        interval=cfg.interval, iteration_time_s=run.iteration_s + host_part + copy_part,
        baseline_iteration_time_s=base.iteration_s,
        checkpoint_time_s=(run.checkpoint_complete_s - run.checkpoint_start_s) if run.checkpoint_start_s is not None
        else 0.0,
        checkpoint_complete_s=run.checkpoint_complete_s or 0.0, min_interval_iters=min_k,
        overhead_threshold_pct=threshold_pct,
        idle_network_s=_mean_idle(run, cluster, run.iteration_s * cfg.interval) / cfg.interval,
        baseline_idle_network_s=_mean_idle(base, cluster, base.iteration_s * cfg.interval) / cfg.interval,
        checkpoint_bytes_per_machine=full.checkpoint_bytes_per_machine, simulated_machines=preset.cluster.machines,
        sim_events=run.sim_events + profile.sim_events, flows=run.flows, run=run, baseline=base,
        timeline=timeline, spans=_spans_of(plans.get(cfg.interval), profile, cluster, pl, timeline),
        host_cpu_per_iteration_s=host_part, copy_slowdown_per_iteration_s=copy_part,
        intervals_played=tuple(plans))


def host_delay(cfg: InterleaveConfig, run: IterationRun, copy_slowdown: float = 0.0) -> float:
    """What checkpointing costs an iteration beyond the network model, spread over the interval's iterations:

    - the host: a checkpoint's CPU work on the cores training runs on (copy, hash, sends, receives:
      ``cfg.host_cpu_s``) delays training by as much. Measured on the runtime (docs/runtime.md, "Closing the
      loop"): the iteration time each schedule adds beyond the network model matches the checkpoint's CPU time.
      Zero where the checkpoint has cores of its own (``host_cpu_s = 0``);
    - the GPU: compute runs ``copy_slowdown`` slower while a GPU-to-CPU copy runs beside it (the copy engines
      share the GPU's memory bandwidth: 1.5% on an H100, gemini_sim/cluster/machines.py), so the compute that
      overlapped the copy (``run.copy_overlap_s``, the worst machine) takes that fraction longer. A first-order
      model: it assumes the slowed compute is on the iteration's critical path."""
    return sum(delay_parts(cfg, run, copy_slowdown))


def delay_parts(cfg: InterleaveConfig, run: IterationRun, copy_slowdown: float = 0.0) -> tuple[float, float]:
    """:func:`host_delay`'s two parts per iteration: (the host's CPU, the GPU's copy slowdown)."""
    return cfg.host_cpu_s / cfg.interval, copy_slowdown * run.copy_overlap_s / cfg.interval


def _overhead(pair, cfg: InterleaveConfig, copy_slowdown: float) -> float:
    run, base = pair
    return 100 * ((run.iteration_s + host_delay(cfg, run, copy_slowdown)) / base.iteration_s - 1)


def _min_interval(run_with, threshold_pct: float, kmax: int, cfg: InterleaveConfig,
                  copy_slowdown: float = 0.0) -> int | None:
    """Smallest interval K (iterations per checkpoint) whose simulated overhead is under the threshold; None when
    even ``kmax`` is not enough."""
    return smallest_interval(
        lambda k: _overhead(run_with(k), dataclasses.replace(cfg, interval=k), copy_slowdown), threshold_pct, kmax)


def smallest_interval(overhead, threshold_pct: float, kmax: int) -> int | None:
    """Smallest K in [1, kmax] with ``overhead(K) <= threshold_pct``, for an overhead that falls as K grows; None
    when even ``kmax`` is not enough.

    Each ``overhead(K)`` is a simulation of K iterations, so the search spends few of them: most of a checkpoint's
    overhead is one cost amortised over the interval, about c / K, so the overhead at K = 1 predicts the answer
    (overhead / threshold), which is tried next, then the K just below it; doubling takes over when the prediction
    falls short, and bisection settles what is left. Any search gives the same K when the overhead falls with K;
    this one usually simulates far fewer iterations, and at worst a few more simulations than doubling and bisection
    alone (a test holds it to 2 x bits(kmax) + 3)."""
    seen: dict[int, float] = {}

    def ok(k: int) -> bool:
        if k not in seen:
            seen[k] = overhead(k)
        return seen[k] <= threshold_pct

    if ok(1):
        return 1
    scaled = seen[1] / threshold_pct if threshold_pct > 0 else math.inf  # the K that c / K predicts
    # the prediction, rounded down where it is within rounding of a whole K (c / threshold a hair over 5: 5),
    # else up; where rounding down falls short, the K above it is tried before doubling
    rounded = min(kmax, max(2, math.ceil(scaled - 1e-9)) if math.isfinite(scaled) else 2)
    above = math.isfinite(scaled) and math.ceil(scaled) > rounded
    lo, k = 1, rounded
    while not ok(k):  # the prediction fell short: double from there
        if k >= kmax:
            return None
        lo, k = k, min(kmax, k + 1 if k == rounded and above else 2 * k)
    hi = k  # lo fails, hi passes
    if hi - 1 > lo:  # a prediction is usually exact: then the K below it fails
        if not ok(hi - 1):
            return hi
        hi -= 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi
