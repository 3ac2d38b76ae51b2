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
_ACTIVE = ("start", "size", "first", "cls", "kind", "owner", "rem", "rate", "group")  # of a flow in flight


def _empty(columns) -> dict[str, np.ndarray]:
    return {c: np.zeros(0, dtype=float if c in ("start", "end", "size", "rem", "rate") else np.intp) for c in columns}


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
        self.last_end: dict[str, float] = {}  # kind -> when its last flow ended (kept even without ``record``)
        self.reallocations = 0
        self.link_rate_log: list[tuple[float, dict]] = []  # (time, {link: total rate}) at every change
        # The active flows, one entry per flow in each array, and their link incidences.
        self._a = _empty(_ACTIVE)
        self._inc_flow = np.zeros(0, dtype=np.intp)
        self._inc_link = np.zeros(0, dtype=np.intp)
        self._new: list = []  # groups started at this instant, not yet in the arrays
        self._groups: dict[int, list] = {}  # group -> [flows not finished, done event]
        self._next_group = 0
        self._done: list[dict] = []  # finished flows, in batches of arrays
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
        the last of them has arrived. ``kind`` and ``owners`` (one number per flow, default its position) label
        the flows in :meth:`finished`."""
        done = self.env.event()
        n = paths.count
        sizes = np.broadcast_to(np.asarray(sizes, dtype=float), (n,))
        keep = sizes > 0
        if not keep.any():
            done.succeed()
            return done
        if kind not in self.kinds:
            self.kinds.append(kind)
        owners = np.arange(n, dtype=np.intp) if owners is None else np.broadcast_to(np.asarray(owners, np.intp), (n,))
        flow_of, link_of = paths.flow_of, paths.link_of
        if not keep.all():  # empty flows are done at once
            new_index = np.cumsum(keep) - 1
            inc = keep[flow_of]
            flow_of, link_of = new_index[flow_of[inc]], link_of[inc]
        group = self._next_group
        self._next_group += 1
        k = int(keep.sum())
        self._groups[group] = [k, done]
        self._new.append(({"start": np.full(k, self.env.now), "size": sizes[keep].copy(),
                           "first": paths.first[keep], "cls": np.full(k, cls, dtype=np.intp),
                           "kind": np.full(k, self.kinds.index(kind), dtype=np.intp), "owner": owners[keep],
                           "rem": sizes[keep].copy(), "rate": np.zeros(k), "group": np.full(k, group, dtype=np.intp)},
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
            return _empty(_COLUMNS)
        return {c: np.concatenate([d[c] for d in self._done]) for c in _COLUMNS}

    # -- internals ---------------------------------------------------------------------------------------------
    def _advance(self) -> None:
        dt = self.env.now - self._last
        if dt > 0 and len(self._a["rem"]):
            self._a["rem"] -= self._a["rate"] * dt
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
        if not self._new:
            return
        base = len(self._a["rem"])
        arrays, flow_ofs, link_ofs = [self._a], [self._inc_flow], [self._inc_link]
        for cols, flow_of, link_of in self._new:
            arrays.append(cols)
            flow_ofs.append(flow_of + base)
            link_ofs.append(link_of)
            base += len(cols["rem"])
        self._a = {c: np.concatenate([a[c] for a in arrays]) for c in self._a}
        self._inc_flow = np.concatenate(flow_ofs)
        self._inc_link = np.concatenate(link_ofs)
        self._new = []

    def _reallocate(self) -> None:
        self.reallocations += 1
        self._take_new()
        a = self._a
        left = self.cap.copy()
        rates = np.zeros(len(a["rem"]))
        inc_cls = a["cls"][self._inc_flow]
        for cls in np.unique(a["cls"]):
            sel = inc_cls == cls
            flow_of, link_of = self._inc_flow[sel], self._inc_link[sel]
            r = fill(flow_of, link_of, len(rates), left)
            mine = a["cls"] == cls
            rates[mine] = r[mine]
            left -= np.bincount(link_of, weights=r[flow_of], minlength=len(left))
        a["rate"] = rates
        if self.rate_log:
            totals = np.bincount(self._inc_link, weights=rates[self._inc_flow], minlength=len(self.links))
            self.link_rate_log.append((self.env.now, {self.links[i]: float(totals[i]) for i in np.flatnonzero(totals)}))
        self._schedule()

    def _schedule(self) -> None:
        self._version += 1
        a = self._a
        if not len(a["rem"]):
            return
        with np.errstate(divide="ignore", invalid="ignore"):
            left_s = np.where(a["rate"] > 0, a["rem"] / a["rate"], np.inf)
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
        a = self._a
        with np.errstate(divide="ignore", invalid="ignore"):
            finished = (a["rem"] <= np.maximum(1e-9 * a["size"], EPS)) | \
                ((a["rate"] > 0) & (a["rem"] / a["rate"] < 1e-12))
        if finished.any():
            for k in np.unique(a["kind"][finished]).tolist():
                self.last_end[self.kinds[k]] = self.env.now
            if self.record:
                done = {c: a[c][finished] for c in _COLUMNS if c != "end"}
                self._done.append(done | {"end": np.full(int(finished.sum()), self.env.now)})
            groups, counts = np.unique(a["group"][finished], return_counts=True)
            keep = ~finished
            new_index = np.cumsum(keep) - 1
            inc = keep[self._inc_flow]
            self._inc_flow = new_index[self._inc_flow[inc]]
            self._inc_link = self._inc_link[inc]
            self._a = {c: v[keep] for c, v in a.items()}
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
