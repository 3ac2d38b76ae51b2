"""``gemini-sim fit``: Fit failure models to a trace."""

from __future__ import annotations

import argparse

from gemini_sim import files
from gemini_sim.cli import inputs
from gemini_sim.failures import synthetic, traces

HELP = "fit Poisson and Weibull failure models to a trace"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", nargs="+", action="extend", required=True, metavar="FILE")
    p.add_argument("--machines", type=inputs.MACHINES, help="machines of the traced run (for the per-machine MTBF)")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    fits = [synthetic.fit_trace(traces.load_trace(p), args.machines) for p in args.trace]
    if args.json:
        print(files.dumps([f.as_dict() for f in fits] if len(fits) > 1 else fits[0].as_dict()))
    else:
        for f in fits:
            print("\n".join(f.lines()))
    return 0
