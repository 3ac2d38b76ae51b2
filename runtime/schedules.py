"""The schedules the runtime runs, one registry: when each chunk of a checkpoint may go on the network.

A schedule turns a checkpoint's chunks into *releases*: ``(r, offset, chunk indices, after_collectives)``, meaning
"these chunks may be sent once iteration ``r`` of the checkpoint's interval has reached ``offset``", where offset is
seconds from that iteration's start, or ``"backward"`` (when its backward pass ends), and ``after_collectives`` (if
not None) anchors the release to the end of that many of the rank's own training collectives instead of a time.

- ``blocking``: after the update, training waits while the whole checkpoint is copied and sent.
- ``naive``: everything is released when the next iteration starts, competing with training's collectives.
- ``gemini``: chunks go into the profiled idle spans of the iteration (``schedule.spans`` in the plan, with the
  bytes each span carries, for the whole machine); what does not fit goes when the backward pass ends. The local
  copy's hash and store commit wait for the first idle span, as they cost host CPU the collectives use.

The names are the Plan's vocabulary (``gemini_sim.plan.SCHEDULES``); the simulator's ``priority`` schedule needs
network priorities the runtime does not have, and a plan naming it is refused with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

Release = tuple[int, float | str, list[int], int | None]


@dataclass(frozen=True)
class Schedule:
    name: str
    blocking: bool  # training waits for the whole checkpoint right after the update
    defer_hash: bool  # the local copy's hash and commit wait for the first release
    releases: Callable[[list[tuple[int, int]], dict, int, int], list[Release]]


def _all_at_once(bounds, schedule, interval, ppm) -> list[Release]:
    return [(0, 0.0, list(range(len(bounds))), None)]


def _idle_spans(bounds, schedule, interval, ppm) -> list[Release]:
    if not schedule.get("spans"):
        return _all_at_once(bounds, schedule, interval, ppm)
    n = len(bounds)
    chunk = bounds[0][1] - bounds[0][0]
    out, k, planned = [], 0, 0.0
    for r in range(interval):  # the profiled idle spans of every iteration of the interval
        for span in schedule["spans"]:
            planned += span["bytes"] / ppm  # the plan's bytes are the machine's; this rank sends its share
            idx = []
            while k < n and bounds[k][1] <= planned + chunk / 2:  # the chunks nearest the plan
                idx.append(k)
                k += 1
            if idx:
                out.append((r, span["start_s"], idx, span.get("after_collectives")))
    if k < n:  # what did not fit goes when the interval's last backward pass ends
        out.append((interval - 1, "backward", list(range(k, n)), None))
    return out


SCHEDULES: dict[str, Schedule] = {
    "blocking": Schedule("blocking", blocking=True, defer_hash=False, releases=_all_at_once),
    "naive": Schedule("naive", blocking=False, defer_hash=False, releases=_all_at_once),
    "gemini": Schedule("gemini", blocking=False, defer_hash=True, releases=_idle_spans),
}

NOT_RUN = {"priority": "it needs network priorities (traffic classes) that gloo's TCP transport does not have"}


def get(name: str) -> Schedule:
    """The schedule ``name``; a one-line ``ValueError`` for one the runtime does not run."""
    if name in SCHEDULES:
        return SCHEDULES[name]
    why = NOT_RUN.get(name, "unknown schedule")
    raise ValueError(f"schedule {name!r} is not run by the runtime ({why}; it runs {', '.join(SCHEDULES)})")
