"""The interleaving model: one training iteration (or an interval of K) and a checkpoint's traffic played together on
the network model (SimPy).

Data path of a checkpoint (the runtime does the same): each machine's shard is cut into chunks; a chunk is staged
in a GPU buffer of two chunks (``buffer_bytes``), copied from GPU to CPU memory over PCIe (that copy is the local
replica), then sent from CPU memory to the machine's m-1 peers, so the copy of one chunk overlaps the send of the
previous one. Training may overwrite the GPU state only once every chunk has been copied out, so the optimizer
update waits for the last GPU-to-CPU copy; the sends may go on later. Training collectives (NCCL, GPUDirect) use
the NICs but not the host PCIe link. When chunks are released is the schedule's business (schedules.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import networkx as nx
import numpy as np
import simpy

from gemini_sim.placement import layouts as placement_mod
from gemini_sim.cluster import topology
from gemini_sim.cluster.config import GBPS, Preset
from gemini_sim.errors import UserError, unknown_name
from gemini_sim.network.flows import Network, merge_intervals
from gemini_sim.cluster.workload import Timeline, ring_bytes_per_machine


TRAIN, CKPT = 0, 1  # flow classes when checkpoint traffic yields
SLOWEST_NIC = 1e-3  # the slowest a degraded NIC may be, as a share of its bandwidth (400 Gbit/s -> 400 Mbit/s)


def chunk_size(buffer_bytes: float, shard_bytes: float) -> float:
    """The checkpoint's chunk: half the staging buffer (one chunk is copied while the other is sent), at most the
    whole shard."""
    return min(buffer_bytes / 2, shard_bytes)


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
    host_cpu_s: float = 0.0  # CPU seconds one checkpoint costs a rank on the cores training runs on (host cost model)
    slow_nic: float = 1.0  # machine 0's NIC runs at this fraction of its bandwidth (a degraded link); 1: all healthy

    def __post_init__(self):
        from gemini_sim.interleave.schedules import SCHEDULES

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
        if not (math.isfinite(self.slow_nic) and SLOWEST_NIC <= self.slow_nic <= 1):
            raise UserError(f"the slow NIC's share of its bandwidth must be from {SLOWEST_NIC:g} to 1, "
                            f"got {self.slow_nic}")
        if not (math.isfinite(self.host_cpu_s) and self.host_cpu_s >= 0):
            raise UserError(f"host CPU per checkpoint must be a finite number >= 0, got {self.host_cpu_s}")


@dataclass
class IterationRun:
    """What one simulated iteration did."""

    iteration_s: float  # period / iterations: the mean iteration time including checkpoint stalls
    update_start_s: float  # the first update
    op_spans: list  # (op index, start, end)
    table: dict  # every finished network flow: Network.finished()
    kinds: list  # names of the table's kind column: "train", "d2h", "ckpt"
    links: list  # the table's first-link column indexes this list
    link_rate_log: list
    checkpoint_start_s: float | None = None
    checkpoint_complete_s: float | None = None
    d2h_complete_s: float | None = None
    sim_events: int = 0
    flows: int = 0
    copy_overlap_s: float = 0.0  # the longest time a machine's GPU-to-CPU copy ran beside training's compute
    _busy: dict = dataclasses.field(default_factory=dict, repr=False)

    def _of_kind(self, kind: str) -> np.ndarray:
        """Which rows of the table are flows of ``kind``."""
        return self.table["kind"] == (self.kinds.index(kind) if kind in self.kinds else -1)

    @functools.cached_property
    def link_index(self) -> dict:
        """Each link's index in :attr:`links` (the table's ``first`` column)."""
        return {link: k for k, link in enumerate(self.links)}

    def spans(self, kind: str | None = None, owner: int | None = None) -> list[tuple[float, float]]:
        """(start, end) of the finished flows of ``kind`` owned by ``owner`` (None: any)."""
        t = self.table
        sel = np.ones(len(t["start"]), dtype=bool)
        if kind is not None:
            sel &= self._of_kind(kind)
        if owner is not None:
            sel &= t["owner"] == owner
        return list(zip(t["start"][sel].tolist(), t["end"][sel].tolist()))

    def busy_all(self, kind: str | None = None):
        """Merged busy intervals of every link as the first link of flows (of ``kind``, or any): arrays (link
        index, start, end) sorted by link and start. For a machine's NIC egress: when it was sending."""
        if kind not in self._busy:
            t = self.table
            sel = slice(None) if kind is None else self._of_kind(kind)
            self._busy[kind] = merge_intervals(t["first"][sel], t["start"][sel], t["end"][sel])
        return self._busy[kind]

    def busy_arrays(self, link, kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`busy` as two arrays (starts, ends)."""
        g, a, b = self.busy_all(kind)
        index = self.link_index.get(link, -1)
        lo, hi = np.searchsorted(g, index, "left"), np.searchsorted(g, index, "right")
        return a[lo:hi], b[lo:hi]

    def busy(self, link, kind: str | None = None) -> list[tuple[float, float]]:
        """When ``link`` carried flows that start on it (of ``kind``, or any): merged (start, end) intervals."""
        a, b = self.busy_arrays(link, kind)
        return list(zip(a.tolist(), b.tolist()))


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
    """Links and paths of the topology, plus one PCIe link per machine; ``slow_nic``: machine 0's NIC runs at that
    fraction of its bandwidth, both ways."""

    def __init__(self, preset: Preset, oversubscription: float, slow_nic: float = 1.0):
        self.n = preset.cluster.machines
        g = topology.build(preset.cluster, preset.storage, oversubscription)
        self.capacity = {}
        for a, b, data in g.edges(data=True):
            share = slow_nic if data["kind"] == "nic" and topology.machine(0) in (a, b) else 1.0
            self.capacity[(a, b)] = self.capacity[(b, a)] = data["gbps"] * GBPS * share
        for i in range(self.n):
            self.capacity[("pcie", i)] = preset.cluster.pcie_gbps * GBPS
        self.graph = g
        self._paths: dict = {}
        self.groups: dict = {}  # flow groups' incidences (Network.paths), valid for every Network on .capacity

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

    def __init__(self, preset: Preset, timeline: Timeline, cfg: InterleaveConfig, placement, plan=None,
                 with_checkpoint=True, iterations: int | None = None, full: Preset | None = None, record=True,
                 cluster: _Cluster | None = None):
        self.preset, self.tl, self.cfg = preset, timeline, cfg
        full = full or preset
        self.shard_bytes = full.checkpoint_bytes_per_machine
        self.ring_n = full.cluster.machines
        self.k = iterations or cfg.interval
        self.env = simpy.Environment()
        self.cluster = cluster or _Cluster(preset, cfg.oversubscription, cfg.slow_nic)  # built once by the caller
        self.net = Network(self.env, self.cluster.capacity, record=record,
                           rate_log=record and preset.cluster.machines <= RATE_LOG_MACHINES)
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
        self.copying: list = []  # (start, end) of the chunks' GPU-to-CPU copies (every machine's, in lockstep)
        self.placement = placement  # built once by the caller (build_placement) for every run it simulates
        self.plan = plan
        self.with_checkpoint = with_checkpoint
        self.updates = [r * per + timeline.update for r in range(self.k)]
        for idx in range(total):
            self.env.process(self._op(idx))
        if self.with_checkpoint:
            from gemini_sim.interleave.schedules import SCHEDULES

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
        ring = self._group("ring", lambda: [self.cluster.path(i, (i + 1) % self.n) for i in range(self.n)])
        self.flows += ring.count
        yield self.net.transfer_group(ring, per, TRAIN, "train")

    def _group(self, key, paths):
        """The network's incidence of a group of paths, built once per key for the cluster."""
        if key not in self.cluster.groups:
            self.cluster.groups[key] = self.net.paths(paths())
        return self.cluster.groups[key]

    # -- checkpoint pipeline (shared by every schedule) -----------------------------------------------------------
    @property
    def shard(self) -> float:
        return self.shard_bytes

    @property
    def chunk(self) -> float:
        return chunk_size(self.cfg.buffer_bytes, self.shard)

    def chunks(self, total: float) -> list[float]:
        n = max(1, math.ceil(total / self.chunk - 1e-9))
        return [total / n] * n

    def run_pipelines(self, sends_per_machine, cls: int, copy_release=0.0):
        """Copy every machine's shard out of the GPU from ``copy_release`` on, and send it to its peers in the
        batches ``sends_per_machine[i]``: lists of (release: time or event, [chunk sizes])."""
        copied = _Progress(self.env)
        d2h = self.env.event()
        self.env.process(self._copy_out(copy_release, copied, d2h))
        net_events = []
        for i, batches in enumerate(sends_per_machine):
            net_events.append(self.env.event())
            self.env.process(self._send(i, batches, cls, copied, net_events[-1]))

        def join():
            yield d2h
            self.d2h_complete = self.env.now
            self.d2h_done.succeed()
            yield simpy.AllOf(self.env, net_events)
            self.ckpt_done.succeed()

        self.env.process(join())

    def _copy_out(self, release, copied, done):
        """Every machine's GPU-to-CPU copies, chunk by chunk. A machine's PCIe link carries its own copies and
        nothing else, and every machine has the same link and the same shard, so the machines copy in lockstep:
        one group of flows per chunk (one flow per machine) and one progress that every machine's sender reads
        give the same times as a copier per machine, at a fraction of the events."""
        if isinstance(release, simpy.Event):
            yield release
        pcie = self._group("pcie", lambda: [[("pcie", i)] for i in range(self.n)])
        for size in self.chunks(self.shard):  # double-buffered: the next chunk is staged while this one copies
            if self.ckpt_start is None:
                self.ckpt_start = self.env.now
            self.flows += pcie.count
            start = self.env.now
            yield self.net.transfer_group(pcie, size, TRAIN, "d2h")  # flow i (owner i) is machine i's copy
            self.copying.append((start, self.env.now))
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
                if peers:
                    group = self._group(("peers", i, peers), lambda: [self.cluster.path(i, p) for p in peers])
                    self.flows += group.count
                    yield self.net.transfer_group(group, size, cls, "ckpt", i)
                sent += size
        done.succeed()

    def run(self) -> IterationRun:
        self.env.run()
        if not all(self.ended[u].triggered for u in self.updates) or not self.ckpt_done.triggered:
            raise RuntimeError("iteration did not finish (dependency cycle in the timeline?)")
        spans = {i: (a, b) for i, a, b in self.spans}
        train_end = spans[self.updates[-1]][1]
        complete = None
        table = self.net.finished()
        if self.with_checkpoint:
            complete = max(self.net.last_end.get(k, 0.0) for k in ("ckpt", "d2h"))
        period = max(train_end, complete or 0.0)
        per = len(self.tl.ops)
        compute = [(a, b) for i, a, b in self.spans if self.tl.ops[i % per].stream == "compute"]
        copy_overlap = overlap(self.copying, compute)
        return IterationRun(period / self.k, spans[self.updates[0]][0], self.spans, table, list(self.net.kinds),
                            self.net.links, self.net.link_rate_log, self.ckpt_start, complete,
                            getattr(self, "d2h_complete", None), self.net.reallocations, self.flows, copy_overlap)


def overlap(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    """Total time two sets of intervals overlap; within each set the intervals must not overlap each other (a
    machine's copies run one after the other, compute is one stream)."""
    if not xs or not ys:
        return 0.0
    x = np.asarray(xs, dtype=float)
    y = np.asarray(sorted(ys), dtype=float)
    before = np.concatenate(([0.0], np.cumsum(y[:, 1] - y[:, 0])))  # length of y's intervals before each one

    def covered(t):  # how much of y lies before time t
        k = np.searchsorted(y[:, 1], t)  # intervals 0..k-1 end by t
        inside = np.clip(t - y[np.minimum(k, len(y) - 1), 0], 0.0, None) * (k < len(y))
        return before[k] + inside

    return float(np.sum(covered(x[:, 1]) - covered(x[:, 0])))


def build_placement(preset: Preset, cfg: InterleaveConfig):
    return placement_mod.for_preset(preset, cfg.replicas)


def _simulate(preset, timeline, cfg, placement, plan=None, with_checkpoint=True, iterations=None,
              full=None, record=True, cluster=None) -> IterationRun:
    """One run; ``record=False`` keeps no flow table (only the times the interval search needs); ``cluster``:
    the topology, built once by the caller for all its runs."""
    return _Iteration(preset, timeline, cfg, placement, plan, with_checkpoint, iterations, full, record,
                      cluster).run()


SLICE = 16  # machines simulated when a larger cluster is symmetric
RATE_LOG_MACHINES = 64  # simulations of at most this many machines keep every link's rate over time (for plots)


def symmetric_slice(preset: Preset, cfg: InterleaveConfig) -> Preset:
    """A 16-machine stand-in for a large cluster whose machines all see the same traffic.

    With a non-blocking fabric, every machine of a ring collective sends the same bytes to its successor over its
    own NIC, and every machine sends its shard to m-1 peers: each machine's NIC and PCIe carry the same flows
    whatever N is. So we simulate a slice of 16 machines (full ring bytes, full shard) and lose nothing. With an
    oversubscribed spine, traffic between racks couples machines, and with a slow NIC one machine differs from the
    rest: then we simulate the whole cluster."""
    n = preset.cluster.machines
    replicas = cfg.replicas or preset.recovery.replicas
    if n <= 2 * SLICE or cfg.oversubscription > 1 or cfg.slow_nic < 1 or replicas > SLICE:
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
    nics = np.array([run.link_index[cluster.nic_out(i)] for i in range(cluster.n)])
    g, a, b = run.busy_all()
    mine = np.isin(g, nics)
    busy = np.clip(np.minimum(b[mine], until) - a[mine], 0.0, None).sum()
    return until - busy / cluster.n
