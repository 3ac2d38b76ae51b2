"""Checkpointing strategies: each turns a preset (and the trace's failure rate) into a :class:`Policy`.

A policy is one or two *tiers* of checkpoints. A tier takes a snapshot every ``interval_s`` of wall time; the
snapshot stalls training for ``stall_s`` and becomes usable for recovery ``complete_s`` after it was taken.
The memory tier (if any) holds ``replicas`` copies in CPU memory; the remote tier is persistent storage.
On a failure the replay recovers from the cheapest tier that still has the state (see :mod:`gemini_sim.replay.engine`).

The strategies (figures from the GEMINI paper, SOSP 2023, unless noted):

- ``strawman``: blocking checkpoint to remote storage every 3 hours, as BLOOM did.
- ``highfreq``: remote storage as often as its bandwidth allows (one checkpoint per remote write time); the copy
  off the GPU stalls training, the upload overlaps it.
- ``young-daly``: blocking remote checkpoints at Young/Daly's interval sqrt(2 * C * MTBF).
- ``async-remote``: snapshot to local CPU memory (stalls for the GPU-to-CPU copy), persist to remote storage in the
  background as fast as its bandwidth allows; a software or network failure recovers from the local snapshot
  (as DLRover's flash checkpoint and DCP's async_save do), a lost machine from remote storage.
- ``gemini``: checkpoint to the CPU memory of the machine and m-1 peers as often as every iteration (interval
  max(t_ckpt, t_iter), rounded up to whole iterations), traffic interleaved with training (no stall; the
  interleaving model quantifies the real overhead), persisted to remote storage every 3 hours from CPU memory;
  group placement, or mixed when m does not divide N. A lost machine is waited for: the job restarts once its
  replacement has come (the preset's ``replace_s``).
- ``gemini-continue``: ``gemini``, but a job that loses machines goes on at once on the machines left, its state
  resharded from their memory (the runtime's ``--on-loss continue``), at their share of the speed, and grows back
  when the replacements come ``replace_s`` later (one more restart, the state resharded again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

from gemini_sim.cluster.config import Preset
from gemini_sim.errors import name_list, unknown_name
from gemini_sim.placement import layouts as placement
from gemini_sim.placement.layouts import Placement


@dataclass(frozen=True)
class Tier:
    interval_s: float
    complete_s: float
    stall_s: float = 0.0


@dataclass(frozen=True)
class Policy:
    strategy: str
    remote: Tier
    memory: Tier | None = None
    replicas: int = 1  # copies in CPU memory; 1 means the local copy only
    placement: Placement | None = None  # where the copies live: built once here, used by every replay
    retrieve_local_s: float = 0.0
    retrieve_peer_s: float = 0.0
    retrieve_remote_s: float = 0.0
    description: str = ""
    on_loss: str = "wait"  # a lost machine: "wait" for its replacement, or "continue" on the machines left


def _round_to_iterations(seconds: float, t_iter: float) -> float:
    """The shortest whole number of iterations that lasts at least ``seconds`` (at least one); inf stays inf."""
    if math.isinf(seconds):
        return seconds
    return max(1, math.ceil(seconds / t_iter - 1e-9)) * t_iter


def _remote_only(p: Preset, name: str, interval_s: float, stall_s: float, description: str) -> Policy:
    return Policy(name, remote=Tier(interval_s, p.remote_write_s, stall_s),
                  retrieve_remote_s=p.remote_write_s, description=description)


def strawman(p: Preset, mtbf_s: float) -> Policy:
    return _remote_only(p, "strawman", p.storage.strawman_interval_hours * 3600, p.remote_write_s,
                        f"blocking remote checkpoint every {p.storage.strawman_interval_hours:g} h")


def highfreq(p: Preset, mtbf_s: float) -> Policy:
    interval = _round_to_iterations(p.remote_write_s, p.iteration_time_s)
    return _remote_only(p, "highfreq", interval, p.gpu_to_cpu_s,
                        f"remote checkpoint every {interval:.0f} s (bandwidth-bound)")


def young_daly(p: Preset, mtbf_s: float) -> Policy:
    c = p.remote_write_s
    interval = _round_to_iterations(max(c, math.sqrt(2 * c * mtbf_s)), p.iteration_time_s)
    return _remote_only(p, "young-daly", interval, c,
                        f"blocking remote checkpoint every {interval / 3600:.2f} h (sqrt(2 C MTBF))")


def async_remote(p: Preset, mtbf_s: float) -> Policy:
    interval = _round_to_iterations(p.remote_write_s, p.iteration_time_s)
    snap = p.gpu_to_cpu_s
    return Policy("async-remote", remote=Tier(interval, snap + p.remote_write_s, snap),
                  memory=Tier(interval, snap, 0.0), replicas=1,
                  retrieve_local_s=p.cpu_to_gpu_s, retrieve_remote_s=p.remote_write_s,
                  description=f"CPU snapshot + background upload every {interval:.0f} s")


def gemini(p: Preset, mtbf_s: float) -> Policy:
    m = p.recovery.replicas
    # Pipelined: the GPU-to-CPU copy of one chunk overlaps the network transfer of the previous one, and the m-1
    # peer copies share the machine's NIC.
    t_ckpt = max(p.gpu_to_cpu_s, (m - 1) * p.peer_transfer_s)
    interval = _round_to_iterations(max(t_ckpt, p.iteration_time_s), p.iteration_time_s)
    return memory_policy(p, interval, t_ckpt, 0.0, p.iteration_time_s)


def memory_policy(p: Preset, interval_s: float, complete_s: float, stall_s: float, t_iter: float,
                  name: str = "gemini", layout: Placement | None = None) -> Policy:
    """In-memory checkpoints on the machine and its m-1 peers (the preset's replicas and placement) every
    ``interval_s``, each usable ``complete_s`` after it starts and stalling training ``stall_s``; remote storage
    every ``gemini_persist_interval_hours`` from CPU memory. The optimizer fills these in from the interleaving
    simulation, and may pass the ``layout`` it built already (else it is built from the preset)."""
    m, n = p.recovery.replicas, p.cluster.machines
    if layout is None:
        layout = placement.for_preset(p, m, placement.resolve(p.recovery.placement, n, m))  # checks m against N
    elif (layout.machines, layout.replicas) != (n, m):
        raise ValueError(f"placement for {layout.machines} machines x {layout.replicas} does not fit {n} x {m}")
    persist = p.storage.gemini_persist_interval_hours * 3600
    return Policy(name, remote=Tier(persist, complete_s + p.remote_write_s, 0.0),
                  memory=Tier(interval_s, complete_s, stall_s), replicas=m, placement=layout,
                  retrieve_local_s=p.cpu_to_gpu_s, retrieve_peer_s=p.peer_transfer_s + p.cpu_to_gpu_s,
                  retrieve_remote_s=p.remote_write_s,
                  description=f"CPU memory x{m} ({layout.strategy}) every {interval_s / t_iter:.0f} iteration(s), "
                              f"remote every {p.storage.gemini_persist_interval_hours:g} h")


def gemini_continue(p: Preset, mtbf_s: float) -> Policy:
    pol = gemini(p, mtbf_s)
    return replace(pol, strategy="gemini-continue", on_loss="continue",
                   description=pol.description + "; goes on without lost machines until they are replaced")


STRATEGIES: dict[str, Callable[[Preset, float], Policy]] = {
    "strawman": strawman,
    "highfreq": highfreq,
    "young-daly": young_daly,
    "async-remote": async_remote,
    "gemini": gemini,
    "gemini-continue": gemini_continue,
}


def parse_names(text: str | None) -> list[str]:
    """Comma-separated strategy names (all when None), validated against the registry."""
    return name_list(text, STRATEGIES, "strategy")


def policy(name: str, preset: Preset, mtbf_s: float) -> Policy:
    if name not in STRATEGIES:
        raise unknown_name("strategy", name, STRATEGIES)
    return STRATEGIES[name](preset, mtbf_s)


def closed_form_wasted_per_failure_s(pol: Policy, tier: str = "storage") -> float:
    """GEMINI's expected wasted time per failure, t_ckpt + 1/(2f) + t_retrieve, for one tier of a policy.

    It assumes failures fall uniformly in the checkpoint cycle (MTBF much longer than the interval). The replay
    books the part of that window in which a blocking snapshot stalled training as checkpoint stall, so its lost
    progress + retrieval per failure equals this minus the tier's ``stall_s``.
    """
    t = pol.memory if tier != "storage" else pol.remote
    retrieve = {"storage": pol.retrieve_remote_s, "local": pol.retrieve_local_s, "peer": pol.retrieve_peer_s}[tier]
    return t.complete_s + t.interval_s / 2 + retrieve
