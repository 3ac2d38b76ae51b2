"""``gemini-sim replay``: Replay failure traces under every checkpointing strategy."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gemini_sim import report
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
    preset = preset_of(args)
    names = strategies.parse_names(args.strategies)
    trace_list = traces_of(args, preset)
    from gemini_sim.replay.engine import replay_all

    reports = []
    out = Path(args.out) if args.out else None
    for trace in trace_list:
        with progress_bar(len(trace.events) * len(names), sys.stderr.isatty()) as bar:
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
