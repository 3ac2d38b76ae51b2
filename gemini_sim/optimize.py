"""The plan optimizer: search placement x replicas x schedule x checkpoint interval; score by replay.

For every candidate the interleaving simulation gives the iteration overhead and when the checkpoint is complete;
the replay of the failure trace then gives the expected wasted time, with the overhead counted as checkpoint stall.
Candidates whose overhead passes ``max_overhead_pct`` or whose checkpoints do not fit CPU memory are rejected.
The best plan is the feasible candidate with the least wasted time (ties: less overhead, then less memory).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from gemini_sim import interleave, plan as plan_mod
from gemini_sim.placement import layouts as placement_mod, survival as recovery
from gemini_sim.cluster.config import Preset
from gemini_sim.errors import UserError
from gemini_sim.replay.engine import replay
from gemini_sim.replay.policies import memory_policy
from gemini_sim.failures.traces import Trace
from gemini_sim.cluster.workload import Timeline


@dataclass(frozen=True)
class Candidate:
    placement: str
    replicas: int
    schedule: str
    interval_iters: int
    overhead_pct: float
    iteration_time_s: float
    checkpoint_complete_s: float
    memory_gb_per_machine: float
    wasted_hours: float
    gpu_hours_wasted: float
    recovery_probability_k2: float  # P(recover from CPU memory) with 2 machines failing at once
    feasible: bool
    reason: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    @property
    def key(self):
        """What the Pareto front trades off: expected waste, overhead, memory (all lower is better)."""
        return (self.wasted_hours, self.overhead_pct, self.memory_gb_per_machine)

    @property
    def rank(self):
        """The best plan's order: the Pareto key, then the higher probability of recovering from memory."""
        return self.key + (-self.recovery_probability_k2,)


@dataclass(frozen=True)
class OptimizeResult:
    best: Candidate
    candidates: tuple[Candidate, ...]
    pareto: tuple[Candidate, ...]
    plan: dict = field(repr=False)


def pareto_front(cands) -> list[Candidate]:
    """Candidates not dominated in (wasted hours, overhead, memory): nothing else is at least as good in all three
    and better in one."""
    out = []
    for c in cands:
        dominated = any(all(a <= b for a, b in zip(o.key, c.key)) and o.key != c.key for o in cands)
        if not dominated:
            out.append(c)
    return sorted(out, key=lambda c: c.key)


def _intervals(first: interleave.InterleaveResult, max_overhead: float, cap: int) -> list[int]:
    """Every iteration, and (when that costs too much) the smallest interval under the limit and twice it."""
    k = first.min_interval_iters
    ks = {1}
    if k and k > 1:
        ks |= {k, min(cap, 2 * k)}
    return sorted(ks)


PHASES = 4  # replays per candidate, each with the checkpoint cycles at a random phase


def optimize(preset: Preset, trace: Trace, max_overhead_pct: float = 1.0, *, processes_per_machine: int | None = None,
             schedules=None, placements=None, replicas=None, timeline: Timeline | None = None,
             buffer_bytes: float = 1 << 30, seed: int = 0, max_interval: int = 16, progress=None,
             config_sha256: str = "", trace_sha256: str = "", host_cpu_s=None,
             span_fill: float | None = None, hsdp: int | None = None) -> OptimizeResult:
    """``host_cpu_s(m)``: the CPU seconds a checkpoint with m replicas costs a rank on training's cores (the host cost
    model of a measured set-up, calibration.host_cpu_s; None: nothing). ``span_fill``: the gemini schedule's (None:
    1, the whole of each idle span). ``hsdp=R``: the job is HSDP with R replica groups of consecutive machines; the
    copies go where the replicas are (placement ``hsdp``), so each costs a rank's own part only, neither traffic nor
    memory (simulated as no copy on the network and one checkpoint in memory), and at most R copies are tried."""
    if max_overhead_pct < 0:
        raise UserError(f"--max-overhead must be >= 0, got {max_overhead_pct}")
    n = preset.cluster.machines
    ppm = preset.cluster.gpus_per_machine if processes_per_machine is None else processes_per_machine
    if ppm < 1:
        raise UserError(f"processes per machine must be >= 1, got {ppm}")
    schedules = list(schedules or interleave.SCHEDULES)
    placements = list(placements or placement_mod.PLACEMENTS)
    shard_gb = preset.checkpoint_bytes_per_machine / 1e9
    fit = max(1, min(n, int(preset.cluster.cpu_memory_gb // shard_gb))) if shard_gb > 0 else n
    if hsdp is not None:
        placement_mod.hsdp(n, 1, hsdp)  # a one-line error where the groups do not divide the machines
        fit = hsdp  # every copy but the own one is a replica's: one checkpoint in memory, whatever m
        placements = ["hsdp"]
    replica_options = sorted(set(replicas or range(1, min(4, fit) + 1)))
    if not replica_options or min(replica_options) > fit:
        raise UserError(f"no replica count fits: one checkpoint needs {shard_gb:.1f} GB per machine and "
                        f"'cluster.cpu_memory_gb' is {preset.cluster.cpu_memory_gb:g}")
    cands: list[Candidate] = []
    sims: dict = {}
    simulated: dict = {}  # (copies on the network, schedule) -> {interval: simulation}
    for m in replica_options:
        sent = 1 if hsdp is not None else m  # HSDP: no copy crosses the network
        for sched in schedules:
            if (sent, sched) not in simulated:
                simulated[(sent, sched)] = _simulate(preset, sent, sched, max_overhead_pct, max_interval, timeline,
                                                     buffer_bytes, seed, host_cpu_s, span_fill)
            for k, sim in simulated[(sent, sched)].items():
                sims[(m, sched, k)] = sim
            if progress:
                progress(1)
    built: dict = {}  # (strategy, m) -> (placement, P(recover | 2 failures)): built once for every schedule, k
    for (m, sched, k), sim in sims.items():
        layouts = ["none"] if m == 1 else [p for p in placements if not (p == "group" and n % m)]
        for strategy in layouts:
            if (strategy, m) not in built:
                pl = placement_mod.hsdp(n, m, hsdp) if strategy == "hsdp" else _placement(preset, strategy, m)
                built[(strategy, m)] = pl, recovery.probability(pl, min(2, n), samples=4000, seed=seed).probability
            pl, prob = built[(strategy, m)]
            cands.append(_score(preset, trace, m, sched, k, strategy, sim, max_overhead_pct, seed, prob, pl))
    feasible = [c for c in cands if c.feasible]
    if not feasible:
        low = min(cands, key=lambda c: c.overhead_pct)
        raise UserError(f"no plan meets --max-overhead {max_overhead_pct:g}%: the lowest overhead found is "
                        f"{low.overhead_pct:.3g}% ({low.schedule}, every {low.interval_iters} iterations, "
                        f"m={low.replicas})")
    best = min(feasible, key=lambda c: c.rank)
    sim = sims[(best.replicas, best.schedule, best.interval_iters)]
    pl = built[(best.placement, best.replicas)][0]
    predicted = {"wasted_hours": best.wasted_hours, "gpu_hours_wasted": best.gpu_hours_wasted,
                 "overhead_pct": best.overhead_pct, "iteration_time_s": sim.iteration_time_s,
                 "baseline_iteration_time_s": sim.baseline_iteration_time_s,
                 "checkpoint_time_s": sim.checkpoint_time_s,
                 "recovery_probability_k2": best.recovery_probability_k2, "trace": trace.name,
                 "trace_synthetic": trace.synthetic}
    the_plan = plan_for(preset, pl, sim, best.schedule, best.interval_iters, buffer_bytes, ppm, predicted,
                        span_fill=span_fill, config_sha256=config_sha256, trace_sha256=trace_sha256,
                        replica_groups=hsdp if pl.strategy == "hsdp" else None)
    plan_mod.validate(the_plan, "optimized plan")
    return OptimizeResult(best, tuple(cands), tuple(pareto_front([c for c in cands if c.reason != "memory"])),
                          the_plan)


def _simulate(preset: Preset, m: int, sched: str, max_overhead_pct: float, max_interval: int, timeline,
              buffer_bytes: float, seed: int, host_cpu_s, span_fill) -> dict:
    """Simulations of ``sched`` with ``m`` copies, by interval: every interval the overhead limit may allow."""
    cfg = interleave.InterleaveConfig(schedule=sched, replicas=m, buffer_bytes=buffer_bytes, seed=seed,
                                      host_cpu_s=host_cpu_s(m) if host_cpu_s else 0.0, span_fill=span_fill or 1.0)
    first = interleave.simulate(preset.with_replicas(m), cfg, timeline, threshold_pct=max(max_overhead_pct, 1e-6),
                                max_interval=max_interval)
    out = {}
    for k in _intervals(first, max_overhead_pct, max_interval):
        if k == 1:
            out[k] = first
        elif sched == "blocking":
            out[k] = _blocking_every(first, k)
        else:
            out[k] = interleave.simulate(preset.with_replicas(m), dataclasses.replace(cfg, interval=k), timeline,
                                         find_interval=False)
    return out


def plan_for(preset: Preset, pl, sim: interleave.InterleaveResult, schedule: str, interval: int,
             buffer_bytes: float, ppm: int, predicted: dict, span_fill: float | None = None,
             replica_groups: int | None = None, **provenance) -> dict:
    """The plan that runs a simulated configuration: placement ``pl``, ``schedule`` every ``interval`` iterations
    (gemini: the simulation's idle spans), persisting at the preset's GEMINI interval."""
    persist = max(1, round(preset.storage.gemini_persist_interval_hours * 3600 / sim.baseline_iteration_time_s))
    chunk = int(interleave.chunk_size(buffer_bytes, preset.checkpoint_bytes_per_machine))
    gemini = schedule == "gemini"
    return plan_mod.make(machines=preset.cluster.machines, processes_per_machine=ppm, placement_strategy=pl.strategy,
                         holders=pl.holders, schedule=schedule, chunk_bytes=max(1, chunk),
                         buffer_bytes=int(buffer_bytes), interval_iters=interval, persist_interval_iters=persist,
                         spans=sim.spans if gemini and sim.spans else None,
                         span_fill=span_fill if gemini else None, preset=preset.name, predicted=predicted,
                         replica_groups=replica_groups, **provenance)


def _blocking_every(first: interleave.InterleaveResult, k: int) -> interleave.InterleaveResult:
    """Blocking every k iterations: one stall, after the k-th update, amortized over the k iterations."""
    base = first.baseline_iteration_time_s
    stall = first.iteration_time_s - base
    return dataclasses.replace(first, interval=k, iteration_time_s=base + stall / k,
                               checkpoint_complete_s=(k - 1) * base + first.checkpoint_complete_s)


def _placement(preset: Preset, strategy: str, replicas: int):
    if replicas == 1:
        return placement_mod.build("group", preset.cluster.machines, 1)
    return placement_mod.for_preset(preset, replicas, strategy)


def _score(preset, trace, m, sched, k, strategy, sim, max_overhead, seed, prob: float, pl) -> Candidate:
    shard_gb = preset.checkpoint_bytes_per_machine / 1e9
    memory = max(placement_mod.memory_bytes(pl, shard_gb)) if m > 1 else shard_gb  # HSDP replicas' copies: ~0
    p = preset.with_replicas(m)
    if strategy != "none":
        p = dataclasses.replace(p, recovery=dataclasses.replace(p.recovery, placement=strategy))
    t_iter = sim.baseline_iteration_time_s
    period = k * t_iter
    stall = k * (sim.iteration_time_s - t_iter)
    pol = memory_policy(p, period + stall, max(sim.checkpoint_complete_s, 1e-9), stall, t_iter,
                        name=f"{sched}/{strategy}/m{m}/k{k}", layout=pl)
    runs = [replay(trace, p, pol, seed=seed + i, random_phase=True) for i in range(PHASES)]
    wasted = sum(r.wasted_hours for r in runs) / PHASES
    gpu_hours = sum(r.gpu_hours_wasted for r in runs) / PHASES
    reason = ""
    if memory > preset.cluster.cpu_memory_gb:
        reason = "memory"
    elif sim.overhead_pct > max_overhead + 1e-9:
        reason = "overhead"
    return Candidate(strategy, m, sched, k, sim.overhead_pct, sim.iteration_time_s, sim.checkpoint_complete_s,
                     memory, wasted, gpu_hours, prob, not reason, reason)


def table_rows(cands) -> list[list]:
    return [[c.placement, c.replicas, c.schedule, c.interval_iters, f"{c.overhead_pct:.3f}%",
             f"{c.memory_gb_per_machine:.0f}", f"{c.wasted_hours:.3f}", f"{c.recovery_probability_k2:.4f}",
             "yes" if c.feasible else f"no ({c.reason})"] for c in cands]


TABLE_HEADERS = ["placement", "m", "schedule", "interval", "overhead", "mem GB", "wasted h", "P(rec|k=2)", "feasible"]


def plot_pareto(result: OptimizeResult, ax=None, title: str = ""):
    from gemini_sim.report import figure

    fig, ax = figure(ax, (7, 4.5))
    cands = result.candidates
    sc = ax.scatter([c.overhead_pct for c in cands], [c.wasted_hours for c in cands],
                    c=[c.memory_gb_per_machine for c in cands], cmap="viridis", s=22, alpha=0.8)
    front = result.pareto
    ax.plot([c.overhead_pct for c in front], [c.wasted_hours for c in front], "r-", lw=1, label="Pareto front")
    ax.scatter([result.best.overhead_pct], [result.best.wasted_hours], marker="*", s=220, color="red",
               label=f"best: {result.best.schedule}, {result.best.placement}, m={result.best.replicas}, "
                     f"every {result.best.interval_iters}")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("iteration overhead (%)")
    ax.set_ylabel("expected wasted hours (replay)")
    ax.set_title(title or "Plan candidates")
    ax.legend(fontsize=7)
    fig.colorbar(sc, ax=ax, label="CPU memory per machine (GB)")
    return fig
