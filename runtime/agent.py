"""The project's agent: runs any training entry point on N local "machines", replaces lost machines, reports why a
job failed.

``python -m runtime.agent --plan plan.json [--workdir DIR] -- train.py ARGS`` (or ``-- -m package.module ARGS``).

Every "machine" is a torchrun agent (``--nnodes N --node-rank m``, static rendezvous on machine 0) running
``processes_per_machine`` copies of the entry point, with its own CPU-memory store folder, which lives in /dev/shm
and outlives the processes. The entry point is a user's script that uses :class:`runtime.Checkpointer`; it finds the
plan, store, durable folder and output folder in the environment (``GEMINI_PLAN``, ``GEMINI_STORE_ROOT``,
``GEMINI_DURABLE_DIR``, ``GEMINI_OUT_DIR``), and its ranks are ``machine * processes_per_machine + local rank``.

Recovery is the agent's job, as in GEMINI's root agent. When a worker dies, its torchrun agent exits with an error;
when a machine is lost, its torchrun agent and every worker under it are killed (SIGKILL) and its store is wiped.
Either way the agent stops the remaining machines and starts the job again on the (new) set of machines under a
fresh rendezvous; a replacement machine comes up with the lost machine's index and an empty store, and the script's
``Checkpointer.recover()`` finds the newest complete checkpoint. When a job attempt fails, the agent prints its
first root cause (the exception line, rank and machine) from the machines' logs; an attempt that fails with the
same root cause as the one before it is not retried.

Why not torchrun's own in-place restarts (``--max-restarts``, which a plain torchrun launch may use:
runtime.init_process_group starts the group again)? A lost machine's replacement needs its torchrun agent started
anew, under the lost machine's index, and a restart forced by another machine's failure does not count as one on the
healthy agents; a fresh rendezvous per job attempt, the same for every machine, keeps the attempts apart.
"""

from __future__ import annotations

import json
import os
import re
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

from .config import ConfigError, OneLineParser, check_name
from gemini_sim.plan import DEFAULT_PERSIST

from .plan import Plan, PlanError, resized
from .plan import default as default_plan_for

ROOT = Path(__file__).resolve().parent.parent
ON_LOSS = ("replace", "continue")  # what the agent does when a machine is lost
# the last line of a Python traceback: "pkg.mod.SomeError: message" (torchrun's own summary lines are skipped)
_EXC = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit))(?::\s*(.*))?$")
_SKIP = ("ChildFailedError", "SignalException")
# errors a rank raises because another rank died: the cause is elsewhere
_SECONDARY = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing", "Broken pipe",
              "connectFullMesh", "Timed out", "timed out", "was aborted", "DistNetworkError", "DistStoreError")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class JobResult:
    returncodes: dict
    events: list = field(default_factory=list)  # parsed GEMINI event records, in arrival order
    out_dir: Path = Path(".")
    wall_s: float = 0.0
    logs: dict = field(default_factory=dict)
    root_cause: str | None = None  # the first failure's exception line, rank and machine
    durable: Path = Path(".")  # the job's durable checkpoints (WORKDIR/durable/JOB)

    def records(self, msg: str) -> list[dict]:
        return [e for e in self.events if e["msg"] == msg]

    def attempts(self) -> list[list[dict]]:
        """The events of each attempt of the job, in order (the first, then one per restart by the agent)."""
        out: list[list[dict]] = [[]]
        for e in self.events:
            if e["msg"] == "job-restart":
                out.append([])
            else:
                out[-1].append(e)
        return out

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.returncodes.values())


def root_cause(log_path: Path) -> tuple[str, int | None] | None:
    """The exception a machine's log ends with, and the rank that raised it if torchrun says: ("ValueError: x",
    3)."""
    try:
        lines = Path(log_path).read_text(errors="replace").splitlines()
    except OSError:
        return None
    found, rank = None, None
    for line in lines:
        prefix = re.match(r"^\[(?:rank|default)?(\d+)\]:\s?", line.strip())  # torch's per-rank prefix
        text = line.strip()[prefix.end():] if prefix else line.strip()
        m = _EXC.match(text)
        if m and m.group(1) not in _SKIP and not text.startswith("torch.distributed.elastic"):
            if found is None:
                found, rank = text, int(prefix.group(1)) if prefix else None
        r = re.search(r"\brank\s*:\s*(\d+)\s*\(local_rank", line)
        if r and rank is None:
            rank = int(r.group(1))
    return (found, rank) if found else None


def killed_by(log_path: Path) -> tuple[int | None, str] | None:
    """(rank, signal name) when torchrun reports a worker killed by a signal."""
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"\brank\s*:\s*(\d+)\s*\(local_rank.*?\n.*?exitcode\s*:\s*-\d+.*?\((SIG[A-Z]+)\)", text, re.S)
    return (int(m.group(1)), m.group(2)) if m else None


class Job:
    """One training job on ``plan``'s machines: ``entry`` (a script and its arguments, or ``["-m", module, ...]``)
    runs under a torchrun agent per machine."""

    def __init__(self, plan_path, workdir, entry, faults="", store_root=None, max_restarts=4, netns: bool | int = False,
                 out_dir=None, job_name="job", python=sys.executable, env=None, fresh: bool = False,
                 on_loss: str = "replace"):
        """``fresh``: start the job afresh, dropping what an earlier run of it left in ``workdir`` (its durable
        checkpoints and record); else a job of the same name there is resumed (runtime/job.py). ``on_loss``: when a
        machine is lost, ``replace`` it (a new machine, empty memory, under its index) or ``continue`` on the
        machines left, with a plan for them (runtime/plan.py: :func:`resized`), resharding the state from their
        memory."""
        if on_loss not in ON_LOSS:
            raise ConfigError(f"on_loss {on_loss!r}: choose one of {', '.join(ON_LOSS)}")
        check_name(job_name, "job name")
        self.on_loss = on_loss
        self.plan = Plan.load(plan_path)
        if not entry:
            raise ConfigError("no entry point: give the training script and its arguments after --")
        self.entry = [str(e) for e in entry]
        self.plan_path = Path(plan_path).resolve()
        self.n = self.plan.machines
        self.ppm = self.plan.processes_per_machine
        self.store_ids = list(range(self.n))  # the store folder (GEMINI_MACHINE_ID) of each machine, by index
        self.work = Path(workdir)
        self.durable = self.work / "durable"
        self.out = Path(out_dir) if out_dir else self.work / "out"
        self.max_restarts = max_restarts
        from .testing.faults import parse, spec

        # a malformed fault is an error now, not in every worker; 'lose' faults are the agent's to carry out
        self.faults_left: list[str] = []  # those that have not struck yet (each strikes once)
        self.to_lose: dict[int, set[int]] = {}  # iteration -> the machines lost there, together
        for kind, who, it in parse(faults):
            limit, what = (self.n, "machine") if kind == "lose" else (self.n * self.ppm, "rank")
            if who >= limit:
                raise ConfigError(f"fault {spec(kind, who, it)}: no {what} {who} in a job of {limit} {what}s")
            if spec(kind, who, it) in self.faults_left:
                raise ConfigError(f"fault {spec(kind, who, it)} is given twice")
            self.faults_left.append(spec(kind, who, it))
            if kind == "lose":
                self.to_lose.setdefault(it, set()).add(who)
        if entry[0] != "-m" and not Path(entry[0]).is_file():
            raise ConfigError(f"no training script {entry[0]}" + (" (is a folder)" if Path(entry[0]).is_dir() else ""))
        self.python, self.job_name, self.extra_env = python, job_name, dict(env or {})
        self.port = 0
        self.launch_id = f"{os.getpid()}-{time.time_ns()}"  # tags every process of this job, for cleanup
        self.events: list[dict] = []
        self.procs: dict[int, subprocess.Popen] = {}
        self.pumps: list[threading.Thread] = []  # the readers of the machines' output, one per machine started
        self.generation: dict[int, int] = {}
        self.lock = threading.Lock()
        self.job_attempt = 0  # bumped whenever the agent restarts the job on a new machine set
        self.waiting: set[int] = set()  # machines paused at a 'lose' fault, waiting to be killed
        self.causes: list[str] = []
        # netns: False (localhost), True (the namespaces of `make netns-up`) or the tag of another set-up
        self.netns = None if netns is False else int(netns is not True and netns)
        self.host = "127.0.0.1"
        if self.netns is not None:
            from . import netns as ns_mod

            state = ns_mod.current(self.netns)
            if state is None or state["machines"] < self.n:
                raise ConfigError(f"no network namespaces for {self.n} machines: run `make netns-up "
                                 f"MACHINES={self.n}` (or python -m runtime.netns up --machines {self.n})")
            self.host = ns_mod.addr(0, self.netns)  # machine 0's torchrun agent hosts the rendezvous
        # folders last, once nothing above can refuse the job: a refused job leaves none behind (in /dev/shm either)
        if fresh:
            shutil.rmtree(self.durable / job_name, ignore_errors=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.store_root = Path(store_root or tempfile.mkdtemp(prefix="gemini-rt-", dir="/dev/shm"
                                                              if Path("/dev/shm").is_dir() else None))

    # -- machines ------------------------------------------------------------------------------------------------
    def start_machine(self, m: int) -> None:
        gen = self.generation.get(m, -1) + 1
        self.generation[m] = gen
        env = dict(os.environ, **self.extra_env, GEMINI_MACHINE_ID=str(self.store_ids[m]),
                   GEMINI_FAULT=",".join(self.faults_left),
                   OMP_NUM_THREADS="1", GEMINI_LAUNCH_ID=self.launch_id, GEMINI_EVENTS="1",
                   GEMINI_MACHINE_GENERATION=str(gen), GEMINI_JOB_ATTEMPT=str(self.job_attempt),
                   GEMINI_PLAN=str(self.plan_path), GEMINI_STORE_ROOT=str(self.store_root),
                   GEMINI_DURABLE_DIR=str(self.durable.resolve()), GEMINI_OUT_DIR=str(self.out.resolve()),
                   GEMINI_JOB=self.job_name, GEMINI_HOST_RANKS=str(self.n * self.ppm),
                   GEMINI_HOST_RANK_BASE=str(m * self.ppm),  # every machine on this host shares its GPUs
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        prefix, local = [], []
        if self.netns is not None:  # this machine's processes live in its namespace, behind its limited NIC
            from . import netns as ns_mod

            prefix, nic_env = ns_mod.inside(m, self.netns)
            local = [f"--local-addr={ns_mod.addr(m, self.netns)}"]
            env.update(nic_env)
        cmd = prefix + [
               self.python, "-m", "torch.distributed.run", f"--nnodes={self.n}", f"--nproc-per-node={self.ppm}",
               f"--node-rank={m}", f"--master-addr={self.host}", f"--master-port={self.port}", *local,
               "--rdzv-backend=static", "--max-restarts=0", "--monitor-interval=0.5", *self.entry]
        log = open(self.work / f"machine-{m}.{gen}.log", "w", buffering=1)  # line by line, as it comes
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, cwd=os.getcwd(),
                             start_new_session=True, text=True)
        self.procs[m] = p
        pump = threading.Thread(target=self._pump, args=(m, p, log), daemon=True)
        pump.start()
        self.pumps.append(pump)

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
                    if rec.get("fault") in self.faults_left:  # it struck: not again in a later attempt
                        self.faults_left.remove(rec["fault"])
                    if rec["msg"] == "lose-me":
                        self.waiting.add(m)
        log.close()

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
        for pid in [p.pid] + self._pids(self.store_ids[m]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()

    def _cause(self, failed: list[int]) -> tuple[int, str, int, bool] | None:
        """The root cause in the machines' logs, as (its kind, one line, machine, whether the rank is known). Kinds:
        an exception a rank raised (0), a worker killed by a signal (1), an error that only says another rank went
        away (2). Every machine's log is read, the failed ones first: a machine whose agent has not exited yet may
        already hold the real cause."""
        found = []
        for m in failed + [m for m in range(self.n) if m not in failed]:
            log = self.work / f"machine-{m}.{self.generation[m]}.log"
            cause = root_cause(log)
            if cause:
                text, rank = cause
                rank_of = rank if rank is not None else "?"
                found.append((2 if any(s in text for s in _SECONDARY) else 0,
                              f"{text} (rank {rank_of}, machine {m})", m, rank is not None))
            elif m in failed:
                sig = killed_by(log)
                if sig:
                    found.append((1, f"a worker of machine {m} was killed by {sig[1]} (rank {sig[0]})", m, True))
        return min(found, key=lambda f: f[0]) if found else None

    def _settled_cause(self, failed: list[int], grace: float = 10.0) -> str:
        """The root cause once the logs settle: while only errors that blame another rank are found, wait up to
        ``grace`` seconds (or until every agent has exited) for the rank that really failed to write its
        exception, and for its agent to name the rank."""
        deadline = time.time() + grace
        time.sleep(0.3)
        while True:
            found = self._cause(failed)
            done = all(p.poll() is not None for p in self.procs.values())
            named = found and (found[3] or self.procs[found[2]].poll() is not None)
            if (found and found[0] <= 1 and named) or done or time.time() > deadline:
                break
            time.sleep(0.2)
            failed = [m for m, p in self.procs.items() if p.poll() not in (None, 0)]
        if found:
            return found[1]
        return f"the agent of machine {failed[0]} exited with code {self.procs[failed[0]].returncode}"

    def restart_job(self, lost: list[int], why: str) -> None:
        """Lose machines (kill them, wipe their memory), stop the others, and start the job again: on as many
        machines, the lost ones replaced, or (``on_loss="continue"``) on the machines left, renumbered in order, with
        a plan for them."""
        for m in lost:
            self._kill(m)
            shutil.rmtree(self.store_root / self.job_name / f"machine-{self.store_ids[m]:04d}", ignore_errors=True)
            with self.lock:
                self.events.append({"msg": "machine-lost", "machine": m, "t": time.time()})
        for m in range(self.n):
            if m not in lost:
                self._kill(m)  # its processes go; its CPU-memory store stays
        self._drain()  # every event of the attempt is in, so the faults that struck stay out of the next one
        with self.lock:
            self.events.append({"msg": "job-restart", "why": why, "machine": -1, "t": time.time()})
        if self.on_loss == "continue" and lost and len(lost) < self.n:
            self.store_ids = [sid for m, sid in enumerate(self.store_ids) if m not in lost]
            self.n = len(self.store_ids)
            self.plan = resized(self.plan, self.n)
            self.plan_path = (self.work / f"plan-{self.n}-machines.json").resolve()
            from gemini_sim import plan as contract

            contract.write(self.plan.data, self.plan_path)
            with self.lock:
                self.events.append({"msg": "job-resized", "machines": self.n, "plan": str(self.plan_path),
                                    "machine": -1, "t": time.time()})
        self.procs = {}
        self.job_attempt += 1
        self.waiting.clear()
        self.port = free_port()
        for m in range(self.n):
            self.start_machine(m)

    def _drain(self) -> None:
        """Wait until the readers have read every line the stopped machines wrote."""
        for pump in self.pumps:
            pump.join(timeout=5)

    # -- the job -------------------------------------------------------------------------------------------------
    def run(self, timeout: float = 600, echo=None) -> JobResult:
        """Run to completion, losing the machines named by ``lose:MACHINE:ITER`` faults when they reach ITER (those
        of one ITER together, before any replacement starts: a replica group can be lost at once; those of a later
        ITER in a later attempt). ``echo(line)`` is told of every failure as it happens."""
        t0 = time.time()
        self.port = free_port()
        pending = {it: set(machines) for it, machines in self.to_lose.items()}
        cause = None
        try:
            for m in range(self.n):
                self.start_machine(m)
            while True:
                with self.lock:
                    due = [it for it, lost in pending.items() if lost <= self.waiting]
                if due:
                    self.restart_job(sorted(pending.pop(due[0])), "machines lost")
                failed = [m for m, p in self.procs.items() if p.poll() not in (None, 0)]
                if failed:
                    cause = self._settled_cause(failed)
                    if echo:
                        echo(f"job attempt {self.job_attempt} failed: {cause}")
                    repeated = bool(self.causes) and self.causes[-1] == cause
                    self.causes.append(cause)
                    if self.job_attempt >= self.max_restarts or repeated:
                        if repeated and echo:
                            echo("the same error as the attempt before: not retrying")
                        break
                    with self.lock:  # a machine that announced its loss as another failed is lost all the same
                        lost = sorted(self.waiting)
                    pending = {it: left for it, machines in pending.items() if (left := machines - set(lost))}
                    self.restart_job(lost, f"machine {failed[0]} failed: {cause}")
                    continue
                cause = None
                if all(p.poll() is not None for p in self.procs.values()):  # a loss never due is not waited for
                    break
                if time.time() - t0 > timeout:
                    raise TimeoutError(f"job did not finish in {timeout:.0f} s (logs in {self.work})")
                time.sleep(0.2)
        finally:
            for m in self.procs:
                self._kill(m)
            self._drain()  # every line the machines wrote is in the logs and events, also after a timeout
        return JobResult({m: p.returncode for m, p in self.procs.items()}, list(self.events), self.out,
                         time.time() - t0, {m: str(self.work / f"machine-{m}.{g}.log")
                                            for m, g in self.generation.items()}, cause, self.durable / self.job_name)

    def cleanup(self) -> None:
        shutil.rmtree(self.store_root, ignore_errors=True)


def default_plan(path, machines: int, ppm: int, replicas: int = 2, interval: int = 1,
                 persist: int = DEFAULT_PERSIST, schedule: str = "naive") -> Path:
    """Write the default plan (runtime/plan.py's :func:`default`) to ``path``."""
    from gemini_sim import plan as contract

    contract.write(default_plan_for(machines, ppm, replicas, interval, persist, schedule).data, path)
    return Path(path)


def summarize(res: JobResult, out=print) -> None:
    for e in res.events:
        if e["msg"] in ("fault", "machine-lost"):
            out(f"  FAILURE: {e.get('what', 'machine lost')} (rank {e.get('rank', '-')}, machine {e['machine']})")
        elif e["msg"] == "job-resized":
            out(f"  the job goes on on {e['machines']} machine(s), plan {e['plan']}")
        elif e["msg"] == "recovered":
            out(f"  rank {e['rank']}: recovered iteration {e['iteration']} from {e['tier']}"
                + (f" (machine {e['source_machine']})" if e["tier"] == "peer" else "")
                + (f" (written by {e['from_world']} ranks)" if "from_world" in e else "") + f" in {e['seconds']} s"
                + (f" (fetch {e['fetch_s']}, load {e['restore_s']}, checks {e['confirm_s']})" if "restore_s" in e
                   else ""))
    its = [e for e in res.records("iteration") if e["rank"] == 0]
    if its:
        out(f"  rank 0 finished iteration {its[-1]['iteration']}")
    out(f"  job {'finished' if res.ok else 'FAILED'} in {res.wall_s:.1f} s; exit codes {res.returncodes}"
        + (f"; root cause: {res.root_cause}" if res.root_cause and not res.ok else ""))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    entry = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = OneLineParser(prog="python -m runtime.agent", usage="%(prog)s [options] -- ENTRY [ARGS...]",
                                 description="Run a training script that uses runtime.Checkpointer on N local "
                                 "'machines', replacing lost ones. ENTRY: a script, or -m MODULE.")
    ap.add_argument("--plan", help="plan.json (default: GEMINI's placement for --machines x --procs, m=2, a "
                    "checkpoint every iteration)")
    ap.add_argument("--machines", type=int, default=4)
    ap.add_argument("--procs", type=int, default=2, help="processes per machine (without --plan)")
    ap.add_argument("--workdir", default="out/runtime", help="logs, durable checkpoints (durable/), outputs (out/)")
    ap.add_argument("--job", default="job", help="the job's name (default job): a later run of the same name in the "
                    "same --workdir resumes it from its durable checkpoints")
    ap.add_argument("--fresh", action="store_true", help="start the job afresh, dropping what an earlier run of it "
                    "left in --workdir")
    ap.add_argument("--max-restarts", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds before the job is stopped")
    ap.add_argument("--fault", default="", help="test faults, e.g. kill:3:7 (rank 3 dies in iteration 7), lose:1:5 "
                    "(machine 1 is lost in iteration 5); comma-separated, each strikes once, a later one after "
                    "the recovery from an earlier one (runtime/testing/faults.py)")
    ap.add_argument("--on-loss", choices=ON_LOSS, default="replace", help="when a machine is lost: replace it "
                    "(default), or continue on the machines left, with a plan for them, the state resharded from "
                    "their memory")
    ap.add_argument("--netns", action="store_true", help="run every machine in its network namespace (make "
                    "netns-up first): links limited by tc instead of plain localhost")
    made = None  # the default plan, written into the workdir only once the job is accepted
    try:
        args = ap.parse_args(own)
        if not entry:
            ap.error("no entry point: put the training script and its arguments after --")
        if not (1 <= args.machines <= 64 and 1 <= args.procs <= 64 and 0 <= args.max_restarts <= 100
                and 0 < args.timeout < 1e7):
            ap.error("need 1 <= --machines, --procs <= 64, 0 <= --max-restarts <= 100, 0 < --timeout < 1e7")
        work = Path(args.workdir)
        if args.plan:
            plan_path = args.plan
        else:
            made = Path(tempfile.mkdtemp(prefix="gemini-plan-")) / "plan.json"
            plan_path = default_plan(made, args.machines, args.procs, replicas=min(2, args.machines))
        job = Job(plan_path, work, entry, faults=args.fault, netns=args.netns, max_restarts=args.max_restarts,
                  job_name=args.job, fresh=args.fresh, on_loss=args.on_loss)
        if made is not None:
            job.plan_path = (work / "plan.json").resolve()
            shutil.move(made, job.plan_path)
    except (ValueError, PlanError, OSError) as e:
        msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
        print(msg if msg.startswith(ap.prog) else f"{ap.prog}: error: {msg}", file=sys.stderr)
        return 2
    finally:
        if made is not None:
            shutil.rmtree(made.parent, ignore_errors=True)
    try:
        res = job.run(timeout=args.timeout, echo=lambda line: print(f"agent: {line}", file=sys.stderr, flush=True))
    except TimeoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        job.cleanup()
    summarize(res)
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
