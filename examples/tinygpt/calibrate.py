"""Close the loop: run the runtime, profile it, let the simulator plan and predict, run each plan, compare.

``python examples/tinygpt/calibrate.py OUT_DIR`` (``make calibrate``), with the TinyGPT example (train.py beside
this file) as the training job, run by the project's agent:

1. Network: with ``--net auto`` (default) every machine gets its own network namespace and a ``tc``-limited link
   (``--mbit`` each way, see runtime/netns.py) when this host allows it, else plain localhost (then the network is
   hardly a constraint and the comparison says so).
2. Baseline: the job without checkpoints. The runtime writes its profile (first 20 iterations) and probes the
   network's point-to-point bandwidth and its memory-copy rate (OUT_DIR/baseline/).
3. For every schedule: ``gemini-sim interleave --setup OUT_DIR/baseline --schedule S --export-plan`` turns the
   measured set-up into a plan (for ``gemini``: the idle spans of the profiled iteration and the bytes for each,
   OUT_DIR/S/plan.json; the simulator's full result in OUT_DIR/S/interleave.json). Then one runtime job runs no
   checkpoint and every plan in turn, ``--block`` iterations each, ``--rounds`` times, with a checkpoint every
   iteration (OUT_DIR/rotation/): side by side, so that the host's noise (10% from run to run on a shared 2-core
   VM) hits every schedule alike.
   With ``--accel-cores K`` every run pins training's compute to K cores, standing in for the GPUs, and every other
   thread to the rest, standing in for the host CPU (train.py's --compute-cores and --host-cores): on a GPU machine
   checkpoint copies and TCP cost host CPU, not GPU time. Off by default: on a 2-core host one core for the compute
   of 4 ranks and one for all their network work saturates the latter, and the prediction of naive's checkpoint time
   then misses by 20-30% (docs/runtime.md, "Closing the loop"), while gemini's overhead was not measurably lower.
   The compute itself is by default an emulated accelerator (``--accel-ms``, see model.py beside this file): each
   block waits as a host thread waits on a GPU kernel, leaving the CPU to the checkpoint's copies, hashes and TCP, as
   a GPU machine's host CPU is. ``--accel-ms 0 --batch 4 --seq 256`` computes on the CPU for real.
   The default is 2 machines: each emulated machine then has one of this 2-core host's cores to itself, as a real
   one has its own CPU; with more machines than cores, one machine's checkpoint work takes CPU time from the
   others' collectives, which a real cluster does not do (docs/runtime.md, "Closing the loop", has both).
4. ``gemini-sim validate OUT_DIR`` prints predicted against measured iteration time, checkpoint completion time and
   overhead per schedule, with the relative errors (OUT_DIR/validate.json).

The runtime and the simulator talk only through files here: the profile and probe go one way, the plan the other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from runtime import netns as ns_mod
from runtime import schedules as run_schedules
from runtime.agent import Job, default_plan

TRAIN = Path(__file__).resolve().parent / "train.py"


def split_cores(accel: int | None) -> tuple[list[int], list[int]]:
    """(compute cores, host cores) out of the cores this process may use: the first ``accel`` (None: half) stand in
    for the accelerators; ([], []) when ``accel`` is 0 or there is a single core (nothing is pinned)."""
    cores = sorted(os.sched_getaffinity(0))
    k = len(cores) // 2 if accel is None else accel
    if k < 0 or (k and k >= len(cores)):
        raise ValueError(f"--accel-cores must be between 0 and {len(cores) - 1} on this host ({len(cores)} cores)")
    return (cores[:k], cores[k:]) if k else ([], [])


def _gemini_sim(*args: str, capture: bool = False) -> str | None:
    """Run the gemini-sim CLI; its stdout is returned with ``capture``, else it goes to ours."""
    cmd = [sys.executable, "-m", "gemini_sim.cli", *args]
    r = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True)
    if r.returncode:
        raise SystemExit(f"calibrate: `gemini-sim {' '.join(args)}` failed (exit {r.returncode})")
    return r.stdout


def _run(plan: Path, d: Path, args, netns: bool, no_checkpoint: bool = False, extra=(), iters=None) -> None:
    iters = iters or args.iters
    flags = ["--iters", str(iters), "--dim", str(args.dim), "--layers", str(args.layers),
             "--profile-iters", str(args.profile_iters), "--batch", str(args.batch), "--seq", str(args.seq),
             "--accel-ms", str(args.accel_ms), "--deterministic",  # every run trains the same, bit for bit
             *args.pin_args, *extra] + (["--no-checkpoint"] if no_checkpoint else [])
    job = Job(plan, d / "job", [str(TRAIN), *flags], netns=netns, out_dir=d, fresh=True)  # not an earlier run's
    try:
        res = job.run(timeout=args.timeout)
    finally:
        job.cleanup()
    if not res.ok:
        raise SystemExit(f"calibrate: the runtime failed in {d} ({res.root_cause or res.returncodes}; logs "
                         f"{res.logs})")
    print(f"  {d.name}: {iters} iterations in {res.wall_s:.0f} s", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python examples/tinygpt/calibrate.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default="out/calibrate", help="run directory (default out/calibrate)")
    ap.add_argument("--net", choices=("auto", "netns", "localhost"), default="auto")
    ap.add_argument("--mbit", type=float, default=400.0, help="NIC bandwidth each way with namespaces (default 400)")
    ap.add_argument("--machines", type=int, default=2, help="emulated machines (default 2: one per core of a "
                    "2-core host)")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--iters", type=int, default=30, help="iterations of the profiling run (default 30)")
    ap.add_argument("--block", type=int, default=3, help="iterations per schedule in a turn (default 3)")
    ap.add_argument("--rounds", type=int, default=10, help="turns of every schedule (default 10)")
    ap.add_argument("--profile-iters", type=int, default=20)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1, help="sequences per rank per iteration (default 1)")
    ap.add_argument("--seq", type=int, default=32, help="tokens per sequence (default 32)")
    ap.add_argument("--buffer-mb", type=float, default=2.0, help="staging buffer, two chunks (default 2 MiB)")
    ap.add_argument("--span-fill", type=float, default=0.5, help="gemini: fill at most this fraction of each idle "
                    "span (default 0.5: headroom for the jitter of a shared 2-core host)")
    ap.add_argument("--schedules", default="blocking,naive,gemini")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per runtime run")
    ap.add_argument("--accel-cores", type=int, default=0,
                    help="cores standing in for the accelerators: training's compute runs there, every other "
                    "thread (collectives, checkpoint traffic) on the rest (default 0: all threads share all cores)")
    ap.add_argument("--accel-ms", type=float, default=None,
                    help="emulated accelerator: every block's forward waits this many ms more, its backward twice "
                    "as many, with the CPU free for the checkpoint (default 100 without a GPU, 0 with one: the GPU "
                    "computes; 0 without a GPU: compute on the CPU for real, then use e.g. --batch 4 --seq 256; "
                    "see model.py beside this file)")
    args = ap.parse_args(argv)
    if args.accel_ms is None:
        import torch

        args.accel_ms = 0.0 if torch.cuda.is_available() else 100.0
    try:
        compute, host = split_cores(args.accel_cores)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.pin_args = ["--compute-cores", ",".join(map(str, compute)), "--host-cores", ",".join(map(str, host))] \
        if compute else []
    out = Path(args.out)
    schedules = [s for s in args.schedules.split(",") if s]
    for s in schedules:
        try:
            run_schedules.get(s)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.machines < 2 or args.iters < args.profile_iters or args.mbit <= 0 or args.block < 2 or args.rounds < 1 \
            or args.accel_ms < 0:
        print("error: need --machines >= 2, --iters >= --profile-iters, --mbit > 0, --block >= 2, --rounds >= 1, "
              "--accel-ms >= 0", file=sys.stderr)
        return 2
    use_ns = False
    if args.net != "localhost":
        why = ns_mod.available()
        if why and args.net == "netns":
            print(f"error: {why}", file=sys.stderr)
            return 2
        if why:
            print(f"note: {why}; running on plain localhost (the network is then hardly a constraint)")
        else:
            try:
                ns_mod.up(args.machines, args.mbit)
            except (RuntimeError, subprocess.CalledProcessError) as e:
                ns_mod.down()
                print(f"error: cannot set up the network namespaces: {e}", file=sys.stderr)
                return 2
            use_ns = True
            print(f"{args.machines} machines in network namespaces, {args.mbit:g} Mbit/s per NIC each way")
    try:
        out.mkdir(parents=True, exist_ok=True)
        base = out / "baseline"
        plan = default_plan(base / "plan.json", args.machines, 1, replicas=args.replicas)
        _run(plan, base, args, use_ns, no_checkpoint=True, extra=["--probe"])
        plans = []
        for s in schedules:
            d = out / s
            d.mkdir(parents=True, exist_ok=True)
            sim = _gemini_sim("interleave", "--setup", str(base), "--schedule", s, "--replicas", str(args.replicas),
                              "--buffer-mb", str(args.buffer_mb), "--span-fill", str(args.span_fill),
                              "--export-plan", str(d / "plan.json"), "--json", capture=True)
            (d / "interleave.json").write_text(sim)
            r = json.loads(sim)
            print(f"  {s}: simulated iteration {r['iteration_time_s']:.3f} s ({r['overhead_pct']:+.1f}%), "
                  f"checkpoint done at {r['checkpoint_complete_s']:.3f} s; plan {d / 'plan.json'}")
            plans.append(str((d / "plan.json").resolve()))
        # Every schedule and the baseline side by side in one job, in blocks, so that the host's noise hits
        # them alike.
        turns = ["none"] + plans
        _run(Path(plans[0]), out / "rotation", args, use_ns, iters=args.rounds * len(turns) * args.block,
             extra=["--rotate", ",".join(turns), "--block", str(args.block)])
    finally:
        if use_ns:
            ns_mod.down()
    (out / "setup.txt").write_text(
        f"net={'netns' if use_ns else 'localhost'} mbit={args.mbit:g} machines={args.machines} dim={args.dim} "
        f"layers={args.layers} batch={args.batch} seq={args.seq} span_fill={args.span_fill:g} block={args.block} "
        f"rounds={args.rounds} accel_ms={args.accel_ms:g} compute_cores={','.join(map(str, compute)) or 'all'} "
        f"host_cores={','.join(map(str, host)) or 'all'}\n")
    _gemini_sim("validate", str(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
