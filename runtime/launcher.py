"""The root agent: hosts the key-value store the machines rendezvous through, starts one torchrun agent per
machine, watches their progress, and replaces lost machines.

Every "machine" is a torchrun agent (``--nnodes N``, c10d rendezvous on this store) running ``processes_per_machine``
workers, with its own CPU-memory store directory, which lives in /dev/shm and outlives the processes.

Recovery is the root agent's job, as in GEMINI. When a worker dies, its agent exits with an error; when a machine is
lost, its agent and every worker under it are killed (SIGKILL to the process group) and its store is wiped. Either
way the root agent stops the remaining agents and starts the job again on the (new) set of machines, under a fresh
key-value store and rendezvous id; a replacement machine comes up with the lost machine's id and an empty store.

Why not torchrun's own in-place restarts (``--max-restarts``)? In torch 2.13 the workers of every restart share one
store without a per-attempt prefix, and a restart forced by another machine's failure does not count as a restart
on the healthy agents, so restarted ranks can read the network addresses of the dead ones and fail to connect
(seen here: "Connection refused" in gloo's connectFullMesh). Likewise a brand-new agent cannot join running agents in
a later rendezvous round (it waits for bootstrap keys they published only in their first round). A fresh store per
job attempt avoids both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from gemini_sim.plan import UserError  # the Plan reader's error: bad input, one line

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class JobResult:
    returncodes: dict
    events: list = field(default_factory=list)  # parsed GEMINI log records, in arrival order
    out_dir: Path = Path(".")
    wall_s: float = 0.0
    logs: dict = field(default_factory=dict)

    def records(self, msg: str) -> list[dict]:
        return [e for e in self.events if e["msg"] == msg]

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.returncodes.values())


class Job:
    def __init__(self, plan_path, workdir, iters=20, seed=0, dim=64, layers=2, faults="", store_root=None,
                 max_restarts=4, pg_timeout=120.0, extra_args=(), no_checkpoint=False, python=sys.executable,
                 netns: bool | int = False, out_dir=None):
        from gemini_sim import plan as plan_mod  # the runtime reads gemini_sim only through the Plan

        from .traffic import SCHEDULES

        self.plan = plan_mod.read(plan_path)
        if self.plan["schedule"]["name"] not in SCHEDULES:
            raise ValueError(f"{plan_path}: schedule {self.plan['schedule']['name']!r} is not run by the runtime "
                             f"(it runs {', '.join(SCHEDULES)})")
        self.plan_path = Path(plan_path)
        self.n = self.plan["cluster"]["machines"]
        self.ppm = self.plan["cluster"]["processes_per_machine"]
        self.work = Path(workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.store_root = Path(store_root or tempfile.mkdtemp(prefix="gemini-rt-", dir="/dev/shm"
                                                              if Path("/dev/shm").is_dir() else None))
        self.durable = self.work / "durable"
        self.out = Path(out_dir) if out_dir else self.work / "out"
        self.iters, self.seed, self.dim, self.layers = iters, seed, dim, layers
        self.faults, self.max_restarts, self.pg_timeout = faults, max_restarts, pg_timeout
        self.extra = list(extra_args) + (["--no-checkpoint"] if no_checkpoint else [])
        self.python = python
        self.port = 0
        self.store = None
        self.launch_id = f"{os.getpid()}-{time.time_ns()}"  # tags every process of this job, for cleanup
        self.events: list[dict] = []
        self.procs: dict[int, subprocess.Popen] = {}
        self.generation: dict[int, int] = {}
        self.lock = threading.Lock()
        self.job_attempt = 0  # bumped whenever the root agent restarts the job on a new machine set
        self.waiting: set[int] = set()  # machines paused at a 'lose' fault, waiting to be killed
        self.to_lose = {int(f.split(":")[1]) for f in faults.split(",") if f.startswith("lose:")}
        # netns: False (localhost), True (the namespaces of `make netns-up`) or the tag of another set-up
        self.netns = None if netns is False else int(netns is not True and netns)
        self.host = "127.0.0.1"
        if self.netns is not None:
            from . import netns as ns_mod

            state = ns_mod.current(self.netns)
            if state is None or state["machines"] < self.n:
                raise ValueError(f"no network namespaces for {self.n} machines: run `make netns-up "
                                 f"MACHINES={self.n}` (or python -m runtime.netns up --machines {self.n})")
            self.host = ns_mod.host_addr(self.netns)

    # -- machines ------------------------------------------------------------------------------------------------
    def start_machine(self, m: int) -> None:
        gen = self.generation.get(m, -1) + 1
        self.generation[m] = gen
        env = dict(os.environ, GEMINI_MACHINE_ID=str(m), GEMINI_FAULT=self.faults, OMP_NUM_THREADS="1",
                   GEMINI_LAUNCH_ID=self.launch_id,
                   GEMINI_MACHINE_GENERATION=str(gen), GEMINI_JOB_ATTEMPT=str(self.job_attempt),
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        prefix, local = [], []
        if self.netns is not None:  # this machine's processes live in its namespace, behind its limited NIC
            from . import netns as ns_mod

            prefix = ["ip", "netns", "exec", ns_mod.ns(m, self.netns)]
            local = [f"--local-addr={ns_mod.addr(m, self.netns)}"]
            env["GLOO_SOCKET_IFNAME"] = ns_mod.nic(m, self.netns)
        cmd = prefix + [
               self.python, "-m", "torch.distributed.run", f"--nnodes={self.n}", f"--nproc-per-node={self.ppm}",
               *local, "--rdzv-backend=c10d", f"--rdzv-endpoint={self.host}:{self.port}",
               f"--rdzv-id=gemini-{self.job_attempt}",
               "--rdzv-conf=is_host=False,join_timeout=120,last_call_timeout=1,keep_alive_interval=1,"
               "keep_alive_max_attempt=3,close_timeout=10",
               "--max-restarts=0", "--monitor-interval=0.5", "-m", "runtime.worker",
               "--plan", str(self.plan_path.resolve()), "--store-root", str(self.store_root),
               "--durable-dir", str(self.durable.resolve()), "--out-dir", str(self.out.resolve()),
               "--iters", str(self.iters), "--seed", str(self.seed), "--dim", str(self.dim),
               "--layers", str(self.layers), "--pg-timeout", str(self.pg_timeout), *self.extra]
        log = open(self.work / f"machine-{m}.{gen}.log", "w")
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, cwd=ROOT, start_new_session=True,
                             text=True)
        self.procs[m] = p
        threading.Thread(target=self._pump, args=(m, p, log), daemon=True).start()

    def _pump(self, m: int, p: subprocess.Popen, log) -> None:
        for line in p.stdout:
            log.write(line)
            if line.startswith("GEMINI "):
                try:
                    rec = json.loads(line[7:])
                except json.JSONDecodeError:
                    continue
                rec["machine"] = m
                with self.lock:
                    self.events.append(rec)
                    if rec["msg"] == "lose-me":
                        self.waiting.add(m)
        log.flush()

    def _pids(self, machine: int | None = None) -> list[int]:
        """Every live process of this job (of one machine, if given), found by the tags in its environment: torchrun
        starts workers in sessions of their own, so killing an agent's process group would orphan them."""
        want = f"GEMINI_LAUNCH_ID={self.launch_id}".encode()
        mine = f"GEMINI_MACHINE_ID={machine}".encode() if machine is not None else None
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                env = (d / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if want in env and (mine is None or mine in env):
                out.append(int(d.name))
        return out

    def _kill(self, m: int) -> None:
        """SIGKILL machine m: its agent and every worker under it."""
        p = self.procs[m]
        for pid in [p.pid] + self._pids(m):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()

    def _new_store(self, timeout: float):
        from datetime import timedelta

        from torch.distributed import TCPStore

        self.port = free_port()
        self.store = TCPStore("127.0.0.1", self.port, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=timeout))

    def restart_job(self, lost: list[int], why: str, timeout: float) -> None:
        """Lose machines (kill them, wipe their memory), stop the others, and start the job again."""
        for m in lost:
            self._kill(m)
            shutil.rmtree(self.store_root / f"machine-{m:04d}", ignore_errors=True)
            with self.lock:
                self.events.append({"msg": "machine-lost", "machine": m, "t": time.time()})
        for m in range(self.n):
            if m not in lost:
                self._kill(m)  # its processes go; its CPU-memory store stays
        with self.lock:
            self.events.append({"msg": "job-restart", "why": why, "machine": -1, "t": time.time()})
        self.job_attempt += 1
        self.waiting.clear()
        self._new_store(timeout)
        for m in range(self.n):
            self.start_machine(m)

    # -- the job -------------------------------------------------------------------------------------------------
    def run(self, timeout: float = 600) -> JobResult:
        """Run to completion, losing the machines named by ``lose:MACHINE:ITER`` faults when they reach ITER (all of
        them before any replacement starts: a replica group can be lost at once)."""
        t0 = time.time()
        self._new_store(timeout)
        pending = set(self.to_lose)
        try:
            for m in range(self.n):
                self.start_machine(m)
            while True:
                with self.lock:
                    ready = pending and pending <= self.waiting
                if ready:
                    self.restart_job(sorted(pending), "machines lost", timeout)
                    pending = set()
                failed = [m for m, p in self.procs.items() if p.poll() not in (None, 0)]
                if failed:
                    if self.job_attempt >= self.max_restarts:
                        break
                    self.restart_job([], f"agent of machine {failed[0]} failed", timeout)
                    continue
                if all(p.poll() is not None for p in self.procs.values()) and not pending:
                    break
                if time.time() - t0 > timeout:
                    raise TimeoutError(f"job did not finish in {timeout:.0f} s (logs in {self.work})")
                time.sleep(0.2)
        finally:
            for m in self.procs:
                self._kill(m)
            self.store = None
        time.sleep(0.3)
        return JobResult({m: p.returncode for m, p in self.procs.items()}, list(self.events), self.out,
                         time.time() - t0, {m: str(self.work / f"machine-{m}.{g}.log")
                                            for m, g in self.generation.items()})

    def cleanup(self) -> None:
        shutil.rmtree(self.store_root, ignore_errors=True)


def default_plan(path, machines: int, ppm: int, replicas: int = 2, interval: int = 1, persist: int = 5) -> Path:
    """A plan for the runtime when none is given: GEMINI's group/mixed placement."""
    from gemini_sim import placement, plan as plan_mod

    strategy = "group" if machines % replicas == 0 else "mixed"
    pl = placement.build(strategy, machines, replicas)
    d = plan_mod.make(machines=machines, processes_per_machine=ppm, placement_strategy=strategy, holders=pl.holders,
                      schedule="naive", chunk_bytes=1 << 20, buffer_bytes=1 << 21, interval_iters=interval,
                      persist_interval_iters=persist)
    plan_mod.write(d, path)
    return Path(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.launcher",
                                 description="Run the runtime's training job on N local 'machines'.")
    ap.add_argument("--plan", help="plan.json (default: group placement, m=2, checkpoint every iteration)")
    ap.add_argument("--machines", type=int, default=4)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--workdir", default="out/runtime")
    ap.add_argument("--fault", default="", help="e.g. kill:3:7 (rank 3 dies in iteration 7), lose:1:5 (machine 1 "
                    "is lost in iteration 5); comma-separated")
    ap.add_argument("--netns", action="store_true", help="run every machine in its network namespace (make "
                    "netns-up first): links limited by tc instead of plain localhost")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    try:
        plan_path = args.plan or default_plan(work / "plan.json", args.machines, args.procs)
        job = Job(plan_path, work, iters=args.iters, faults=args.fault, netns=args.netns)
    except (ValueError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = job.run()
    job.cleanup()
    summarize(res)
    return 0 if res.ok else 1


def summarize(res: JobResult) -> None:
    for e in res.events:
        if e["msg"] in ("fault", "machine-lost"):
            print(f"  FAILURE: {e.get('what', 'machine lost')} (rank {e.get('rank', '-')}, machine {e['machine']})")
        elif e["msg"] == "recovered":
            print(f"  rank {e['rank']}: recovered iteration {e['iteration']} from {e['tier']}"
                  + (f" (machine {e['source_machine']})" if e["tier"] == "peer" else "") + f" in {e['seconds']} s")
    its = [e for e in res.records("iteration") if e["rank"] == 0]
    if its:
        print(f"  rank 0 finished iteration {its[-1]['iteration']} with loss {its[-1]['loss']}")
    print(f"  job {'finished' if res.ok else 'FAILED'} in {res.wall_s:.1f} s; exit codes {res.returncodes}")


if __name__ == "__main__":
    sys.exit(main())
