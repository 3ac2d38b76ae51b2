"""Tables, JSON reports and plots of replay results."""

from __future__ import annotations

import numpy as np

from gemini_sim.cluster.config import Preset
from gemini_sim.replay.engine import ReplayResult
from gemini_sim.failures.traces import KINDS, Trace

COMPONENTS = (("lost_s", "lost progress"), ("retrieval_s", "retrieval"), ("stall_s", "checkpoint stalls"),
              ("restart_s", "restart/replace"), ("degraded_s", "fewer machines"))
KIND_COLORS = {"hardware": "tab:red", "software": "tab:blue", "network": "tab:green", "unknown": "tab:gray"}


def format_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A plain-text table; ``align`` has one 'l' or 'r' per column (default: first left, rest right)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align))
    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def replay_table(results: list[ReplayResult]) -> str:
    rows = []
    for r in results:
        t = r.tier_counts()
        rows.append([r.strategy, r.failures, f"{r.wasted_hours:.2f}", f"{r.gpu_hours_wasted:,.0f}",
                     *(f"{getattr(r, k) / 3600:.2f}" for k, _ in COMPONENTS),
                     f"{100 * r.effective_fraction:.2f}%", f"{t['local']}/{t['peer']}/{t['storage']}"])
    return format_table(["strategy", "failures", "wasted h", "GPU-h wasted", "lost h", "retrieval h", "stall h",
                         "restart h", "degraded h", "effective", "local/peer/storage"], rows)


def header_lines(trace: Trace, preset: Preset) -> list[str]:
    s = preset.summary()
    kinds = ", ".join(f"{n} {k}" for k, n in trace.kind_counts().items() if n)
    label = "SYNTHETIC trace" if trace.synthetic else "trace"
    lines = [
        f"{label} {trace.name}: {len(trace.events)} failures ({kinds}) over {trace.duration_h:g} h"
        + (f" [{trace.description}]" if trace.synthetic and trace.description else ""),
        f"preset {preset.name}: {s['machines']} machines, {s['gpus']} GPUs, {s['model']} "
        f"({s['parameters'] / 1e9:g}B params), checkpoint {s['checkpoint_gb']:.0f} GB "
        f"({s['checkpoint_gb_per_machine']:.1f} GB/machine), iteration {s['iteration_time_s']:.2f} s, "
        f"remote write {s['remote_write_s']:.0f} s",
    ]
    if trace.source_machines and trace.source_machines != preset.cluster.machines:
        lines.append(f"note: the trace comes from a {trace.source_machines}-machine run; failure times are replayed "
                     f"as recorded on this {preset.cluster.machines}-machine cluster")
    return lines


def replay_report(trace: Trace, preset: Preset, results: list[ReplayResult], seed: int) -> dict:
    return {
        "trace": {"name": trace.name, "failures": len(trace.events), "duration_hours": trace.duration_h,
                  "synthetic": trace.synthetic, "description": trace.description,
                  "kinds": trace.kind_counts(), "source_machines": trace.source_machines},
        "preset": preset.summary(),
        "seed": seed,
        "strategies": [r.as_dict() for r in results],
    }


def figure(ax, size):
    """The axes to draw on: the caller's, or a new figure's. Returns (figure, axes)."""
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure  # here, not at the top: matplotlib costs every command 0.4 s to import

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def plot_breakdown(results: list[ReplayResult], ax=None, title: str = ""):
    """Stacked bars: wasted hours per strategy, split into components."""
    fig, ax = figure(ax, (7, 4))
    names = [r.strategy for r in results]
    bottom = np.zeros(len(results))
    for key, label in COMPONENTS:
        vals = np.array([getattr(r, key) / 3600 for r in results])
        ax.bar(names, vals, bottom=bottom, label=label)
        bottom += vals
    for i, total in enumerate(bottom):
        ax.annotate(f"{total:.1f}", (i, total), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("wasted hours")
    ax.set_title(title or "Wasted time by strategy")
    ax.legend(fontsize=8)
    return fig


def cumulative_wasted(result: ReplayResult) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative wasted hours against job hours: failure costs as steps, checkpoint stalls and time on fewer
    machines spread evenly."""
    horizon_h = result.horizon_s / 3600
    t = np.array([0.0] + [o.time_h for o in result.outcomes] + [horizon_h])
    steps = np.cumsum([0.0] + [(o.lost_s + o.retrieval_s + o.restart_s) / 3600 for o in result.outcomes] + [0.0])
    stall_rate = (result.stall_s + result.degraded_s) / 3600 / horizon_h if horizon_h else 0.0
    return t, steps + stall_rate * t


def plot_cumulative(results: list[ReplayResult], ax=None, title: str = ""):
    fig, ax = figure(ax, (7, 4))
    for r in results:
        t, w = cumulative_wasted(r)
        ax.step(t, w, where="post", label=r.strategy)
    ax.set_xlabel("job time (hours)")
    ax.set_ylabel("cumulative wasted hours")
    ax.set_title(title or "Wasted time over the trace")
    ax.legend(fontsize=8)
    return fig


def plot_trace(trace: Trace, ax=None):
    """Failures over time: one marker per failure, by kind, height = machines lost."""
    fig, ax = figure(ax, (7, 2.8))
    for kind in KINDS:
        ev = [e for e in trace.events if e.kind == kind]
        if ev:
            ax.scatter([e.time_h for e in ev], [e.machines for e in ev], label=kind, color=KIND_COLORS[kind], s=18)
    ax.set_xlim(0, trace.duration_h if trace.duration_h > 0 else 1.0)  # a trace of 0 h: an axis still
    ax.set_yscale("log")
    ax.set_xlabel("job time (hours)")
    ax.set_ylabel("machines lost")
    ax.set_title(f"{'Synthetic' if trace.synthetic else 'Real'} trace {trace.name}: {len(trace.events)} failures")
    ax.legend(fontsize=8)
    return fig


def plot_gantt(result, machines: int = 4, ax=None, title: str = ""):
    """Gantt chart of simulated iterations: compute, training collectives and checkpoint traffic per machine."""
    fig, ax = figure(ax, (11, 1.0 + 0.9 * min(machines, result.machines)))
    run, tl = result.run, result.timeline
    per = len(tl.ops)
    compute = [(a, b - a) for i, a, b in run.op_spans if tl.ops[i % per].stream == "compute" and b > a]
    shown = list(range(min(machines, result.machines)))
    rows = []
    for m in shown:
        train, d2h, net = ([(a, b - a) for a, b in run.spans(kind, m)] for kind in ("train", "d2h", "ckpt"))
        rows += [(f"m{m} compute", compute, "tab:green"), (f"m{m} collectives", train, "tab:blue"),
                 (f"m{m} ckpt GPU->CPU", d2h, "tab:orange"), (f"m{m} ckpt send", net, "tab:red")]
    for y, (label, bars, color) in enumerate(reversed(rows)):
        ax.broken_barh(bars, (y + 0.1, 0.8), facecolors=color)
    ax.set_yticks([y + 0.5 for y in range(len(rows))], [r[0] for r in reversed(rows)], fontsize=7)
    upd = [a for i, a, b in run.op_spans if i % per == tl.update]
    for u in upd:
        ax.axvline(u, color="k", lw=0.8, ls=":")
    ax.set_xlabel("time (s)")
    ax.set_title(title or f"{result.schedule}: {result.interval} iteration(s), overhead {result.overhead_pct:.2f}%, "
                          f"checkpoint done at {result.checkpoint_complete_s:.2f} s")
    return fig


def plot_link_utilization(result, machine: int = 0, ax=None):
    """Share of machine ``machine``'s NIC (egress) bandwidth in use over time."""
    fig, ax = figure(ax, (9, 2.5))
    log = result.run.link_rate_log
    if not log:  # large simulations do not keep the rate log (RATE_LOG_MACHINES)
        ax.text(0.5, 0.5, "no rate log (large simulation)", ha="center", transform=ax.transAxes)
        return fig
    t = result.run.table
    mine = t["first"][(t["owner"] == machine) & (t["kind"] == result.run.kinds.index("train"))] \
        if "train" in result.run.kinds else []
    if not len(mine):
        return fig
    link = result.run.links[int(mine[0])]
    cap = max(tot.get(link, 0) for _, tot in log) or 1.0
    t = [x for x, _ in log]
    u = [tot.get(link, 0.0) / cap for _, tot in log]
    ax.step(t, u, where="post")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"m{machine} NIC use")
    return fig
