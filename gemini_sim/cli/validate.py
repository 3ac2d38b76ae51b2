"""``gemini-sim validate``: Compare the simulator's predictions with a runtime calibration run."""

from __future__ import annotations

import argparse
from pathlib import Path

from gemini_sim.cli import inputs
from gemini_sim import files, report

HELP = "compare the simulator's predictions with a runtime calibration run"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="written by make calibrate (see gemini_sim/calibration.py)")
    p.add_argument("--warmup", type=inputs.whole(0, 1_000_000), default=3,
                   help="iterations dropped at the start of each run (default 3)")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from gemini_sim import calibration as validate

    res = validate.compare(args.run_dir, warmup=args.warmup)
    files.write_json(Path(args.run_dir) / "validate.json", res)
    if args.json:
        print(files.dumps(res))
        return 0
    b = res["baseline"]
    print(f"{res['run_dir']}: {res['machines']} machines x {res['processes_per_machine']} ranks, NIC "
          f"{res['network_mbit_s']:.0f} Mbit/s (measured), {res['checkpoint_mb_per_machine']:.1f} MB checkpoint "
          f"per machine")
    print(f"baseline iteration (no checkpoint): measured {b['measured']:.4f} s, predicted {b['predicted']:.4f} s "
          f"({100 * b['rel_error']:+.1f}%; collectives fitted to the profile; ideal rings with logical bytes: "
          f"{b['predicted_unfitted']:.4f} s, {100 * b['rel_error_unfitted']:+.1f}%)")
    print(report.format_table(*validate.table(res)))
    c = res["choice"]
    print(f"the optimizer (gemini-sim plan --setup) picks {c['chosen']} (predicted overhead "
          f"{c['chosen_predicted_overhead_pct']:.1f}%); measured cheapest: {c['measured_best']} "
          f"({c['gap_points']:.1f} points below the pick as measured)")
    print(f"wrote {Path(args.run_dir) / 'validate.json'}")
    return 0
