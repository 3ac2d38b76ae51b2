"""``gemini-sim placement``: Probability of recovering from CPU memory after k failures, per placement."""

from __future__ import annotations

import argparse
from pathlib import Path

from gemini_sim.cli import inputs
from gemini_sim import files, report
from gemini_sim.cluster import config
from gemini_sim.errors import UserError

HELP = "probability of recovering from CPU memory after k failures"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from gemini_sim.placement import layouts as placement_mod

    p.add_argument("--machines", type=inputs.MACHINES, required=True, metavar="N")
    p.add_argument("--replicas", type=inputs.REPLICAS, required=True, metavar="M")
    p.add_argument("--strategy", default="mixed", help=f"one of: {', '.join(placement_mod.PLACEMENTS)}")
    p.add_argument("--failures", required=True, metavar="K", help="K, or a range like 1-8 for a table")
    p.add_argument("--hsdp", type=inputs.whole(1, 1_000_000), metavar="R",
                   help="an HSDP job of R replica groups of consecutive machines: its copies where the replicas "
                   "are (placement hsdp; --strategy is not used), each costing only a rank's own part in memory and "
                   "traffic")
    p.add_argument("--domains", type=inputs.whole(1, 1_000_000), metavar="D",
                   help="failure domains (D blocks of consecutive machines); "
                   "used by domain-aware (default: M) and by --bursts")
    p.add_argument("--bursts", action="store_true", help="failures take whole domains (Monte Carlo)")
    p.add_argument("--samples", type=inputs.whole(1, 10_000_000), default=20000,
                   help="Monte Carlo samples (default 20000)")
    p.add_argument("--seed", type=inputs.SEED, default=0)
    p.add_argument("--preset", help="also check the CPU memory the placement needs on this preset")
    p.add_argument("--config", metavar="FILE", help="like --preset, from your TOML file")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="FILE", help="plot probability against k for every strategy")


def _placement_rows(args, strategy: str, ks: list[int]):
    from gemini_sim.placement import layouts as placement, survival as recovery

    if strategy == "hsdp":
        pl = placement.hsdp(args.machines, args.replicas, args.hsdp)
    else:
        pl = placement.build(strategy, args.machines, args.replicas, seed=args.seed,
                             domains=args.domains or args.replicas)
    if args.bursts:
        dom = placement.domains_of(args.machines, args.domains)
        return pl, [recovery.monte_carlo(pl, recovery.burst_sampler(dom, k), args.samples, args.seed, k)
                    for k in ks]
    return pl, [recovery.probability(pl, k, args.samples, args.seed) for k in ks]


def run(args) -> int:
    from gemini_sim.placement import layouts as placement

    if args.replicas < 1 or args.replicas > args.machines:
        raise UserError(f"--replicas must be between 1 and --machines ({args.machines}), got {args.replicas}")
    try:  # K or A-B, bounded before the range is built
        ks = inputs.int_range(0, args.machines)(args.failures)
    except argparse.ArgumentTypeError as e:
        raise UserError(f"--failures: {e}") from None
    if ks[-1] > args.machines:
        raise UserError(f"--failures ({ks[-1]}) exceeds --machines ({args.machines})")
    if args.bursts and not args.domains:
        raise UserError("--bursts needs --domains D (failures take whole domains)")
    if args.domains is not None and not 1 <= args.domains <= args.machines:
        raise UserError(f"--domains must be between 1 and --machines ({args.machines}), got {args.domains}")
    if args.plot:
        files.output_file(args.plot, "--plot", files.FIGURE_SUFFIXES)
    pl, rows = _placement_rows(args, "hsdp" if args.hsdp else args.strategy, ks)
    memory = None
    if args.preset or args.config:
        preset = config.load_config(args.config) if args.config else config.load_preset(args.preset)
        memory = placement.check_memory(pl, preset.checkpoint_bytes_per_machine, preset.cluster.cpu_memory_gb)
    if args.plot:
        _plot_placement(args, ks, Path(args.plot))
    if args.json:
        objs = [r.as_dict() | ({"memory_gb_per_machine": memory} if memory is not None else {}) for r in rows]
        print(files.dumps(objs[0] if len(objs) == 1 and "-" not in args.failures else objs))
        return 0
    if len(rows) == 1 and "-" not in args.failures:
        r = rows[0]
        ci = f" (95% CI {r.ci95[0]:.6f}-{r.ci95[1]:.6f}, {r.samples} samples)" if r.ci95 else ""
        print(f"{r.strategy}: N={r.machines} m={r.replicas} k={r.failures}: P(recover from CPU memory) = "
              f"{r.probability:.12g} [{r.method}]{ci}")
    else:
        table = [[r.failures, f"{r.probability:.10f}", r.method,
                  f"{r.ci95[0]:.4f}-{r.ci95[1]:.4f}" if r.ci95 else "", f"{r.expected_lost_checkpoints:.4g}"]
                 for r in rows]
        print(f"{pl.strategy}: N={args.machines} m={args.replicas}"
              + (f", failures in bursts of whole domains ({args.domains} domains)" if args.bursts else ""))
        print(report.format_table(["k", "P(recover)", "method", "ci95", "E[lost ckpts]"], table))
    if memory is not None:
        print(f"CPU memory needed per machine: {memory:.1f} GB"
              + (" (copies held as HSDP replicas cost only each rank's own part)" if args.hsdp else ""))
    if args.hsdp:
        print(f"checkpoint traffic: every copy on another machine is on an HSDP replica, sent only the ranks' own "
              f"parts (the state that is not sharded: a few KB a checkpoint)")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def _plot_placement(args, ks: list[int], path: Path) -> None:
    from matplotlib.figure import Figure

    from gemini_sim.placement import layouts as placement

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    for strategy in [*placement.PLACEMENTS, *(["hsdp"] if args.hsdp else [])]:
        if strategy == "group" and args.machines % args.replicas:
            continue
        _, rows = _placement_rows(args, strategy, ks)
        ax.plot(ks, [r.probability for r in rows], marker="o", ms=3, label=strategy)
    ax.set_xlabel("machines failing at once (k)")
    ax.set_ylabel("P(recover from CPU memory)")
    ax.set_title(f"N={args.machines}, m={args.replicas}" + (" (domain bursts)" if args.bursts else ""))
    ax.legend(fontsize=8)
    files.save_figure(fig, path)
