"""``gemini-sim plan``: Optimize a plan, or validate / show one."""

from __future__ import annotations

import argparse
import sys

from gemini_sim.cli import inputs
from gemini_sim import files, report
from gemini_sim.cli.common import add_preset_args, add_setup_args, add_trace_args, setup_of, traces_of
from gemini_sim.errors import UserError, name_list

HELP = "optimize a plan (-o FILE), or 'plan validate FILE' / 'plan show FILE'"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="*", help="validate FILE | show FILE (default: optimize)")
    add_trace_args(p, required=False)
    add_preset_args(p)
    add_setup_args(p)
    p.add_argument("--max-overhead", type=inputs.PERCENT, default=1.0,
                   help="iteration overhead limit in %% (default 1)")
    p.add_argument("--schedules", help="comma-separated schedules to consider (default all)")
    p.add_argument("--processes-per-machine", type=inputs.whole(1, 1024),
                   help="ranks per machine (default: GPUs per machine)")
    p.add_argument("--hsdp", type=inputs.whole(1, 1_000_000), metavar="R",
                   help="the job is HSDP with R replica groups of consecutive machines: copies only where its replicas "
                   "are (placement hsdp), which cost neither traffic nor memory beyond each rank's own part")
    p.add_argument("-o", "--output", metavar="PLAN.json")
    p.add_argument("--plot", metavar="FILE", help="plot the candidates and the Pareto front")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from gemini_sim import optimize as optimizer, plan as plan_mod

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
    files.output_file(args.output, "-o")
    if args.plot:
        files.output_file(args.plot, "--plot", files.FIGURE_SUFFIXES)
    preset, timeline, host_of = setup_of(args)
    if args.trace and len(args.trace) > 1:
        raise UserError("plan takes one --trace")
    if not args.trace and not args.synthetic:
        args.synthetic = "poisson"  # Llama 3's failure rate by default, labelled synthetic in the output
    (trace,) = traces_of(args, preset)
    from tqdm import tqdm

    from gemini_sim.interleave import SCHEDULES

    names = name_list(args.schedules, SCHEDULES, "schedule")
    total = len(names) * 4
    with tqdm(total=total, desc="plan", unit="sim", disable=not sys.stderr.isatty() or None, leave=False) as bar:
        res = optimizer.optimize(
            preset, trace, args.max_overhead, processes_per_machine=args.processes_per_machine, schedules=names,
            replicas=[args.replicas] if args.replicas else None, timeline=timeline, seed=args.seed,
            progress=bar.update, host_cpu_s=host_of, span_fill=args.span_fill, hsdp=args.hsdp,
            config_sha256=plan_mod.sha256_of(args.config) if args.config else "",
            trace_sha256=plan_mod.sha256_of(args.trace[0]) if args.trace else "")
    plan_mod.write(res.plan, args.output)
    if args.plot:
        files.save_figure(optimizer.plot_pareto(res, title=f"Plan candidates: {preset.name}, trace {trace.name}"),
                          args.plot)
    if args.json:
        print(files.dumps({"best": res.best.as_dict(), "pareto": [c.as_dict() for c in res.pareto],
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
