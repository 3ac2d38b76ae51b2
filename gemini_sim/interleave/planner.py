"""GEMINI's planner: the idle spans of each machine's NIC in a profiled iteration, and the chunks packed into them."""

from __future__ import annotations

import math

import numpy as np

from gemini_sim.cluster.workload import Timeline
from gemini_sim.interleave.model import InterleaveConfig, IterationRun, _Cluster, chunk_size


def idle_spans(run: IterationRun, link, until: float) -> list[tuple[float, float]]:
    """Spans in [0, until) in which no training flow used ``link``."""
    a, b = run.busy_arrays(link, "train")  # merged, sorted by start
    k = int(np.searchsorted(a, until, "left"))  # the busy intervals that start before ``until``
    starts = np.concatenate(([0.0], b[:k]))
    ends = np.minimum(np.concatenate((a[:k], [until])), until)
    keep = ends - starts > 1e-9
    return list(zip(starts[keep].tolist(), ends[keep].tolist()))


def plan_gemini(shard: float, profile: IterationRun, cluster: _Cluster, pl, cfg: InterleaveConfig):
    """GEMINI's plan: each machine's sends packed, in chunks of at most half the staging buffer, into the idle spans
    of its NIC in the profiled iteration (repeated over the interval's K iterations); the rest is released when the
    interval's last backward pass ends."""
    chunk_max = chunk_size(cfg.buffer_bytes, shard)
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
