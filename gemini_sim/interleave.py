"""Play one training iteration and the checkpoint traffic of a placement together on the network model.

Data path of a checkpoint (the runtime does the same): each machine's shard is cut into chunks; a chunk is staged
in a GPU buffer of two chunks (``buffer_bytes``), copied from GPU to CPU memory over PCIe (that copy is the local
replica), then sent from CPU memory to the machine's m-1 peers, so the copy of one chunk overlaps the send of the
previous one. Training may overwrite the GPU state only once every chunk has been copied out, so the optimizer
update waits for the last GPU-to-CPU copy; the sends may go on later. Training collectives (NCCL, GPUDirect) use
the NICs but not the host PCIe link.

A checkpoint every K iterations (the interval) is played as K iterations back to back with one checkpoint whose
sends may spread over all K; its period is the later of the K iterations' end and the checkpoint's completion (the
next checkpoint cannot start before), and the overhead is that period against K baseline iterations.

Schedules (registry :data:`SCHEDULES`):

- ``blocking``: after the update, training waits while the whole checkpoint is copied and sent.
- ``naive``: every chunk is released at the start of the iteration and competes with training traffic.
- ``gemini``: a profiling run (no checkpoint) gives each machine's idle NIC spans; chunks are planned into them,
  sized so that each span's pipeline ends within it (within ``span_fill`` of it: headroom for a timeline that
  drifts); what does not fit is released when the backward pass ends.
- ``priority`` (ours): every chunk is released at the start, in a lower strict-priority class, so it only uses
  bandwidth that training leaves; needs no profile and adapts when the timeline drifts from the profile.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import simpy

from gemini_sim.placement import layouts as placement_mod
from gemini_sim.cluster import topology
from gemini_sim.cluster.config import GBPS, Preset
from gemini_sim.errors import UserError, unknown_name
from gemini_sim.network.flows import Network, merge_intervals
from gemini_sim.replay.policies import placement_options
from gemini_sim.cluster.workload import Timeline, ring_bytes_per_machine, zero3

TRAIN, CKPT = 0, 1  # flow classes when checkpoint traffic yields


@dataclass(frozen=True)
class InterleaveConfig:
    schedule: str = "gemini"
    replicas: int | None = None  # default: the preset's
    buffer_bytes: float = 1 << 30  # GPU staging buffer: two chunks of 512 MiB
    jitter: float = 0.0  # compute spans vary uniformly by +-jitter between iterations (GEMINI: < 10%)
    seed: int = 0
    interval: int = 1  # iterations per checkpoint: its sends may spread over that many iterations
    oversubscription: float = 1.0
    span_fill: float = 1.0  # gemini: fill at most this fraction of each idle span (headroom for timeline jitter)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise unknown_name("schedule", self.schedule, SCHEDULES)
        if self.buffer_bytes < 2:
            raise UserError(f"staging buffer must be at least 2 bytes, got {self.buffer_bytes}")
        if not 0 <= self.jitter < 1:
            raise UserError(f"jitter must be in [0, 1), got {self.jitter}")
        if self.interval < 1:
            raise UserError(f"interval must be >= 1 iteration, got {self.interval}")
        if not 0 < self.span_fill <= 1:
            raise UserError(f"span fill must be in (0, 1], got {self.span_fill}")


@dataclass
class IterationRun:
    """What one simulated iteration did."""

    iteration_s: float  # period / iterations: the mean iteration time including checkpoint stalls
    update_start_s: float  # the first update
    op_spans: list  # (op index, start, end)
    records: list  # network FlowRecords
    link_rate_log: list
    checkpoint_start_s: float | None = None
    checkpoint_complete_s: float | None = None
    d2h_complete_s: float | None = None
    sim_events: int = 0
    flows: int = 0


class _Progress:
    """Bytes of a shard already in CPU memory; senders wait on it."""

    def __init__(self, env: simpy.Environment):
        self.env = env
        self.level_at = 0.0
        self._waiters: list = []

    def wait(self) -> simpy.Event:
        ev = self.env.event()
        self._waiters.append(ev)
        return ev

    def wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for ev in waiters:
            ev.succeed()


class _Cluster:
    """Links and paths of the topology, plus one PCIe link per machine."""

    def __init__(self, preset: Preset, oversubscription: float):
        self.n = preset.cluster.machines
        g = topology.build(preset.cluster, preset.storage, oversubscription)
        self.capacity = {}
        for a, b, data in g.edges(data=True):
            self.capacity[(a, b)] = self.capacity[(b, a)] = data["gbps"] * GBPS
        for i in range(self.n):
            self.capacity[("pcie", i)] = preset.cluster.pcie_gbps * GBPS
        self.graph = g
        self._paths: dict = {}

    def path(self, i: int, j: int) -> tuple:
        key = (i, j)
        if key not in self._paths:
            nodes = nx.shortest_path(self.graph, topology.machine(i), topology.machine(j))
            self._paths[key] = tuple(zip(nodes, nodes[1:]))
        return self._paths[key]

    def nic_out(self, i: int) -> tuple:
        return self.path(i, (i + 1) % self.n)[0] if self.n > 1 else None


class _Iteration:
    """``cfg.interval`` iterations of the timeline back to back (op j of iteration r is ``r * len(ops) + j``), with
    one checkpoint (of the state before the first update) when ``with_checkpoint``."""

    def __init__(self, preset: Preset, timeline: Timeline, cfg: InterleaveConfig, plan=None, with_checkpoint=True,
                 iterations: int | None = None, full: Preset | None = None):
        self.preset, self.tl, self.cfg = preset, timeline, cfg
        full = full or preset
        self.shard_bytes = full.checkpoint_bytes_per_machine
        self.ring_n = full.cluster.machines
        self.k = iterations or cfg.interval
        self.env = simpy.Environment()
        self.cluster = _Cluster(preset, cfg.oversubscription)
        self.net = Network(self.env, self.cluster.capacity)
        self.n = preset.cluster.machines
        per = len(timeline.ops)
        total = per * self.k
        rng = np.random.default_rng(cfg.seed)
        self.scale = (1 + cfg.jitter * (2 * rng.random(total) - 1)) if cfg.jitter else None
        self.started = [self.env.event() for _ in range(total)]
        self.ended = [self.env.event() for _ in range(total)]
        self.streams = {"compute": simpy.Resource(self.env, 1), "comm": simpy.Resource(self.env, 1)}
        self.spans: list = []
        self.d2h_done = self.env.event()
        self.ckpt_done = self.env.event()
        self.update_gate = self.d2h_done  # what the first optimizer update waits for
        self.ckpt_start: float | None = None
        self.flows = 0
        self.placement = build_placement(preset, cfg)
        self.plan = plan
        self.with_checkpoint = with_checkpoint
        self.updates = [r * per + timeline.update for r in range(self.k)]
        for idx in range(total):
            self.env.process(self._op(idx))
        if self.with_checkpoint:
            SCHEDULES[cfg.schedule](self)
        else:
            self.d2h_done.succeed()
            self.ckpt_done.succeed()

    # -- training ----------------------------------------------------------------------------------------------
    def _op(self, idx: int):
        per = len(self.tl.ops)
        rnd, local = divmod(idx, per)
        op = self.tl.ops[local]
        base = rnd * per
        for kind, j in op.deps:
            yield (self.started if kind == "start" else self.ended)[base + j]
        if rnd and (not op.deps or local == 0):
            yield self.ended[self.updates[rnd - 1]]  # the next iteration starts after the previous update
        if idx == self.updates[0]:
            yield self.update_gate
        with self.streams[op.stream].request() as req:
            yield req
            start = self.env.now
            self.started[idx].succeed()
            if op.stream == "compute":
                yield self.env.timeout(op.duration_s * (self.scale[idx] if self.scale is not None else 1.0))
            else:
                yield from self._collective(idx, op)
            self.spans.append((idx, start, self.env.now))
            self.ended[idx].succeed()

    def _collective(self, idx, op):
        per = ring_bytes_per_machine(op, self.ring_n)
        if per <= 0:
            return
        flows = [(self.cluster.path(i, (i + 1) % self.n), per, ("train", idx, i)) for i in range(self.n)]
        self.flows += len(flows)
        yield simpy.AllOf(self.env, self.net.transfer_many(flows, TRAIN))

    # -- checkpoint pipeline (shared by every schedule) -----------------------------------------------------------
    @property
    def shard(self) -> float:
        return self.shard_bytes

    @property
    def chunk(self) -> float:
        return min(self.cfg.buffer_bytes / 2, self.shard)

    def chunks(self, total: float) -> list[float]:
        n = max(1, math.ceil(total / self.chunk - 1e-9))
        return [total / n] * n

    def run_pipelines(self, sends_per_machine, cls: int, copy_release=0.0):
        """Copy every machine's shard out of the GPU from ``copy_release`` on, and send it to its peers in the
        batches ``sends_per_machine[i]``: lists of (release: time or event, [chunk sizes])."""
        d2h_events, net_events = [], []
        for i, batches in enumerate(sends_per_machine):
            copied = _Progress(self.env)
            d2h, net = self.env.event(), self.env.event()
            d2h_events.append(d2h)
            net_events.append(net)
            self.env.process(self._copy_out(i, copy_release, copied, d2h))
            self.env.process(self._send(i, batches, cls, copied, net))

        def join():
            yield simpy.AllOf(self.env, d2h_events)
            self.d2h_complete = self.env.now
            self.d2h_done.succeed()
            yield simpy.AllOf(self.env, net_events)
            self.ckpt_done.succeed()

        self.env.process(join())

    def _copy_out(self, i, release, copied, done):
        if isinstance(release, simpy.Event):
            yield release
        for size in self.chunks(self.shard):  # double-buffered: the next chunk is staged while this one copies
            if self.ckpt_start is None:
                self.ckpt_start = self.env.now
            self.flows += 1
            yield self.net.transfer([("pcie", i)], size, TRAIN, ("d2h", i))
            copied.level_at = copied.level_at + size
            copied.wake()
        copied.level_at = math.inf  # all of it is in CPU memory (no rounding left over)
        copied.wake()
        done.succeed()

    def _send(self, i, batches, cls, copied, done):
        peers = self.placement.holders[i][1:]
        sent = 0.0
        for release, sizes in batches:
            if isinstance(release, simpy.Event):
                yield release
            elif release > self.env.now:
                yield self.env.timeout(release - self.env.now)
            for size in sizes:
                while copied.level_at < sent + size * (1 - 1e-9):  # wait until the bytes are in CPU memory
                    yield copied.wait()
                flows = [(self.cluster.path(i, p), size, ("ckpt", i, p)) for p in peers]
                self.flows += len(flows)
                if flows:
                    yield simpy.AllOf(self.env, self.net.transfer_many(flows, cls))
                sent += size
        done.succeed()

    def run(self) -> IterationRun:
        self.env.run()
        if not all(self.ended[u].triggered for u in self.updates) or not self.ckpt_done.triggered:
            raise RuntimeError("iteration did not finish (dependency cycle in the timeline?)")
        spans = {i: (a, b) for i, a, b in self.spans}
        train_end = spans[self.updates[-1]][1]
        complete = None
        if self.with_checkpoint:
            complete = max(r.end for r in self.net.records if r.tag and r.tag[0] in ("ckpt", "d2h"))
        period = max(train_end, complete or 0.0)
        return IterationRun(period / self.k, spans[self.updates[0]][0], self.spans, self.net.records,
                            self.net.link_rate_log, self.ckpt_start, complete, getattr(self, "d2h_complete", None),
                            self.net.reallocations, self.flows)


def build_placement(preset: Preset, cfg: InterleaveConfig):
    replicas = cfg.replicas or preset.recovery.replicas
    strategy = placement_mod.resolve(preset.recovery.placement, preset.cluster.machines, replicas)
    return placement_mod.build(strategy, preset.cluster.machines, replicas, **placement_options(preset))


# -- schedules ---------------------------------------------------------------------------------------------------
def _all_chunks(it: _Iteration):
    return [[(0.0, it.chunks(it.shard))] for _ in range(it.n)]


def _blocking(it: _Iteration):
    # Training stops after the interval's last update while the whole checkpoint is copied out and sent.
    last = it.ended[it.updates[-1]]
    it.update_gate = it.env.event().succeed()
    it.run_pipelines([[(last, it.chunks(it.shard))] for _ in range(it.n)], TRAIN, copy_release=last)


def _naive(it: _Iteration):
    it.run_pipelines(_all_chunks(it), TRAIN)


def _priority(it: _Iteration):
    it.run_pipelines(_all_chunks(it), CKPT)


def _gemini(it: _Iteration):
    if it.plan is None:
        raise ValueError("the gemini schedule needs a plan from a profiling run")
    it.run_pipelines(it.plan, TRAIN)


SCHEDULES = {"blocking": _blocking, "naive": _naive, "gemini": _gemini, "priority": _priority}


def idle_spans(run: IterationRun, link, until: float) -> list[tuple[float, float]]:
    """Spans in [0, until) in which no training flow used ``link``."""
    busy = merge_intervals((r.start, r.end) for r in run.records
                           if link in r.links and r.tag and r.tag[0] == "train")
    spans, t = [], 0.0
    for a, b in busy:
        if a >= until:
            break
        spans.append((t, a))
        t = b
    spans.append((t, until))
    return [(a, min(b, until)) for a, b in spans if min(b, until) - a > 1e-9]


def plan_gemini(shard: float, profile: IterationRun, cluster: _Cluster, pl, cfg: InterleaveConfig):
    """GEMINI's plan: each machine's sends packed, in chunks of at most half the staging buffer, into the idle spans
    of its NIC in the profiled iteration (repeated over the interval's K iterations); the rest is released when the
    interval's last backward pass ends."""
    chunk_max = min(cfg.buffer_bytes / 2, shard)
    min_chunk = min(chunk_max, 1 << 20)
    period = profile.iteration_s
    plans = []
    for i in range(cluster.n):
        peers = pl.holders[i][1:]
        left = shard
        if not peers:
            plans.append([])
            continue
        link = cluster.path(i, peers[0])[0]
        per_byte = len(peers) / cluster.capacity[link]  # the m-1 copies of a chunk share the NIC
        spans = idle_spans(profile, link, profile.update_start_s)
        batches = []
        for r in range(cfg.interval):
            for a, b in spans:
                if left <= 0:
                    break
                room = cfg.span_fill * (b - a) / per_byte  # bytes of chunk that fit the span
                sizes = []
                while left > 0 and room >= min_chunk:
                    size = min(chunk_max, left, room)
                    sizes.append(size)
                    left -= size
                    room -= size
                if sizes:
                    batches.append((r * period + a, sizes))
        if left > 1e-6:
            n_left = max(1, math.ceil(left / chunk_max - 1e-9))
            batches.append(((cfg.interval - 1) * period + profile.update_start_s, [left / n_left] * n_left))
        plans.append(batches)
    return plans


# -- the public entry point ----------------------------------------------------------------------------------------
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
                "timeline": self.timeline.source, "simulated_machines": self.simulated_machines,
                "sim_events": self.sim_events, "flows": self.flows}


def _simulate(preset, timeline, cfg, plan=None, with_checkpoint=True, iterations=None, full=None) -> IterationRun:
    return _Iteration(preset, timeline, cfg, plan, with_checkpoint, iterations, full).run()


SLICE = 16  # machines simulated when a larger cluster is symmetric


def symmetric_slice(preset: Preset, cfg: InterleaveConfig) -> Preset:
    """A 16-machine stand-in for a large cluster whose machines all see the same traffic.

    With a non-blocking fabric, every machine of a ring collective sends the same bytes to its successor over its
    own NIC, and every machine sends its shard to m-1 peers: each machine's NIC and PCIe carry the same flows
    whatever N is. So we simulate a slice of 16 machines (full ring bytes, full shard) and lose nothing. With an
    oversubscribed spine, traffic between racks couples machines, and we simulate the whole cluster."""
    n = preset.cluster.machines
    replicas = cfg.replicas or preset.recovery.replicas
    if n <= 2 * SLICE or cfg.oversubscription > 1 or replicas > SLICE:
        return preset
    size = SLICE - SLICE % replicas  # keep group placement possible in the slice
    per_rack = preset.cluster.machines_per_rack
    cluster = dataclasses.replace(preset.cluster, machines=size,
                                  machines_per_rack=min(per_rack, size) if per_rack else 0)
    return dataclasses.replace(preset, cluster=cluster)


def _mean_idle(run: IterationRun, cluster: _Cluster, until: float) -> float:
    """Mean over machines of the time in [0, until) during which the machine's NIC sent nothing."""
    if cluster.n < 2:
        return until
    total = 0.0
    for i in range(cluster.n):
        link = cluster.nic_out(i)
        busy = merge_intervals((r.start, min(r.end, until)) for r in run.records
                               if link in r.links and r.start < until)
        total += until - sum(b - a for a, b in busy)
    return total / cluster.n


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
    # The profile GEMINI plans with: one iteration without checkpoint traffic, with other jitter draws than the run.
    profile = _simulate(preset, timeline, dataclasses.replace(cfg, seed=cfg.seed + 1), with_checkpoint=False,
                        iterations=1, full=full)
    cluster = _Cluster(preset, cfg.oversubscription)
    pl = build_placement(preset, cfg)

    plans: dict = {}

    def run_with(k: int) -> tuple[IterationRun, IterationRun]:
        c = dataclasses.replace(cfg, interval=k)
        plan = (plan_gemini(full.checkpoint_bytes_per_machine, profile, cluster, pl, c)
                if cfg.schedule == "gemini" else None)
        plans[k] = plan
        base = _simulate(preset, timeline, c, with_checkpoint=False, full=full) if (cfg.jitter or k > 1) else profile
        return _simulate(preset, timeline, c, plan, full=full), base

    run, base = run_with(cfg.interval)
    min_k = None
    if find_interval and cfg.schedule == "blocking":
        # One stall per checkpoint, amortized over the interval: closed form from the measured stall.
        stall = run.iteration_s * cfg.interval - base.iteration_s * cfg.interval
        need = math.ceil(100 * stall / (threshold_pct * base.iteration_s) - 1e-9) if threshold_pct > 0 else 0
        min_k = max(1, need) if threshold_pct > 0 and need <= max_interval else None
    elif find_interval:
        min_k = _min_interval(run_with, threshold_pct, max_interval)
    return InterleaveResult(
        schedule=cfg.schedule, preset=full.name, machines=full.cluster.machines, replicas=replicas,
        interval=cfg.interval, iteration_time_s=run.iteration_s, baseline_iteration_time_s=base.iteration_s,
        checkpoint_time_s=(run.checkpoint_complete_s - run.checkpoint_start_s) if run.checkpoint_start_s is not None
        else 0.0,
        checkpoint_complete_s=run.checkpoint_complete_s or 0.0, min_interval_iters=min_k,
        overhead_threshold_pct=threshold_pct,
        idle_network_s=_mean_idle(run, cluster, run.iteration_s * cfg.interval) / cfg.interval,
        baseline_idle_network_s=_mean_idle(base, cluster, base.iteration_s * cfg.interval) / cfg.interval,
        checkpoint_bytes_per_machine=full.checkpoint_bytes_per_machine, simulated_machines=preset.cluster.machines,
        sim_events=run.sim_events + profile.sim_events, flows=run.flows, run=run, baseline=base,
        timeline=timeline, spans=_spans_of(plans.get(cfg.interval), profile, cluster, pl, timeline))


def _spans_of(plan, profile: IterationRun, cluster: _Cluster, pl, timeline: Timeline) -> tuple:
    """Machine 0's idle spans in the profiled iteration: (start, end, bytes the gemini plan puts in it, training
    collectives that ended before it starts)."""
    if plan is None or not plan or len(pl.holders[0]) < 2:
        return ()
    link = cluster.path(0, pl.holders[0][1])[0]
    out = []
    planned = {round(start, 12): sum(sizes) for start, sizes in plan[0]}
    per = len(timeline.ops)
    comm_ends = sorted(b for i, a, b in profile.op_spans if i < per and timeline.ops[i].stream == "comm")
    for a, b in idle_spans(profile, link, profile.update_start_s):
        out.append((a, b, planned.get(round(a, 12), 0.0), sum(1 for e in comm_ends if e <= a + 1e-9)))
    return tuple(out)


def _overhead(pair) -> float:
    run, base = pair
    return 100 * (run.iteration_s / base.iteration_s - 1)


def _min_interval(run_with, threshold_pct: float, kmax: int) -> int | None:
    """Smallest interval K (iterations per checkpoint) whose overhead is under the threshold, by doubling and then
    bisection (overhead falls as K grows); None when even ``kmax`` is not enough."""
    cache: dict[int, bool] = {}

    def ok(k: int) -> bool:
        if k not in cache:
            cache[k] = _overhead(run_with(k)) <= threshold_pct
        return cache[k]

    if ok(1):
        return 1
    lo, hi = 1, 2
    while hi < kmax and not ok(hi):
        lo, hi = hi, min(2 * hi, kmax)
    if not ok(hi):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi
