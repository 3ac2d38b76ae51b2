"""Flow-level network simulation in SimPy.

A :class:`Network` owns directed links with capacities (bytes/s). A flow is a number of bytes sent along a path of
links. Active flows share links by max-min fairness, computed by progressive filling, class by class: with
priority classes, class 0 is served first and each later class gets only what the earlier ones left (strict
priority). Rates are recomputed once per simulated instant in which flows start or end (all the flows that a
collective's ring step or a thousand machines' chunk sends start at one instant share one recomputation), and the
next completion is scheduled as one SimPy timeout, so the number of events grows with the number of distinct
instants, not with time or with the number of machines.

Flows start in groups (:meth:`Network.transfer_group`: a collective's N ring flows, a chunk's m-1 copies) with one
SimPy event for the whole group; the active flows live in numpy arrays, and progressive filling is vectorised over
the flow-link incidence (:func:`fill`): each round costs one pass over the incidences, and there are as many rounds
as distinct bottleneck levels. Nothing is done per flow in Python, so a 2048-machine ring costs about what a
16-machine one does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import simpy

EPS = 1e-12


def fill(flow_of: np.ndarray, link_of: np.ndarray, flows: int, capacity: np.ndarray) -> np.ndarray:
    """Max-min fair rates by progressive filling. The k-th incidence says flow ``flow_of[k]`` crosses link
    ``link_of[k]``; ``capacity[l]`` is what link l has left. A flow without links gets an infinite rate."""
    rates = np.full(flows, np.inf)
    rem = capacity.astype(float).copy()
    live = np.ones(len(flow_of), dtype=bool)
    frozen = np.zeros(flows, dtype=bool)
    while live.any():
        count = np.bincount(link_of[live], minlength=len(rem))
        used = count > 0
        share = np.full(len(rem), np.inf)
        share[used] = np.maximum(rem[used], 0.0) / count[used]
        level = share.min()
        tight = share <= level * (1 + 1e-9) + EPS
        frozen[:] = False
        frozen[flow_of[live & tight[link_of]]] = True  # every flow that crosses a tight link stops growing here
        rates[frozen] = level
        done = live & frozen[flow_of]
        rem -= np.bincount(link_of[done], minlength=len(rem)) * level
        live &= ~done
    return rates


def maxmin(flows: dict, capacity: dict) -> dict:
    """Max-min fair rates of flows (id -> links) over link capacities (link -> bytes/s)."""
    links = list(capacity)
    at = {link: i for i, link in enumerate(links)}
    ids = list(flows)
    flow_of = np.array([k for k, f in enumerate(ids) for _ in flows[f]], dtype=np.intp)
    link_of = np.array([at[link] for f in ids for link in flows[f]], dtype=np.intp)
    rates = fill(flow_of, link_of, len(ids), np.array([capacity[link] for link in links], dtype=float))
    return {f: float(r) for f, r in zip(ids, rates)}


@dataclass(frozen=True)
class Paths:
    """The link paths of a group of flows, as indices into a network's links; build once with
    :meth:`Network.paths`, reuse for every group with the same paths (every step of a ring, say)."""

    flow_of: np.ndarray  # incidence k: flow flow_of[k] ...
    link_of: np.ndarray  # ... crosses link link_of[k]
    first: np.ndarray  # each flow's first link (-1 if it has none)

    @property
    def count(self) -> int:
        return len(self.first)


_COLUMNS = ("start", "end", "size", "first", "cls", "kind", "owner")  # of a finished flow
# A flow in flight is a row of two arrays: its numbers (start, size, bytes left, rate) and its labels.
START, SIZE, REM, RATE = range(4)
FIRST, CLS, KIND, OWNER, GROUP = range(5)


class _Started(NamedTuple):
    """A group of flows started by :meth:`Network.transfer_group`, before it joins the active arrays."""

    count: int
    start: float
    size: float | np.ndarray  # one for all, or one per flow
    first: np.ndarray
    cls: int
    kind: int
    owners: int | np.ndarray | None  # one for all, one per flow, or None: each flow's position
    group: int
    flow_of: np.ndarray
    link_of: np.ndarray


def _empty() -> dict[str, np.ndarray]:
    return {c: np.zeros(0, dtype=float if c in ("start", "end", "size") else np.intp) for c in _COLUMNS}


class Network:
    """Links with capacities and the flows on them. ``record``: keep every finished flow (:meth:`finished`);
    ``rate_log``: keep every link's total rate after each recomputation (for plots; memory grows with links times
    recomputations, so large simulations leave it off)."""

    def __init__(self, env: simpy.Environment, capacity: dict, record: bool = True, rate_log: bool = True):
        self.env = env
        self.capacity = dict(capacity)
        self.links = list(self.capacity)
        self.link_index = {link: i for i, link in enumerate(self.links)}
        self.cap = np.array([self.capacity[link] for link in self.links], dtype=float)
        self.record = record
        self.rate_log = rate_log
        self.kinds: list[str] = []  # kind names; flows carry their index
        self._kind_index: dict[str, int] = {}
        self.last_end: dict[str, float] = {}  # kind -> when its last flow ended (kept even without ``record``)
        self.reallocations = 0
        self.link_rate_log: list[tuple[float, dict]] = []  # (time, {link: total rate}) at every change
        # The active flows, a row each in both arrays (columns START.. and FIRST..), and their link incidences.
        self._f = np.zeros((0, 4))
        self._i = np.zeros((0, 5), dtype=np.intp)
        self._inc_flow = np.zeros(0, dtype=np.intp)
        self._inc_link = np.zeros(0, dtype=np.intp)
        self._new: list = []  # groups started at this instant, not yet in the arrays (transfer_group's tuples)
        self._groups: dict[int, list] = {}  # group -> [flows not finished, done event]
        self._next_group = 0
        self._done: list[tuple] = []  # finished flows, in batches: (rows of _f, rows of _i, end time)
        self._version = 0
        self._last = 0.0
        self._pending = False  # a recomputation is due at the end of this instant

    # -- starting flows ------------------------------------------------------------------------------------------
    def paths(self, paths) -> Paths:
        """The incidence of a list of link paths (each a sequence of links)."""
        try:
            index = [[self.link_index[link] for link in path] for path in paths]
        except KeyError as exc:
            raise KeyError(f"unknown link {exc.args[0]!r}") from None
        lengths = [len(p) for p in index]
        return Paths(np.repeat(np.arange(len(index), dtype=np.intp), lengths),
                     np.fromiter((i for p in index for i in p), dtype=np.intp, count=sum(lengths)),
                     np.array([p[0] if p else -1 for p in index], dtype=np.intp))

    def transfer_group(self, paths: Paths, sizes, cls: int = 0, kind: str = "", owners=None) -> simpy.Event:
        """Start one flow per path now, of ``sizes`` bytes (one number for all, or one each); the event fires when
        the last of them has arrived. ``kind`` and ``owners`` (one number for all, or one per flow; default each
        flow's position) label the flows in :meth:`finished`.

        Called once per ring step or chunk, so it only notes the group: the arrays of every group started at this
        instant are built together when the rates are recomputed (:meth:`_take_new`)."""
        done = self.env.event()
        n = paths.count
        first, flow_of, link_of = paths.first, paths.flow_of, paths.link_of
        if np.ndim(sizes) == 0:
            size = float(sizes)
            if size <= 0 or not n:
                return done.succeed()
        else:
            size = np.asarray(sizes, dtype=float)
            if size.shape != (n,):
                raise ValueError(f"{len(size)} sizes for {n} flows")
            keep = size > 0
            if not keep.all():  # empty flows are done at once
                if not keep.any():
                    return done.succeed()
                new_index = np.cumsum(keep) - 1
                inc = keep[flow_of]
                flow_of, link_of, first, size = new_index[flow_of[inc]], link_of[inc], first[keep], size[keep]
                if owners is None:
                    owners = np.flatnonzero(keep)
                elif np.ndim(owners):
                    owners = np.asarray(owners, dtype=np.intp)[keep]
        if owners is not None and np.ndim(owners) == 0:
            owners = int(owners)
        if kind not in self._kind_index:
            self._kind_index[kind] = len(self.kinds)
            self.kinds.append(kind)
        group = self._next_group
        self._next_group += 1
        k = len(first)
        self._groups[group] = [k, done]
        self._new.append(_Started(k, self.env.now, size, first, cls, self._kind_index[kind], owners, group,
                                  flow_of, link_of))
        self._advance()
        self._request()
        return done

    def transfer(self, links, nbytes: float, cls: int = 0, kind: str = "", owner: int = 0) -> simpy.Event:
        """Start one flow now; the returned event fires when its last byte arrives."""
        return self.transfer_group(self.paths([links]), nbytes, cls, kind, owner)

    # -- what happened -------------------------------------------------------------------------------------------
    def finished(self) -> dict[str, np.ndarray]:
        """Every finished flow (when ``record``): arrays ``start``, ``end``, ``size``, ``first`` (index of its first
        link in :attr:`links`), ``cls``, ``kind`` (index in :attr:`kinds`) and ``owner``, in order of completion."""
        if not self._done:
            return _empty()
        f = np.concatenate([d[0] for d in self._done])
        i = np.concatenate([d[1] for d in self._done])
        end = np.repeat([d[2] for d in self._done], [len(d[0]) for d in self._done])
        return {"start": f[:, START], "end": end, "size": f[:, SIZE], "first": i[:, FIRST], "cls": i[:, CLS],
                "kind": i[:, KIND], "owner": i[:, OWNER]}

    # -- internals ---------------------------------------------------------------------------------------------
    def _advance(self) -> None:
        dt = self.env.now - self._last
        if dt > 0 and len(self._f):
            self._f[:, REM] -= self._f[:, RATE] * dt
        self._last = self.env.now

    def _request(self) -> None:
        """Recompute the rates once, after everything else that happens at this instant."""
        if self._pending:
            return
        self._pending = True
        self._version += 1  # the scheduled completion, if any, is stale now
        self._defer()

    def _defer(self) -> None:
        ev = self.env.event()
        ev.callbacks.append(self._at_end_of_instant)
        ev.succeed()

    def _at_end_of_instant(self, _ev) -> None:
        if self.env.peek() <= self.env.now:  # other events at this instant may still start or end flows
            self._defer()
            return
        self._pending = False
        self._reallocate()

    def _take_new(self) -> None:
        """Append the groups started since the last recomputation to the active arrays, all in one go."""
        if not self._new:
            return
        new, self._new = self._new, []
        counts = np.array([g.count for g in new], dtype=np.intp)
        offsets = np.concatenate(([0], np.cumsum(counts)[:-1]))
        total, base = int(counts.sum()), len(self._f)

        def each(values, dtype=None):  # one value per group, repeated for its flows
            return np.repeat(np.array(values, dtype=dtype), counts)

        f = np.zeros((total, 4))
        f[:, START] = each([g.start for g in new], float)
        f[:, SIZE] = each([g.size if isinstance(g.size, float) else 0.0 for g in new], float)
        i = np.empty((total, 5), dtype=np.intp)
        i[:, FIRST] = np.concatenate([g.first for g in new])
        i[:, CLS] = each([g.cls for g in new], np.intp)
        i[:, KIND] = each([g.kind for g in new], np.intp)
        i[:, GROUP] = each([g.group for g in new], np.intp)
        i[:, OWNER] = np.arange(total, dtype=np.intp) - np.repeat(offsets, counts)  # default: the position in the group
        for g, at in zip(new, offsets.tolist()):  # groups with sizes of their own, or owners
            if not isinstance(g.size, float):
                f[at:at + g.count, SIZE] = g.size
            if g.owners is not None:
                i[at:at + g.count, OWNER] = g.owners
        f[:, REM] = f[:, SIZE]
        self._f = np.concatenate((self._f, f))
        self._i = np.concatenate((self._i, i))
        flow_of = np.concatenate([g.flow_of for g in new]) + np.repeat(offsets + base, [len(g.flow_of) for g in new])
        self._inc_flow = np.concatenate((self._inc_flow, flow_of))
        self._inc_link = np.concatenate([self._inc_link] + [g.link_of for g in new])

    def _reallocate(self) -> None:
        self.reallocations += 1
        self._take_new()
        cls = self._i[:, CLS]
        if not len(cls):
            rates = np.zeros(0)
        elif cls.min() == cls.max():  # one class: plain max-min fairness
            rates = fill(self._inc_flow, self._inc_link, len(cls), self.cap)
        else:  # strict priority: each class shares what the classes before it left
            left = self.cap.copy()
            rates = np.zeros(len(cls))
            inc_cls = cls[self._inc_flow]
            for c in range(int(cls.min()), int(cls.max()) + 1):
                sel = inc_cls == c
                if not sel.any():
                    continue
                flow_of, link_of = self._inc_flow[sel], self._inc_link[sel]
                r = fill(flow_of, link_of, len(rates), left)
                mine = cls == c
                rates[mine] = r[mine]
                left -= np.bincount(link_of, weights=r[flow_of], minlength=len(left))
        self._f[:, RATE] = rates
        if self.rate_log:
            totals = np.bincount(self._inc_link, weights=rates[self._inc_flow], minlength=len(self.links))
            self.link_rate_log.append((self.env.now, {self.links[i]: float(totals[i]) for i in np.flatnonzero(totals)}))
        self._schedule()

    def _schedule(self) -> None:
        self._version += 1
        if not len(self._f):
            return
        rem, rate = self._f[:, REM], self._f[:, RATE]
        with np.errstate(divide="ignore", invalid="ignore"):
            left_s = np.where(rate > 0, rem / rate, np.inf)
        dt = float(left_s.min())
        if dt == float("inf"):
            raise RuntimeError("flows starved: every active flow has rate 0 (a link with zero capacity?)")
        version = self._version
        timer = self.env.timeout(max(dt, 0.0))
        timer.callbacks.append(lambda _ev, v=version: self._on_timer(v))

    def _on_timer(self, version: int) -> None:
        if version != self._version:
            return  # superseded by a later start or end
        self._advance()
        f, i = self._f, self._i
        rem, rate = f[:, REM], f[:, RATE]
        with np.errstate(divide="ignore", invalid="ignore"):
            finished = (rem <= np.maximum(1e-9 * f[:, SIZE], EPS)) | ((rate > 0) & (rem / rate < 1e-12))
        if finished.any():
            done_i = i[finished]
            for k in np.flatnonzero(np.bincount(done_i[:, KIND], minlength=len(self.kinds))).tolist():
                self.last_end[self.kinds[k]] = self.env.now
            if self.record:
                self._done.append((f[finished], done_i, self.env.now))
            keep = ~finished
            new_index = np.cumsum(keep) - 1
            inc = keep[self._inc_flow]
            self._inc_flow = new_index[self._inc_flow[inc]]
            self._inc_link = self._inc_link[inc]
            self._f, self._i = f[keep], i[keep]
            groups, counts = np.unique(done_i[:, GROUP], return_counts=True)
            for g, c in zip(groups.tolist(), counts.tolist()):
                entry = self._groups[g]
                entry[0] -= c
                if entry[0] == 0:
                    del self._groups[g]
                    entry[1].succeed()
        self._request()


def merge_intervals(groups: np.ndarray, starts: np.ndarray, ends: np.ndarray):
    """The union of intervals within each group, vectorised: arrays (group, start, end) of the merged intervals,
    sorted by group and start; intervals that overlap or touch merge."""
    if not len(starts):
        return groups[:0], starts[:0], ends[:0]
    _, rank = np.unique(groups, return_inverse=True)
    order = np.lexsort((starts, rank))
    g, r, s, e = groups[order], rank[order], starts[order], ends[order]
    shift = r * (float(e.max() - s.min()) + 1.0)  # lifts each group above the last: running maxima restart
    reach = np.maximum.accumulate(e + shift) - shift  # the furthest end so far within the group
    first = np.ones(len(s), dtype=bool)
    first[1:] = (r[1:] != r[:-1]) | (s[1:] > reach[:-1] + EPS)
    at = np.flatnonzero(first)
    return g[at], s[at], np.maximum.reduceat(e, at)
