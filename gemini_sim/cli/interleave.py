"""``gemini-sim interleave``: Play an iteration with checkpoint traffic under a schedule."""

from __future__ import annotations

import argparse

from gemini_sim.cli import inputs
from gemini_sim import files, report
from gemini_sim.cli.common import add_preset_args, add_setup_args, setup_of

HELP = "play an iteration with checkpoint traffic under a schedule"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from gemini_sim.interleave import SCHEDULES
    from gemini_sim.interleave.model import SLOWEST_NIC

    add_preset_args(p)
    p.add_argument("--schedule", default="gemini", help=f"one of: {', '.join(SCHEDULES)}")
    p.add_argument("--interval", type=inputs.whole(1, 10_000), default=1, help="iterations per checkpoint (default 1)")
    p.add_argument("--buffer-mb", type=inputs.number(0, 1e9, lo_open=True), default=1024,
                   help="GPU staging buffer, two chunks (default 1024)")
    p.add_argument("--jitter", type=inputs.number(0, 0.99), default=0.0,
                   help="compute spans vary by +-this fraction (default 0)")
    p.add_argument("--threshold", type=inputs.number(0, 1e6, lo_open=True), default=1.0,
                   help="overhead limit for the min interval, %% (default 1)")
    p.add_argument("--oversubscription", type=inputs.number(1, 1e6), default=1.0,
                   help="leaf/spine oversubscription (default 1)")
    p.add_argument("--slow-nic", type=inputs.number(SLOWEST_NIC, 1), default=1.0, metavar="FRACTION",
                   help="machine 0's NIC runs at this fraction of its bandwidth, a degraded link (default 1: healthy)")
    p.add_argument("--seed", type=inputs.SEED, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="FILE", help="Gantt chart of the simulated iteration(s)")
    add_setup_args(p)
    p.add_argument("--export-plan", metavar="PLAN.json", help="write the plan that runs this configuration")


def run(args) -> int:
    from gemini_sim import interleave

    if args.plot:
        files.output_file(args.plot, "--plot", files.FIGURE_SUFFIXES)
    if args.export_plan:
        files.output_file(args.export_plan, "--export-plan")
    preset, timeline, host_of = setup_of(args)
    host = host_of(args.replicas or 2) if host_of else 0.0  # the host cost model (InterleaveConfig)
    cfg = interleave.InterleaveConfig(schedule=args.schedule, replicas=args.replicas,
                                      buffer_bytes=args.buffer_mb * 2 ** 20, jitter=args.jitter, seed=args.seed,
                                      interval=args.interval, oversubscription=args.oversubscription,
                                      span_fill=args.span_fill, host_cpu_s=host, slow_nic=args.slow_nic)
    res = interleave.simulate(preset, cfg, timeline, threshold_pct=args.threshold)
    if args.export_plan:
        _export_plan(args, preset, cfg, res)
    if args.plot:
        files.save_figure(report.plot_gantt(res), args.plot)
    if args.json:
        print(files.dumps(res.as_dict()))
        return 0
    d = res.as_dict()
    k = d["min_interval_iters"]
    print(f"{preset.name}: {res.machines} machines, m={res.replicas}, schedule {res.schedule}, "
          f"{d['checkpoint_gb_per_machine']:.1f} GB per machine per checkpoint, timeline {d['timeline']}")
    print(report.format_table(["metric", "value"], [
        ["iteration time (s)", f"{res.iteration_time_s:.4f}"],
        ["baseline iteration time (s)", f"{res.baseline_iteration_time_s:.4f}"],
        ["overhead", f"{res.overhead_pct:.3f}%"],
        ["  of which host CPU / GPU copy slowdown (s per iteration)",
         f"{res.host_cpu_per_iteration_s:.4f} / {res.copy_slowdown_per_iteration_s:.4f}"],
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
