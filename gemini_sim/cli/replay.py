"""``gemini-sim replay``: Replay failure traces under every checkpointing strategy."""

from __future__ import annotations

import argparse
import sys

from gemini_sim import files, report
from gemini_sim.errors import UserError
from gemini_sim.cli.common import add_preset_args, add_trace_args, preset_of, progress_bar, traces_of
from gemini_sim.replay import policies as strategies

HELP = "replay failure traces and compare checkpointing strategies"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_trace_args(p)
    add_preset_args(p)
    p.add_argument("--strategies", help=f"comma-separated, default all: {','.join(strategies.STRATEGIES)}")
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")
    p.add_argument("--out", metavar="DIR", help="write the JSON report and plots here")


def run(args) -> int:
    out = files.output_dir(args.out, "--out") if args.out else None
    preset = preset_of(args)
    names = strategies.parse_names(args.strategies)
    trace_list = traces_of(args, preset)
    stems = [t.name for t in trace_list]
    if out and len(stems) > 1 and len(set(stems)) < len(stems):
        twice = next(s for s in stems if stems.count(s) > 1)
        raise UserError(f"--out {args.out}: two traces are named {twice!r}; their reports would overwrite each other")
    from gemini_sim.replay.engine import replay_all

    reports, written = [], []
    for trace in trace_list:
        with progress_bar(len(trace.events) * len(names), sys.stderr.isatty()) as bar:
            results = replay_all(trace, preset, names, args.seed, bar.update)
        rep = report.replay_report(trace, preset, results, args.seed)
        reports.append(rep)
        if out:
            stem = trace.name if len(trace_list) > 1 else "replay"
            outputs = {f"{stem}.json": lambda p: files.write_json(p, rep),
                       f"{stem}-breakdown.png": lambda p: files.save_figure(report.plot_breakdown(
                           results, title=f"Wasted time: {trace.name} on {preset.name}"), p),
                       f"{stem}-cumulative.png": lambda p: files.save_figure(report.plot_cumulative(
                           results, title=f"Cumulative wasted time: {trace.name} on {preset.name}"), p),
                       f"{stem}-trace.png": lambda p: files.save_figure(report.plot_trace(trace), p)}
            for name, write in outputs.items():
                files.write_reporting(write, out / name, written)
        if not args.json:
            print("\n".join(report.header_lines(trace, preset)))
            print()
            print(report.replay_table(results))
            print()
    if args.json:
        print(files.dumps(reports[0] if len(reports) == 1 else {"runs": reports}))
    elif out:
        print(f"wrote {out}/ (JSON report and plots)")
    return 0
