"""``gemini-sim sweep``: Run a grid of replays / placements / interleavings on Dask."""

from __future__ import annotations

import argparse
import sys

from gemini_sim.cli import inputs

HELP = "run a grid of replays / placements / interleavings on Dask"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC.toml")
    p.add_argument("--out", default="out/sweep", help="output folder (default out/sweep)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="an existing Dask scheduler (default: a local cluster)")
    p.add_argument("--workers", type=inputs.whole(1, 256), help="local cluster workers (default: up to 2)")


def run(args) -> int:
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
