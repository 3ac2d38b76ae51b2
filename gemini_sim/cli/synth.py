"""``gemini-sim synth``: Write a synthetic failure trace as CSV."""

from __future__ import annotations

import argparse
import sys

from gemini_sim import files
from gemini_sim.cli.common import add_preset_args, add_trace_args, preset_of, traces_of

HELP = "write a synthetic failure trace as CSV"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_trace_args(p)
    add_preset_args(p)
    p.add_argument("-o", "--output", help="CSV file (default: stdout)")


def run(args) -> int:
    to_file = args.output and args.output != "-"
    if to_file:
        files.output_file(args.output, "-o")
    preset = preset_of(args)
    (trace,) = traces_of(args, preset)
    text = trace.to_csv()
    if to_file:
        files.write_atomic(args.output, text)
        print(f"wrote {args.output}: {len(trace.events)} failures over {trace.duration_h:g} h", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
