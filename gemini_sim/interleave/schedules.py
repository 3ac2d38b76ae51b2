"""The schedules (registry :data:`SCHEDULES`; add a schedule here): when each machine's chunks are released into the
iteration being played (``it``: the model's iteration, runtime of its pipelines).

- ``blocking``: after the update, training waits while the whole checkpoint is copied and sent.
- ``naive``: every chunk is released at the start of the iteration and competes with training traffic.
- ``gemini``: chunks go into the idle NIC spans of a profiling run, as planned by planner.py; what does not fit is
  released when the backward pass ends.
- ``priority`` (ours): every chunk is released at the start, in a lower strict-priority class, so it only uses
  bandwidth that training leaves; needs no profile and adapts when the timeline drifts from the profile.

The names are the Plan's vocabulary (``gemini_sim.plan.SCHEDULES``).
"""

from __future__ import annotations

from gemini_sim.interleave.model import CKPT, TRAIN, _Iteration


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
