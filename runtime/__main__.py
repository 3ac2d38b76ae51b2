"""``python -m runtime COMMAND``: the runtime's own commands.

- ``plan --machines N --procs K [--replicas M] [--hsdp R] -o plan.json``: the default plan for a job that has no
  plan from ``gemini-sim plan`` yet (``--hsdp``: its copies where an HSDP job's replicas are);
- ``jobs [--store-root DIR]``: what every job holds in memory on this host (a finished job holds nothing: its memory
  was freed; what is listed belongs to a job running, or to one that died and may be resumed);
- ``free JOB [JOB ...] [--store-root DIR]``: free those jobs' memory on this host (refused while a process uses it).

A mistake is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time

from gemini_sim import plan as contract
from gemini_sim.errors import UserError as ContractError
from gemini_sim.files import output_file

from . import job as jobs
from . import schedules
from .config import ConfigError, OneLineParser, check_name, resolve_store_root
from .plan import Plan, PlanError, default, resized

PROG = "python -m runtime"


def _plan(argv) -> int:
    ap = OneLineParser(prog=f"{PROG} plan", description="Write the default plan (GEMINI's placement) for a job that has "
                 "no plan from `gemini-sim plan` yet.")
    ap.add_argument("--machines", type=int, required=True)
    ap.add_argument("--procs", type=int, help="processes (ranks) per machine (required without --like)")
    ap.add_argument("--like", help="a plan to follow (its processes per machine, copies, schedule, intervals), for "
                    "--machines machines: a job that goes on after losing machines, or grows")
    ap.add_argument("--replicas", type=int, help="copies of every machine's checkpoint (default: 2, or 1 for one "
                    "machine)")
    ap.add_argument("--hsdp", type=int, metavar="R", help="the job is HSDP with R replica groups of consecutive "
                    "machines: every machine's copies on machines that hold the same shard in other groups "
                    "(copies default to 2, at most R)")
    ap.add_argument("--interval", type=int, default=1, help="iterations between in-memory checkpoints (default 1)")
    ap.add_argument("--persist", type=int, help=f"iterations between durable checkpoints, a multiple of --interval "
                    f"(default {contract.DEFAULT_PERSIST}, rounded up to one)")
    ap.add_argument("--schedule", default="naive", help=f"one of {', '.join(schedules.SCHEDULES)} (default naive)")
    ap.add_argument("-o", "--out", required=True, help="where to write the plan (JSON)")
    args = ap.parse_args(argv)
    if args.like:
        if not 1 <= args.machines <= 100_000:
            ap.error("need 1 <= --machines <= 100000")
        if any(v is not None for v in (args.procs, args.replicas, args.persist, args.hsdp)):
            ap.error("--like takes the plan's processes, copies and intervals: give only --machines with it")
        out = output_file(args.out, "-o")
        plan = resized(Plan.load(args.like), args.machines)
        contract.write(plan.data, out)
        print(f"wrote {out}: {plan.machines} machine(s) x {plan.processes_per_machine}, as {args.like}")
        return 0
    if args.procs is None:
        ap.error("give --procs (or --like PLAN)")
    replicas = args.replicas if args.replicas is not None else min(2, args.machines)
    if not (1 <= args.machines <= 100_000 and 1 <= args.procs <= 1024 and 1 <= args.interval <= 10**9):
        ap.error("need 1 <= --machines <= 100000, 1 <= --procs <= 1024, 1 <= --interval <= 1e9")
    if not 1 <= replicas <= args.machines:
        ap.error(f"--replicas {replicas}: need 1 to --machines ({args.machines}) copies")
    if args.hsdp is not None:
        if not 1 <= args.hsdp <= args.machines or args.machines % args.hsdp:
            ap.error(f"--hsdp {args.hsdp}: the replica groups must divide the {args.machines} machines")
        replicas = min(replicas, args.hsdp) if args.replicas is None else replicas
        if replicas > args.hsdp:
            ap.error(f"--replicas {replicas}: HSDP's {args.hsdp} replica groups hold only {args.hsdp} of each shard")
    persist = args.persist if args.persist is not None else \
        -(-contract.DEFAULT_PERSIST // args.interval) * args.interval
    if not 1 <= persist <= 10**9 or persist % args.interval:
        ap.error(f"--persist {persist}: need a multiple of --interval ({args.interval}) up to 1e9")
    out = output_file(args.out, "-o")
    plan = default(args.machines, args.procs, replicas, args.interval, persist, args.schedule, args.hsdp)
    contract.write(plan.data, out)
    print(f"wrote {out}: {args.machines} machine(s) x {args.procs}, {replicas} cop{'y' if replicas == 1 else 'ies'} "
          f"of every checkpoint in memory{' where the HSDP replicas are' if args.hsdp else ''}, schedule "
          f"{args.schedule}, durable every {persist} iterations")
    return 0


def _root(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--store-root", help="the store root (default $GEMINI_STORE_ROOT, else /dev/shm/gemini-UID)")


def _jobs(argv) -> int:
    ap = OneLineParser(prog=f"{PROG} jobs", description="List what every job holds in memory on this host.")
    _root(ap)
    root = resolve_store_root(ap.parse_args(argv).store_root)
    held = jobs.jobs(root)
    if not held:
        print(f"no job holds memory in {root}")
        return 0
    print(f"{'job':<40} {'GiB':>8}  {'newest':>8}  {'last write':<19}  machines")
    for h in held:
        print(f"{h.job:<40} {h.bytes / 2**30:8.2f}  {h.newest if h.newest is not None else '-':>8}  "
              f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(h.modified)):<19}  "
              f"{', '.join(m.removeprefix('machine-') for m in h.machines)}")
    print(f"{sum(h.bytes for h in held) / 2**30:.2f} GiB in {root}; free a job's with: {PROG} free JOB")
    return 0


def _free(argv) -> int:
    ap = OneLineParser(prog=f"{PROG} free", description="Free jobs' memory on this host (their durable checkpoints stay).")
    ap.add_argument("job", nargs="+")
    _root(ap)
    args = ap.parse_args(argv)
    root = resolve_store_root(args.store_root)
    folders = []
    for name in args.job:
        folder = root / check_name(name, "job name")
        if not folder.is_dir() or folder.is_symlink():
            ap.error(f"no job {name!r} holds memory in {root} ({PROG} jobs lists those that do)")
        if busy := jobs.users(folder):
            ap.error(f"job {name!r} is in use by process {', '.join(map(str, busy[:5]))}: stop it first")
        folders.append((name, folder))
    for name, folder in folders:
        held = jobs.held_bytes(folder)
        jobs.free(folder)
        print(f"freed {held / 2**30:.2f} GiB of job {name}")
    return 0


COMMANDS = {"plan": _plan, "jobs": _jobs, "free": _free}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"{PROG}: error: give a command: plan, jobs or free ({PROG} COMMAND --help; the agent: python -m "
              "runtime.agent)", file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ConfigError, PlanError, ContractError) as e:  # a parser's own is said by its command already
        print(e if str(e).startswith(PROG) else f"{PROG} {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{PROG}: error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
