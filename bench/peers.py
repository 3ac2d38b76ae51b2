"""The runtime beside the in-memory checkpointing a user has today, the same job under each (make bench: "peers").

    python bench/peers.py [--gib 0.25 1] [--repeats 3] [--work DIR]

The job (bench/peer_job.py): TinyGPT with FSDP2 and AdamW, 2 machines x 1 rank (two torchrun nodes with a c10d
rendezvous on this host, gloo on the CPU), its state (parameters and AdamW's) ``--gib`` GiB per rank. Under each
approach, in one run, repeats alternating (the order turns each repeat) so drift from minute to minute spreads over
all of them:

- the training run: rounds of iterations without and with a checkpoint every iteration (the overhead, paired per
  round), training's stall per checkpoint (the time in the approach's calls on the training thread), then
  checkpoints taken and waited for at once (until in local memory; until on the peer, or on disk for DCP);
- rank 1 SIGKILLed (torchrun restarts both workers) and, apart, every process SIGKILLed and the job launched again:
  the iterations lost, the recovery's time, and whether the state at the end is bit for bit an uninterrupted run's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import state_path  # noqa: E402  (beside this file)
from state_path import median  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from runtime.agent import free_port  # noqa: E402  (no torch: the agent's own free port)

JOB = ROOT / "bench" / "peer_job.py"
GiB = 2 ** 30
APPROACHES = ("runtime", "lm-resiliency", "dcp-async", "dcp")
KEEP = 1  # the runtime's checkpoints kept in memory, as many as the others keep (the plan's default, 2, holds one
# more file a shard: at 1 GiB per rank, both emulated machines' stores and ranks outgrow this 24 GiB host)
KILL_AT = 3  # the kill runs die in the iteration after this one (after its backward)
SETTINGS = {
    "runtime": f"default plan (`naive`, one copy on the other machine), keep {KEEP} (the default keeps 2)",
    "lm-resiliency": "0.2.0, `save_tensors` every step, replication_jump=1, unpinned, disk tier every 100 steps",
    "dcp-async": ("`async_save` + `DefaultStager` (async staging into shared memory, unpinned), one in flight, "
                  "older ones deleted in a thread"),
    "dcp": "`dcp.save` every iteration, older ones deleted in a thread",
}


def available(approach: str) -> bool:
    if approach != "lm-resiliency":
        return True
    try:
        import lm_resiliency  # noqa: F401
    except ImportError:
        return False
    return True


def shape_for(gib: float) -> tuple[int, int]:
    """(dim, layers) of a TinyGPT of about ``gib`` GiB of parameters and AdamW state per rank of 2 (down to dim 128,
    for the tests' small states)."""
    return state_path.shape_for(gib * GiB, 2, smallest=128)


def _descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def launch(approach: str, work: Path, job_args: list[str], job: str, kill: str = "", timeout: float = 1800,
           store: Path | None = None) -> list[dict]:
    """One launch of the job under ``approach`` in ``work``: two torchrun nodes; ``kill="job@K"``: every process
    SIGKILLed once rank 0 reaches the kill point, then the job launched again. Returns each rank's result. The
    runtime's store is where it is by default, in /dev/shm (a folder of its own there, removed after; ``store``:
    another), not beside ``work``, which may be on a disk."""
    work.mkdir(parents=True, exist_ok=True)
    own_store = store is None
    if own_store:
        store = Path(tempfile.mkdtemp(prefix="gemini-peers-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        return _launch(approach, work, job_args, job, kill, timeout, store)
    finally:
        if own_store:
            shutil.rmtree(store, ignore_errors=True)


def _launch(approach: str, work: Path, job_args: list[str], job: str, kill: str, timeout: float,
            store: Path) -> list[dict]:
    if approach == "runtime" and not (work / "plan.json").exists():
        from gemini_sim import plan as contract

        plan = contract.default(2, 1)
        plan["checkpoint"]["keep"] = KEEP
        contract.write(plan, work / "plan.json")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               GEMINI_STORE_ROOT=str(store), GEMINI_DURABLE_DIR=str(work / "durable"), GEMINI_JOB=job,
               PEER_JOB=job, OMP_NUM_THREADS="1")

    def start():
        port = free_port()
        rdzv = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                f"--rdzv-id={job}-{port}", "--max-restarts=1"]
        return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *rdzv, str(JOB), "--approach",
                                  approach, "--work", str(work), *job_args, "--kill", kill],
                                 env=dict(env, GEMINI_MACHINE_ID=str(m)), cwd=work, start_new_session=True,
                                 stdout=open(work / f"node{m}.log", "a"), stderr=subprocess.STDOUT)
                for m in (0, 1)]

    def kill_all():
        for p in procs:
            for pid in _descendants(p.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in procs:
            p.wait()

    procs = start()
    deadline = time.monotonic() + timeout
    try:
        if kill.startswith("job@"):
            while not (work / "killed-at").exists():
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    break
                time.sleep(0.01)
            kill_all()
            procs = start()
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        kill_all()
        raise
    if any(p.returncode for p in procs):
        tail = (work / "node0.log").read_text()[-3000:] + (work / "node1.log").read_text()[-3000:]
        raise RuntimeError(f"peer job {approach} in {work} failed: {tail}")
    return [json.loads((work / f"result-rank-{r}.json").read_text()) for r in (0, 1)]


def run_figures(ranks: list[dict]) -> dict:
    """One training run's figures (rank 0's timings): the stall per checkpoint and the iteration without and with
    checkpoints (each block's first iteration left out), the overhead paired per round, the latencies."""
    its = [i for i in ranks[0]["iterations"] if i["pos"] > 0]
    rounds = sorted({i["round"] for i in its})
    per_round = []
    for r in rounds:
        off = median(i["iteration_s"] for i in its if i["round"] == r and not i["on"])
        on = median(i["iteration_s"] for i in its if i["round"] == r and i["on"])
        if off and on:
            per_round.append(100 * (on / off - 1))
    return {"stall_s": median(i["stall_s"] for i in its if i["on"]),
            "iteration_off_s": median(i["iteration_s"] for i in its if not i["on"]),
            "iteration_on_s": median(i["iteration_s"] for i in its if i["on"]),
            "overhead_pct": median(per_round),
            "cpu_s": _minus(median(i["cpu_s"] for i in its if i["on"]), median(i["cpu_s"] for i in its if not i["on"])),
            "local_s": median(lat[0] for lat in ranks[0]["latency"]),
            "remote_s": median(lat[1] for lat in ranks[0]["latency"]),
            "digests": digests(ranks), "state_bytes": ranks[0]["state_bytes"], "on_disk": ranks[0]["on_disk"]}


def _minus(a, b):
    return None if a is None or b is None else a - b


def digests(ranks: list[dict]) -> dict[str, list[str]]:
    """{iteration: every rank's state digest there}."""
    return {it: [r["digests"][it] for r in ranks] for it in ranks[0]["digests"]}


def kill_figures(ranks: list[dict], reference: dict[str, list[str]]) -> dict:
    """A kill run's figures: iterations lost (of the ``KILL_AT`` done when it died), the recovery's time (the
    slowest rank's), and whether every rank's state at the end is bit for bit the uninterrupted run's there."""
    got = digests(ranks)
    return {"lost": KILL_AT - ranks[0]["recovered"], "recover_s": max(r["recover_s"] for r in ranks),
            "bitwise": bool(got) and all(reference.get(it) == d for it, d in got.items())}


def kill_summary(runs: list[dict]) -> dict:
    """The repeats of one kill: the most iterations any lost, the recoveries' times (``recoveries``, of the runs
    that resumed from a checkpoint; ``recover_s`` their median), and whether every one ended bit for bit."""
    times = [r["recover_s"] for r in runs if r["lost"] < KILL_AT]
    return {"lost": max(r["lost"] for r in runs), "recover_s": median(times), "recoveries": times,
            "bitwise": all(r["bitwise"] for r in runs), "repeats": len(runs)}


def check_room(gib: float, work: Path) -> None:
    """Refuse to start, naming what is short, where the disk under ``work`` cannot hold DCP's two checkpoints of both
    ranks at once (the newest complete one and the one being written), or /dev/shm the runtime's stores: both
    machines' ``KEEP + 1`` files of their own shard and of their peer's. A state measures up to 1.25x the size asked."""
    need = 1.25 * gib * GiB * 2  # both ranks' state
    work.mkdir(parents=True, exist_ok=True)
    for where, room, what in ((work, 2 * need, "DCP's two checkpoints"),
                              (Path("/dev/shm"), (KEEP + 1) * 2 * need, "the runtime's stores")):
        free = shutil.disk_usage(where).free if where.is_dir() else room
        if free < room:
            raise RuntimeError(f"peers at {gib:g} GiB per rank: {where} has {free / 2**30:.1f} GiB free, {what} need "
                               f"{room / 2**30:.1f} GiB")


def measure(gib: float, work: Path, repeats: int = 3, rounds: int = 3, block: int = 4, latency: int = 3,
            approaches=APPROACHES, progress=print) -> dict:
    """Every approach's figures at ``gib`` GiB per rank: ``repeats`` training runs each and ``repeats`` runs of each
    kill (alternating: the order turns each repeat). Returns {approach: {"runs": [...], "worker": {...}, "job":
    {...}}}."""
    check_room(gib, work)
    dim, layers = shape_for(gib)
    shape = ["--dim", str(dim), "--layers", str(layers), "--block", str(block)]
    args = shape + ["--rounds", str(rounds), "--latency", str(latency)]
    kill_args = shape + ["--rounds", "1"]  # long enough to die and recover; compared where a round ends
    approaches = [a for a in approaches if available(a)]
    out: dict = {a: {"runs": []} for a in approaches}
    kills: dict = {(a, kind): [] for a in approaches for kind in ("worker", "job")}
    for rep in range(repeats):
        order = approaches[rep % len(approaches):] + approaches[:rep % len(approaches)]
        for a in order:
            progress(f"peers: {gib:g} GiB, {a}, run {rep + 1}/{repeats}")
            folder = work / f"{a}-run{rep}"
            out[a]["runs"].append(run_figures(launch(a, folder, args, f"peer-{rep}")))
            shutil.rmtree(folder, ignore_errors=True)
    for rep in range(repeats):
        order = approaches[rep % len(approaches):] + approaches[:rep % len(approaches)]
        for a in order:
            for kind in ("worker", "job"):
                progress(f"peers: {gib:g} GiB, {a}, {kind} SIGKILL {rep + 1}/{repeats}")
                folder = work / f"{a}-{kind}"
                ranks = launch(a, folder, kill_args, f"peer-{kind}", kill=f"{kind}@{KILL_AT}")
                kills[(a, kind)].append(kill_figures(ranks, out[a]["runs"][0]["digests"]))
                shutil.rmtree(folder, ignore_errors=True)
    for a in approaches:
        for kind in ("worker", "job"):
            out[a][kind] = kill_summary(kills[(a, kind)])
        # every approach trains the same job: the same state at the end of the rounds
        out[a]["same_training"] = all(r["digests"] == out[approaches[0]]["runs"][0]["digests"] for r in out[a]["runs"])
    return out


def _spread(values, fmt) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    med = statistics.median(values)
    return fmt(med) if len(values) == 1 else f"{fmt(med)} ({fmt(min(values))}-{fmt(max(values))})"


def ms(v: float) -> str:
    return f"{v * 1000:.0f} ms" if v >= 0.01 else f"{v * 1000:.1f} ms"


def pct(v: float) -> str:
    return f"{v:+.0f}%"


def table(gib: float, figures: dict) -> list[str]:
    """The peer table for one size: a row per measure, a column per approach (median of the repeats, their range)."""
    names = list(figures)
    first = figures[names[0]]["runs"][0]
    lines = [f"**{gib:g} GiB per rank** ({first['state_bytes'] / GiB:.2f} GiB measured: parameters and AdamW state; "
             f"iteration without checkpoints {ms(first['iteration_off_s'])})", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def row(what, cell):
        lines.append(f"| {what} | " + " | ".join(cell(figures[a]) for a in names) + " |")

    row("training stall per checkpoint", lambda f: _spread([r["stall_s"] for r in f["runs"]], ms))
    row("iteration overhead, a checkpoint every iteration", lambda f: _spread([r["overhead_pct"] for r in f["runs"]], pct))
    row("CPU per checkpoint (the process's, every thread: with less without)",
        lambda f: _spread([r["cpu_s"] for r in f["runs"]], ms))
    row("until in local memory", lambda f: _spread([r["local_s"] for r in f["runs"]], ms))
    row("until on the peer (DCP: on disk)", lambda f: _spread([r["remote_s"] for r in f["runs"]], ms))
    for kind, what in (("worker", "a worker SIGKILLed"), ("job", "every process SIGKILLed")):
        row(f"{what}: iterations lost", lambda f, k=kind: "all" if f[k]["lost"] >= KILL_AT else str(f[k]["lost"]))
        row(f"{what}: the recovery", lambda f, k=kind: _spread(f[k]["recoveries"], ms) if f[k]["lost"] < KILL_AT
            else "-")
        row(f"{what}: final state bit for bit", lambda f, k=kind: "yes" if f[k]["bitwise"] else "**no**")
    return lines


def settings() -> list[str]:
    return ["Settings: " + "; ".join(f"{a}: {SETTINGS[a]}" for a in APPROACHES) + "."]


# the rows where lower is better, compared between the runtime and the best of the others in the summary
LEADS = (("training stall per checkpoint", "stall_s"), ("iteration overhead", "overhead_pct"),
         ("CPU per checkpoint", "cpu_s"), ("until in local memory", "local_s"), ("until on the peer", "remote_s"))


def summary_rows(gib: float, figures: dict) -> list[tuple[str, str, str, str]]:
    """bench/run.py's rows: per measure, the runtime against the best of the others (medians of the repeats)."""
    rows = []
    peers = [a for a in figures if a != "runtime"]
    if "runtime" not in figures or not peers:
        return rows
    med = lambda a, k: median(r[k] for r in figures[a]["runs"])  # noqa: E731
    for what, key in LEADS:
        mine = med("runtime", key)
        theirs = [(med(a, key), a) for a in peers if med(a, key) is not None
                  and (key != "remote_s" or a == "lm-resiliency")]  # on the peer: the only other that replicates
        if mine is None or not theirs:
            continue
        best, who = min(theirs)
        fmt = pct if key == "overhead_pct" else ms
        rows.append((f"peers ({gib:g} GiB per rank): {what}, the runtime vs the best of the others ({who})",
                     f"{fmt(mine)} vs {fmt(best)}", "the runtime ahead", "pass" if mine <= best else "FAIL"))
    for kind, what in (("worker", "a worker SIGKILLed"), ("job", "every process SIGKILLed")):
        mine = figures["runtime"][kind]["recover_s"]
        theirs = [(figures[a][kind]["recover_s"], a) for a in peers if figures[a][kind]["recover_s"] is not None]
        if mine is not None and theirs:
            best, who = min(theirs)
            rows.append((f"peers ({gib:g} GiB per rank): {what}, the recovery (median of the repeats), the runtime vs "
                         f"the best of the others ({who})", f"{ms(mine)} vs {ms(best)}", "the runtime ahead",
                         "pass" if mine <= best else "FAIL"))
    lost = {a: figures[a]["job"]["lost"] for a in figures}
    rows.append((f"peers ({gib:g} GiB per rank): every process SIGKILLed, iterations lost: "
                 + ", ".join(f"{a} {v}" for a, v in lost.items()), str(lost["runtime"]), "none lost",
                 "pass" if lost["runtime"] == 0 else "FAIL"))
    exact = all(figures[a][k]["bitwise"] for a in figures for k in ("worker", "job"))
    rows.append((f"peers ({gib:g} GiB per rank): every recovered state bit for bit an uninterrupted run's",
                 "yes" if exact else "no", "yes", "pass" if exact else "FAIL"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, nargs="+", default=[0.25, 1.0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=None)
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="peers-"))
    for gib in args.gib:
        print("\n".join(table(gib, measure(gib, work / f"{gib:g}", args.repeats))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
