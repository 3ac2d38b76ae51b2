"""``python -m runtime plan --machines N --procs K [--replicas M] -o plan.json``: the default plan for a job that has
no plan from ``gemini-sim plan`` yet."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gemini_sim import plan as contract
from gemini_sim.errors import UserError as ContractError

from . import schedules
from .plan import PlanError, default


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime plan", description="Write the default plan (GEMINI's "
                                 "placement) for a job that has no plan from `gemini-sim plan` yet.")
    ap.add_argument("--machines", type=int, required=True)
    ap.add_argument("--procs", type=int, required=True, help="processes (ranks) per machine")
    ap.add_argument("--replicas", type=int, help="copies of every machine's checkpoint (default: 2, or 1 for one "
                    "machine)")
    ap.add_argument("--interval", type=int, default=1, help="iterations between in-memory checkpoints (default 1)")
    ap.add_argument("--persist", type=int, default=100, help="iterations between durable checkpoints (default 100)")
    ap.add_argument("--schedule", default="naive", help=f"one of {', '.join(schedules.SCHEDULES)} (default naive)")
    ap.add_argument("-o", "--out", required=True, help="where to write the plan (JSON)")
    args = ap.parse_args(argv)
    replicas = args.replicas if args.replicas is not None else min(2, args.machines)
    if not (1 <= args.machines <= 100_000 and 1 <= args.procs <= 1024 and 1 <= replicas <= args.machines
            and 1 <= args.interval <= 10**9 and 1 <= args.persist <= 10**9):
        ap.error("need 1 <= --machines <= 100000, 1 <= --procs <= 1024, 1 <= --replicas <= --machines, "
                 "--interval and --persist >= 1")
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        ap.error(f"cannot write {out}: " + ("it is a folder" if out.is_dir() else "its folder does not exist"))
    try:
        plan = default(args.machines, args.procs, replicas, args.interval, max(args.persist, args.interval),
                       args.schedule)
        contract.write(plan.data, out)
    except (ValueError, PlanError, ContractError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {args.machines} machine(s) x {args.procs}, {replicas} cop{'y' if replicas == 1 else 'ies'} "
          f"of every checkpoint in memory, schedule {args.schedule}")
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] != "plan":
        print("usage: python -m runtime plan --machines N --procs K [--replicas M] -o plan.json  (the agent: "
              "python -m runtime.agent)", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(args[1:]))
