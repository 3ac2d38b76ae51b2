"""The ``gemini-sim`` command line.

Every user mistake ends as one line on stderr, ``gemini-sim: error: ...``, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gemini_sim.cluster import config
from gemini_sim import report
from gemini_sim.replay import policies as strategies
from gemini_sim.failures import synthetic, traces
from gemini_sim.errors import UserError

# Llama 3 405B: 419 unexpected interruptions in 54 days on 2,048 machines (arXiv:2407.21783) -> per-machine MTBF.
DEFAULT_MTBF_HOURS = round(54 * 24 / 419 * 2048)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default adds a usage block)
        raise UserError(f"{message} (see '{self.prog} --help')")


def _add_preset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default="gemini-paper", help=f"bundled preset: {', '.join(config.preset_names())}")
    g.add_argument("--config", metavar="FILE", help="your own preset TOML (same format as gemini_sim/cluster/presets/)")
    p.add_argument("--replicas", type=int, help="override the preset's checkpoint replicas in CPU memory (m)")


def _preset(args) -> config.Preset:
    preset = config.load_config(args.config) if args.config else config.load_preset(args.preset)
    if getattr(args, "replicas", None) is not None:
        data_where = args.config or f"preset {args.preset}"
        if args.replicas < 1:
            raise UserError(f"--replicas must be >= 1, got {args.replicas}")
        preset = preset.with_replicas(args.replicas)
        config._check_consistency(f"{data_where} with --replicas {args.replicas}", preset)
    return preset


def _add_trace_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--trace", nargs="+", action="extend", metavar="FILE", help="failure trace CSV(s)")
    g.add_argument("--synthetic", choices=synthetic.MODELS, help="generate a seeded synthetic trace")
    p.add_argument("--mtbf-hours", type=float, default=DEFAULT_MTBF_HOURS,
                   help=f"synthetic: mean time between failures of ONE machine (default {DEFAULT_MTBF_HOURS}, "
                        f"Llama 3 405B's rate)")
    p.add_argument("--days", type=float, default=30.0, help="synthetic: length of the job (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seed for synthetic traces and for which machines fail")
    p.add_argument("--weibull-shape", type=float, default=synthetic.DEFAULT_WEIBULL_SHAPE)
    p.add_argument("--burst-probability", type=float, default=0.1, help="synthetic burst: share of events that "
                   "take a whole rack")
    p.add_argument("--burst-size", type=int, help="synthetic burst: machines in a burst (default: the preset's "
                   "machines_per_rack, else 4)")


def _traces(args, preset: config.Preset) -> list[traces.Trace]:
    if args.trace:
        return [traces.load_trace(path) for path in args.trace]
    burst = args.burst_size or preset.cluster.machines_per_rack or min(4, preset.cluster.machines)
    spec = synthetic.SyntheticSpec(args.synthetic, args.mtbf_hours, args.days, preset.cluster.machines, args.seed,
                                   weibull_shape=args.weibull_shape, burst_probability=args.burst_probability,
                                   burst_size=min(burst, preset.cluster.machines))
    return [synthetic.generate(spec)]


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    bar = tqdm(total=total, desc="replay", unit="failure", disable=not enabled or None, leave=False)
    return bar


def cmd_replay(args) -> int:
    preset = _preset(args)
    names = strategies.parse_names(args.strategies)
    trace_list = _traces(args, preset)
    from gemini_sim.replay.engine import replay_all

    reports = []
    out = Path(args.out) if args.out else None
    for trace in trace_list:
        with _progress(len(trace.events) * len(names), sys.stderr.isatty()) as bar:
            results = replay_all(trace, preset, names, args.seed, bar.update)
        rep = report.replay_report(trace, preset, results, args.seed)
        reports.append(rep)
        if out:
            stem = trace.name if len(trace_list) > 1 else "replay"
            report.write_json(out / f"{stem}.json", rep)
            report.plot_breakdown(results, title=f"Wasted time: {trace.name} on {preset.name}").savefig(
                out / f"{stem}-breakdown.png", dpi=120)
            report.plot_cumulative(results, title=f"Cumulative wasted time: {trace.name} on {preset.name}").savefig(
                out / f"{stem}-cumulative.png", dpi=120)
            report.plot_trace(trace).savefig(out / f"{stem}-trace.png", dpi=120)
        if not args.json:
            print("\n".join(report.header_lines(trace, preset)))
            print()
            print(report.replay_table(results))
            print()
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else {"runs": reports}, indent=2))
    elif out:
        print(f"wrote {out}/ (JSON report and plots)")
    return 0


def cmd_fit(args) -> int:
    fits = [synthetic.fit_trace(traces.load_trace(p), args.machines) for p in args.trace]
    if args.json:
        print(json.dumps([f.as_dict() for f in fits] if len(fits) > 1 else fits[0].as_dict(), indent=2))
    else:
        for f in fits:
            print("\n".join(f.lines()))
    return 0


def cmd_synth(args) -> int:
    preset = _preset(args)
    (trace,) = _traces(args, preset)
    text = trace.to_csv()
    if args.output and args.output != "-":
        Path(args.output).write_text(text)
        print(f"wrote {args.output}: {len(trace.events)} failures over {trace.duration_h:g} h", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _parse_range(text: str, what: str) -> list[int]:
    try:
        if "-" in text:
            a, b = (int(x) for x in text.split("-", 1))
        else:
            a = b = int(text)
    except ValueError:
        raise UserError(f"{what} must be an integer or a range like 1-8, got {text!r}") from None
    if a > b or a < 0:
        raise UserError(f"{what} range {text!r} is empty or negative")
    return list(range(a, b + 1))


def _placement_rows(args, strategy: str, ks: list[int]):
    from gemini_sim.placement import layouts as placement, survival as recovery

    pl = placement.build(strategy, args.machines, args.replicas, seed=args.seed,
                         domains=args.domains or args.replicas)
    if args.bursts:
        dom = placement.domains_of(args.machines, args.domains)
        return pl, [recovery.monte_carlo(pl, recovery.burst_sampler(dom, k), args.samples, args.seed, k)
                    for k in ks]
    return pl, [recovery.probability(pl, k, args.samples, args.seed) for k in ks]


def cmd_placement(args) -> int:
    from gemini_sim.placement import layouts as placement

    if args.machines < 1:
        raise UserError(f"--machines must be >= 1, got {args.machines}")
    if args.replicas < 1 or args.replicas > args.machines:
        raise UserError(f"--replicas must be between 1 and --machines ({args.machines}), got {args.replicas}")
    ks = _parse_range(args.failures, "--failures")
    if ks[-1] > args.machines:
        raise UserError(f"--failures ({ks[-1]}) exceeds --machines ({args.machines})")
    if args.bursts and not args.domains:
        raise UserError("--bursts needs --domains D (failures take whole domains)")
    if args.domains is not None and not 1 <= args.domains <= args.machines:
        raise UserError(f"--domains must be between 1 and --machines ({args.machines}), got {args.domains}")
    pl, rows = _placement_rows(args, args.strategy, ks)
    memory = None
    if args.preset or args.config:
        preset = config.load_config(args.config) if args.config else config.load_preset(args.preset)
        memory = placement.check_memory(pl, preset.checkpoint_bytes_per_machine, preset.cluster.cpu_memory_gb)
    if args.plot:
        _plot_placement(args, ks, Path(args.plot))
    if args.json:
        objs = [r.as_dict() | ({"memory_gb_per_machine": memory} if memory is not None else {}) for r in rows]
        print(json.dumps(objs[0] if len(objs) == 1 and "-" not in args.failures else objs, indent=2))
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
        print(f"CPU memory needed per machine: {memory:.1f} GB")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def _plot_placement(args, ks: list[int], path: Path) -> None:
    from matplotlib.figure import Figure

    from gemini_sim.placement import layouts as placement

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    for strategy in placement.STRATEGIES:
        if strategy == "group" and args.machines % args.replicas:
            continue
        _, rows = _placement_rows(args, strategy, ks)
        ax.plot(ks, [r.probability for r in rows], marker="o", ms=3, label=strategy)
    ax.set_xlabel("machines failing at once (k)")
    ax.set_ylabel("P(recover from CPU memory)")
    ax.set_title(f"N={args.machines}, m={args.replicas}" + (" (domain bursts)" if args.bursts else ""))
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def cmd_interleave(args) -> int:
    from gemini_sim import interleave
    from gemini_sim.cluster import workload

    if args.setup:
        from gemini_sim import calibration as validate

        if args.profile or args.config:
            raise UserError("--setup brings its own cluster and profile; drop --profile/--config")
        preset, timeline, _ = validate.setup_preset(args.setup, replicas=args.replicas or 2)
    else:
        preset = _preset(args)
        timeline = None
    if args.profile:
        timeline = workload.from_profile(workload.load_profile(args.profile))
        if timeline.machines != preset.cluster.machines:
            raise UserError(f"{args.profile}: profile has {timeline.machines} machines but the preset has "
                            f"{preset.cluster.machines}; use --config with a matching cluster")
    if args.buffer_mb <= 0:
        raise UserError(f"--buffer-mb must be > 0, got {args.buffer_mb}")
    if args.threshold <= 0:
        raise UserError(f"--threshold must be > 0, got {args.threshold}")
    if args.oversubscription < 1:
        raise UserError(f"--oversubscription must be >= 1, got {args.oversubscription}")
    cfg = interleave.InterleaveConfig(schedule=args.schedule, replicas=args.replicas,
                                      buffer_bytes=args.buffer_mb * 2 ** 20, jitter=args.jitter, seed=args.seed,
                                      interval=args.interval, oversubscription=args.oversubscription,
                                      span_fill=args.span_fill)
    res = interleave.simulate(preset, cfg, timeline, threshold_pct=args.threshold)
    if args.export_plan:
        _export_plan(args, preset, cfg, res)
    if args.plot:
        path = Path(args.plot)
        path.parent.mkdir(parents=True, exist_ok=True)
        report.plot_gantt(res).savefig(path, dpi=120)
    if args.json:
        print(json.dumps(res.as_dict(), indent=2))
        return 0
    d = res.as_dict()
    k = d["min_interval_iters"]
    print(f"{preset.name}: {res.machines} machines, m={res.replicas}, schedule {res.schedule}, "
          f"{d['checkpoint_gb_per_machine']:.1f} GB per machine per checkpoint, timeline {d['timeline']}")
    print(report.format_table(["metric", "value"], [
        ["iteration time (s)", f"{res.iteration_time_s:.4f}"],
        ["baseline iteration time (s)", f"{res.baseline_iteration_time_s:.4f}"],
        ["overhead", f"{res.overhead_pct:.3f}%"],
        ["checkpoint time (s)", f"{res.checkpoint_time_s:.3f}"],
        ["checkpoint complete at (s)", f"{res.checkpoint_complete_s:.3f}"],
        [f"min interval with overhead <= {args.threshold:g}% (iters)", k if k is not None else "none up to 32"],
        ["NIC idle time left per iteration (s)", f"{res.idle_network_s:.3f} of {res.baseline_idle_network_s:.3f}"],
    ], align="lr"))
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def _export_plan(args, preset, cfg, res) -> None:
    """The plan that runs exactly this simulated configuration (for the runtime)."""
    from gemini_sim import interleave, optimize as optimizer, plan as plan_mod

    predicted = {"iteration_time_s": res.iteration_time_s, "baseline_iteration_time_s": res.baseline_iteration_time_s,
                 "overhead_pct": res.overhead_pct, "checkpoint_complete_s": res.checkpoint_complete_s}
    d = optimizer.plan_for(preset, interleave.build_placement(preset, cfg), res, cfg.schedule, cfg.interval,
                           cfg.buffer_bytes, preset.cluster.gpus_per_machine, predicted, cfg.span_fill,
                           config_sha256=plan_mod.sha256_of(args.config) if args.config else "")
    plan_mod.write(d, args.export_plan)


def cmd_validate(args) -> int:
    from gemini_sim import calibration as validate

    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    res = validate.compare(args.run_dir, warmup=args.warmup)
    validate.write_json(res, Path(args.run_dir) / "validate.json")
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    b = res["baseline"]
    print(f"{res['run_dir']}: {res['machines']} machines x {res['processes_per_machine']} ranks, NIC "
          f"{res['network_mbit_s']:.0f} Mbit/s (measured), {res['checkpoint_mb_per_machine']:.1f} MB checkpoint "
          f"per machine")
    print(f"baseline iteration (no checkpoint): measured {b['measured']:.4f} s, predicted {b['predicted']:.4f} s "
          f"({100 * b['rel_error']:+.1f}%; collectives fitted to the profile; ideal rings with logical bytes: "
          f"{b['predicted_unfitted']:.4f} s, {100 * b['rel_error_unfitted']:+.1f}%)")
    print(report.format_table(*validate.table(res)))
    print(f"wrote {Path(args.run_dir) / 'validate.json'}")
    return 0


def cmd_plan(args) -> int:
    from gemini_sim import optimize as optimizer, plan as plan_mod
    from gemini_sim.cluster import workload

    action = args.action or []
    if action and action[0] in ("validate", "show"):
        if len(action) != 2:
            raise UserError(f"usage: gemini-sim plan {action[0]} PLAN.json")
        data = plan_mod.read(action[1])
        if action[0] == "validate":
            print(f"{action[1]}: valid plan (schema v{data['schema_version']}, {data['cluster']['machines']} machines, "
                  f"{data['placement']['strategy']} m={data['placement']['replicas']}, {data['schedule']['name']})")
        else:
            print(plan_mod.show(data))
        return 0
    if action:
        raise UserError(f"unknown plan action {action[0]!r}; use 'validate FILE', 'show FILE', or options to optimize")
    if not args.output:
        raise UserError("give -o PLAN.json for the plan to write")
    preset = _preset(args)
    if args.trace and len(args.trace) > 1:
        raise UserError("plan takes one --trace")
    if not args.trace and not args.synthetic:
        args.synthetic = "poisson"  # Llama 3's failure rate by default, labelled synthetic in the output
    (trace,) = _traces(args, preset)
    timeline = workload.from_profile(workload.load_profile(args.profile)) if args.profile else None
    if args.processes_per_machine is not None and args.processes_per_machine < 1:
        raise UserError(f"--processes-per-machine must be >= 1, got {args.processes_per_machine}")
    from tqdm import tqdm

    names = args.schedules.split(",") if args.schedules else None
    from gemini_sim.interleave import SCHEDULES
    for s in names or []:
        if s not in SCHEDULES:
            from gemini_sim.errors import unknown_name
            raise unknown_name("schedule", s, SCHEDULES)
    total = len(names or SCHEDULES) * 4
    with tqdm(total=total, desc="plan", unit="sim", disable=not sys.stderr.isatty() or None, leave=False) as bar:
        res = optimizer.optimize(
            preset, trace, args.max_overhead, processes_per_machine=args.processes_per_machine, schedules=names,
            replicas=[args.replicas] if args.replicas else None, timeline=timeline, seed=args.seed,
            progress=bar.update,
            config_sha256=plan_mod.sha256_of(args.config) if args.config else "",
            trace_sha256=plan_mod.sha256_of(args.trace[0]) if args.trace else "")
    plan_mod.write(res.plan, args.output)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        optimizer.plot_pareto(res, title=f"Plan candidates: {preset.name}, trace {trace.name}").savefig(args.plot,
                                                                                                         dpi=120)
    if args.json:
        print(json.dumps({"best": res.best.as_dict(), "pareto": [c.as_dict() for c in res.pareto],
                          "candidates": len(res.candidates), "plan": str(args.output)}, indent=2))
        return 0
    print(f"{len(res.candidates)} candidates for {preset.name} on {'SYNTHETIC ' if trace.synthetic else ''}"
          f"trace {trace.name}, overhead limit {args.max_overhead:g}%; Pareto front (wasted hours, overhead, memory):")
    print(report.format_table(optimizer.TABLE_HEADERS, optimizer.table_rows(res.pareto)))
    b = res.best
    print(f"\nbest: {b.placement} placement, m={b.replicas}, {b.schedule} schedule, checkpoint every "
          f"{b.interval_iters} iteration(s): {b.wasted_hours:.3f} wasted hours expected, overhead "
          f"{b.overhead_pct:.3f}%, {b.memory_gb_per_machine:.1f} GB CPU memory per machine")
    print(f"wrote {args.output}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def cmd_sweep(args) -> int:
    from gemini_sim import sweeps as sweep

    rows, ran, skipped = sweep.run_sweep(args.spec, args.out, args.scheduler, args.workers,
                                         progress=sys.stderr.isatty())
    failed = [r for r in rows if r.get("status") != "ok"]
    print(f"{len(rows)} cells in {args.out}/results.csv ({ran} run now, {skipped} already done, {len(failed)} failed); "
          f"plot {args.out}/sweep.png")
    for r in failed[:10]:
        params = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("status", "error") and v not in ("", None))
        print(f"  failed: {params}: {r['error']}")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gemini-sim", description="Simulate in-memory checkpointing and failure recovery "
                                                    "(GEMINI, SOSP 2023).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("replay", help="replay failure traces and compare checkpointing strategies")
    _add_trace_args(p)
    _add_preset_args(p)
    p.add_argument("--strategies", help=f"comma-separated, default all: {','.join(strategies.STRATEGIES)}")
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")
    p.add_argument("--out", metavar="DIR", help="write the JSON report and plots here")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("fit", help="fit Poisson and Weibull failure models to a trace")
    p.add_argument("--trace", nargs="+", action="extend", required=True, metavar="FILE")
    p.add_argument("--machines", type=int, help="machines of the traced run (for the per-machine MTBF)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_fit)

    from gemini_sim.placement import layouts as placement_mod

    p = sub.add_parser("placement", help="probability of recovering from CPU memory after k failures")
    p.add_argument("--machines", type=int, required=True, metavar="N")
    p.add_argument("--replicas", type=int, required=True, metavar="M")
    p.add_argument("--strategy", default="mixed", help=f"one of: {', '.join(placement_mod.STRATEGIES)}")
    p.add_argument("--failures", required=True, metavar="K", help="K, or a range like 1-8 for a table")
    p.add_argument("--domains", type=int, metavar="D", help="failure domains (D blocks of consecutive machines); "
                   "used by domain-aware (default: M) and by --bursts")
    p.add_argument("--bursts", action="store_true", help="failures take whole domains (Monte Carlo)")
    p.add_argument("--samples", type=int, default=20000, help="Monte Carlo samples (default 20000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", help="also check the CPU memory the placement needs on this preset")
    p.add_argument("--config", metavar="FILE", help="like --preset, from your TOML file")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="FILE", help="plot probability against k for every strategy")
    p.set_defaults(func=cmd_placement)

    from gemini_sim.interleave import SCHEDULES

    p = sub.add_parser("interleave", help="play an iteration with checkpoint traffic under a schedule")
    _add_preset_args(p)
    p.add_argument("--schedule", default="gemini", help=f"one of: {', '.join(SCHEDULES)}")
    p.add_argument("--profile", metavar="FILE", help="use a measured timeline (profile JSON) instead of ZeRO-3's")
    p.add_argument("--interval", type=int, default=1, help="iterations per checkpoint (default 1)")
    p.add_argument("--buffer-mb", type=float, default=1024, help="GPU staging buffer, two chunks (default 1024)")
    p.add_argument("--jitter", type=float, default=0.0, help="compute spans vary by +-this fraction (default 0)")
    p.add_argument("--threshold", type=float, default=1.0, help="overhead limit for the min interval, %% (default 1)")
    p.add_argument("--oversubscription", type=float, default=1.0, help="leaf/spine oversubscription (default 1)")
    p.add_argument("--span-fill", type=float, default=1.0, help="gemini: fill at most this fraction of each idle "
                   "span (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="FILE", help="Gantt chart of the simulated iteration(s)")
    p.add_argument("--setup", metavar="RUN_DIR", help="simulate a measured runtime set-up (its probe.json and "
                   "profile.json) instead of a preset")
    p.add_argument("--export-plan", metavar="PLAN.json", help="write the plan that runs this configuration")
    p.set_defaults(func=cmd_interleave)

    p = sub.add_parser("validate", help="compare the simulator's predictions with a runtime calibration run")
    p.add_argument("run_dir", metavar="RUN_DIR", help="written by make calibrate (see gemini_sim/calibration.py)")
    p.add_argument("--warmup", type=int, default=3, help="iterations dropped at the start of each run (default 3)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="optimize a plan (-o FILE), or 'plan validate FILE' / 'plan show FILE'")
    p.add_argument("action", nargs="*", help="validate FILE | show FILE (default: optimize)")
    _add_trace_args(p, required=False)
    _add_preset_args(p)
    p.add_argument("--profile", metavar="FILE", help="measured timeline (profile JSON) for the interleaving model")
    p.add_argument("--max-overhead", type=float, default=1.0, help="iteration overhead limit in %% (default 1)")
    p.add_argument("--schedules", help="comma-separated schedules to consider (default all)")
    p.add_argument("--processes-per-machine", type=int, help="ranks per machine (default: GPUs per machine)")
    p.add_argument("-o", "--output", metavar="PLAN.json")
    p.add_argument("--plot", metavar="FILE", help="plot the candidates and the Pareto front")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("sweep", help="run a grid of replays / placements / interleavings on Dask")
    p.add_argument("spec", metavar="SPEC.toml")
    p.add_argument("--out", default="out/sweep", help="output folder (default out/sweep)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="an existing Dask scheduler (default: a local cluster)")
    p.add_argument("--workers", type=int, help="local cluster workers (default: up to 2)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("synth", help="write a synthetic failure trace as CSV")
    _add_trace_args(p)
    _add_preset_args(p)
    p.add_argument("-o", "--output", help="CSV file (default: stdout)")
    p.set_defaults(func=cmd_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as exc:
        print(f"gemini-sim: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("gemini-sim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
