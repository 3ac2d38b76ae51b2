"""Flow-level network simulation in SimPy.

A :class:`Network` owns directed links with capacities (bytes/s). A flow is a number of bytes sent along a path of
links. Active flows share links by max-min fairness, computed by progressive filling, class by class: with
priority classes, class 0 is served first and each later class gets only what the earlier ones left (strict
priority). Rates are recomputed whenever a flow starts or ends, and the next completion is scheduled as one SimPy
timeout, so the number of events grows with the number of flows, not with time.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass

import simpy

EPS = 1e-12


@dataclass
class Flow:
    fid: int
    links: tuple
    size: float
    remaining: float
    cls: int
    done: simpy.Event
    start: float
    tag: object = None
    rate: float = 0.0
    end: float | None = None


@dataclass(frozen=True)
class FlowRecord:
    start: float
    end: float
    size: float
    links: tuple
    cls: int
    tag: object


def maxmin(flows: dict[int, tuple], capacity: dict) -> dict[int, float]:
    """Max-min fair rates of flows (id -> links) over link capacities (link -> bytes/s), by progressive filling."""
    rates: dict[int, float] = {}
    remaining = dict(capacity)
    active = {f: links for f, links in flows.items() if links}
    for f, links in flows.items():
        if not links:
            rates[f] = float("inf")
    while active:
        count: dict = defaultdict(int)
        for links in active.values():
            for link in links:
                count[link] += 1
        share = min(max(remaining[link], 0.0) / n for link, n in count.items())
        tight = {link for link, n in count.items() if max(remaining[link], 0.0) / n <= share * (1 + 1e-9) + EPS}
        frozen = [f for f, links in active.items() if any(link in tight for link in links)]
        for f in frozen:
            rates[f] = share
            for link in active.pop(f):
                remaining[link] -= share
    return rates


class Network:
    def __init__(self, env: simpy.Environment, capacity: dict, record: bool = True):
        self.env = env
        self.capacity = dict(capacity)
        self.flows: dict[int, Flow] = {}
        self.records: list[FlowRecord] = []
        self.record = record
        self._ids = itertools.count()
        self._version = 0
        self._last = 0.0
        self.reallocations = 0
        self.link_rate_log: list[tuple[float, dict]] = []  # (time, {link: total rate}) at every change

    def transfer(self, links, nbytes: float, cls: int = 0, tag=None) -> simpy.Event:
        """Start a flow now; the returned event fires when its last byte arrives."""
        return self.transfer_many([(links, nbytes, tag)], cls)[0]

    def transfer_many(self, flows, cls: int = 0) -> list[simpy.Event]:
        """Start several flows ``(links, bytes, tag)`` at once, with one reallocation (a collective's ring step)."""
        events = []
        started = False
        for links, nbytes, tag in flows:
            links = tuple(links)
            for link in links:
                if link not in self.capacity:
                    raise KeyError(f"unknown link {link!r}")
            done = self.env.event()
            events.append(done)
            if nbytes <= 0:
                done.succeed()
                continue
            if not started:
                self._advance()
                started = True
            fid = next(self._ids)
            self.flows[fid] = Flow(fid, links, nbytes, nbytes, cls, done, self.env.now, tag)
        if started:
            self._reallocate()
        return events

    # -- internals ---------------------------------------------------------------------------------------------
    def _advance(self) -> None:
        dt = self.env.now - self._last
        if dt > 0:
            for f in self.flows.values():
                f.remaining -= f.rate * dt
        self._last = self.env.now

    def _reallocate(self) -> None:
        self.reallocations += 1
        left = dict(self.capacity)
        for cls in sorted({f.cls for f in self.flows.values()}):
            members = {fid: f.links for fid, f in self.flows.items() if f.cls == cls}
            rates = maxmin(members, left)
            for fid, r in rates.items():
                self.flows[fid].rate = r
                for link in self.flows[fid].links:
                    left[link] -= r
        if self.record:
            totals: dict = defaultdict(float)
            for f in self.flows.values():
                for link in f.links:
                    totals[link] += f.rate
            self.link_rate_log.append((self.env.now, dict(totals)))
        self._schedule()

    def _schedule(self) -> None:
        self._version += 1
        if not self.flows:
            return
        dt = min((f.remaining / f.rate if f.rate > 0 else float("inf")) for f in self.flows.values())
        if dt == float("inf"):
            raise RuntimeError("flows starved: every active flow has rate 0 (a link with zero capacity?)")
        version = self._version
        timer = self.env.timeout(max(dt, 0.0))
        timer.callbacks.append(lambda _ev, v=version: self._on_timer(v))

    def _on_timer(self, version: int) -> None:
        if version != self._version:
            return  # superseded by a later start or end
        self._advance()
        finished = [f for f in self.flows.values()
                    if f.remaining <= max(1e-9 * f.size, EPS) or (f.rate > 0 and f.remaining / f.rate < 1e-12)]
        for f in finished:
            del self.flows[f.fid]
            f.end = self.env.now
            if self.record:
                self.records.append(FlowRecord(f.start, f.end, f.size, f.links, f.cls, f.tag))
            f.done.succeed()
        self._reallocate()


def merge_intervals(spans) -> list[tuple[float, float]]:
    """Union of (start, end) intervals, sorted and merged where they touch."""
    merged: list[list[float]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1] + EPS:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]
