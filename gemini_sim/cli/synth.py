"""``gemini-sim synth``: Write a synthetic failure trace as CSV."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gemini_sim.cli.common import add_preset_args, add_trace_args, preset_of, traces_of

HELP = "write a synthetic failure trace as CSV"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_trace_args(p)
    add_preset_args(p)
    p.add_argument("-o", "--output", help="CSV file (default: stdout)")


def run(args) -> int:
    preset = preset_of(args)
    (trace,) = traces_of(args, preset)
    text = trace.to_csv()
    if args.output and args.output != "-":
        Path(args.output).write_text(text)
        print(f"wrote {args.output}: {len(trace.events)} failures over {trace.duration_h:g} h", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
