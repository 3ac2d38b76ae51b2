"""The agent: it runs any entry point, ties ranks to machines, names a failed job's root cause within seconds, and
does not retry an error that repeats; its command line refuses bad input in one line."""

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from runtime.agent import Job, default_plan, root_cause

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent

FAILING = textwrap.dedent("""
    import os, torch.distributed as dist
    dist.init_process_group("gloo")
    assert dist.get_rank() == int(os.environ["GEMINI_MACHINE_ID"]) * 1 + int(os.environ["LOCAL_RANK"])
    if dist.get_rank() == 1:
        raise ValueError("bad batch size 0 in the user's config")
    dist.barrier()
""")


def test_a_failing_script_is_reported_by_its_root_cause_and_not_retried(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(FAILING)
    plan = default_plan(tmp_path / "plan.json", 2, 1)
    lines = []
    job = Job(plan, tmp_path / "job", [str(script)], max_restarts=4)
    try:
        res = job.run(timeout=120, echo=lines.append)
    finally:
        job.cleanup()
    assert not res.ok
    assert res.root_cause == "ValueError: bad batch size 0 in the user's config (rank 1, machine 1)"
    assert lines[0] == "job attempt 0 failed: " + res.root_cause
    assert lines[-1] == "the same error as the attempt before: not retrying"
    assert len(res.records("job-restart")) == 1  # tried twice, not max_restarts + 1 times
    assert res.wall_s < 60


BLAMES_THE_OTHER = textwrap.dedent("""
    import os, time
    if os.environ["GEMINI_MACHINE_ID"] == "0":
        raise RuntimeError("Connection closed by peer [127.0.0.1]:1453")  # what gloo says when a peer dies
    time.sleep(3)  # the rank that really failed writes its exception late
    raise ValueError("bad learning rate")
""")


def test_an_error_that_blames_another_rank_waits_for_the_real_cause(tmp_path):
    script = tmp_path / "late.py"
    script.write_text(BLAMES_THE_OTHER)
    lines = []
    job = Job(default_plan(tmp_path / "plan.json", 2, 1), tmp_path / "job", [str(script)], max_restarts=0)
    try:
        res = job.run(timeout=120, echo=lines.append)
    finally:
        job.cleanup()
    assert res.root_cause == "ValueError: bad learning rate (rank 1, machine 1)"
    assert lines == ["job attempt 0 failed: " + res.root_cause]


WAITS_TO_BE_TOLD = textwrap.dedent("""
    import os, sys, time
    print("a line from machine", os.environ["GEMINI_MACHINE_ID"], flush=True)
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.05)
""")


def test_machine_logs_are_written_as_lines_come_and_a_loss_never_due_is_not_waited_for(tmp_path):
    script, go = tmp_path / "wait.py", tmp_path / "go"
    script.write_text(WAITS_TO_BE_TOLD)
    job = Job(default_plan(tmp_path / "plan.json", 2, 1), tmp_path / "job", [str(script), str(go)],
              faults="lose:1:99")  # an iteration this job never reaches
    box = {}
    runner = threading.Thread(target=lambda: box.update(res=job.run(timeout=60)))
    runner.start()
    log = tmp_path / "job" / "machine-0.0.log"
    deadline = time.monotonic() + 50
    while not (log.exists() and "a line from machine 0" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = log.read_text() if log.exists() else ""
    go.touch()
    runner.join(70)
    job.cleanup()
    assert "a line from machine 0" in seen  # in the log while the machine still ran
    assert box["res"].ok  # ended with its machines, not at the timeout


ANNOUNCES_WHILE_ANOTHER_FAILS = textwrap.dedent("""
    import json, os, sys, time
    marker = sys.argv[1]
    if os.environ["GEMINI_JOB_ATTEMPT"] == "0":
        if os.environ["GEMINI_MACHINE_ID"] == "1":  # as the fault tooling does at lose:1:5
            print("GEMINI " + json.dumps({"t": time.time(), "rank": 1, "msg": "lose-me", "iteration": 5,
                                          "fault": "lose:1:5"}), flush=True)
            open(marker, "w").close()
            time.sleep(600)  # until the agent kills this machine
        while not os.path.exists(marker):
            time.sleep(0.05)
        time.sleep(0.5)
        raise ValueError("machine 0 fails while machine 1 waits to be lost")
""")


def test_a_machine_that_announced_its_loss_is_lost_when_another_fails_meanwhile(tmp_path):
    script = tmp_path / "both.py"
    script.write_text(ANNOUNCES_WHILE_ANOTHER_FAILS)
    job = Job(default_plan(tmp_path / "plan.json", 3, 1), tmp_path / "job", [str(script), str(tmp_path / "m")],
              faults="lose:1:5,lose:2:5")  # machine 2 would go with it, but this run never gets it there
    try:
        res = job.run(timeout=60)
    finally:
        job.cleanup()
    assert res.ok
    assert [e["machine"] for e in res.records("machine-lost")] == [1]
    assert "machine 0 fails" in res.records("job-restart")[0]["why"]
    assert job.generation == {0: 1, 1: 1, 2: 1}


def test_root_cause_reads_the_first_exception_of_a_machine_log(tmp_path):
    log = tmp_path / "m.log"
    log.write_text(textwrap.dedent("""
        W1125 torch/distributed/run.py: something
        [rank3]: Traceback (most recent call last):
        [rank3]:   File "train.py", line 9, in <module>
        [rank3]: runtime.plan.PlanError: plan.json: $.cluster.machines: 0 is less than the minimum of 1
        Traceback (most recent call last):
        torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
        Root Cause (first observed failure):
          rank      : 3 (local_rank: 1)
    """))
    assert root_cause(log) == ("runtime.plan.PlanError: plan.json: $.cluster.machines: 0 is less than the minimum "
                               "of 1", 3)
    (tmp_path / "quiet.log").write_text("all good\n")
    assert root_cause(tmp_path / "quiet.log") is None


@pytest.mark.parametrize("args, message", [
    (["--machines", "0", "--", "x.py"], "need 1 <= --machines"),
    (["--machines", "2"], "no entry point"),
    (["--plan", "/nonexistent/plan.json", "--", "x.py"], "cannot read plan"),
    (["--fault", "explode:1:2", "--", "x.py"], "expected KIND:WHO:ITERATION"),
    (["--machines", "2", "--procs", "1", "--fault", "lose:2:3", "--", "x.py"], "no machine 2 in a job of 2 machines"),
    (["--machines", "2", "--procs", "2", "--fault", "kill:4:3", "--", "x.py"], "no rank 4 in a job of 4 ranks"),
    (["--machines", "2", "--fault", "kill:1:3,kill:1:3", "--", "x.py"], "fault kill:1:3 is given twice"),
    (["--machines", "2", "--", "x.py"], "no training script x.py"),
    (["--machines", "2", "--job", "../up", "--", "x.py"], "job name '../up' is not a name"),
    (["--bogus", "--", "x.py"], "unrecognized arguments: --bogus"),
])
def test_agent_command_line_mistakes_are_one_line(tmp_path, args, message):
    r = subprocess.run([sys.executable, "-m", "runtime.agent", "--workdir", str(tmp_path / "w"), *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("python -m runtime.agent: error: ")
    assert not (tmp_path / "w").exists()  # a refused job leaves nothing behind, its default plan neither


def test_default_plan_command(tmp_path):
    from runtime.plan import Plan

    r = subprocess.run([sys.executable, "-m", "runtime", "plan", "--machines", "3", "--procs", "2", "-o",
                        str(tmp_path / "plan.json")], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.machines == 3 and plan.processes_per_machine == 2
    assert plan.data["placement"]["strategy"] == "mixed" and plan.holders[0] == [0, 1]  # 2 does not divide 3
    r = subprocess.run([sys.executable, "-m", "runtime", "plan", "--machines", "6", "--procs", "1", "--hsdp", "3", "-o",
                        str(tmp_path / "hsdp.json")], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    plan = Plan.load(tmp_path / "hsdp.json")  # 3 replica groups of 2 machines: copies 2 machines apart
    assert plan.data["placement"]["strategy"] == "hsdp"
    assert plan.holders == [[0, 2], [1, 3], [2, 4], [3, 5], [4, 0], [5, 1]]
    for bad, message in ((["--machines", "2", "--procs", "1", "--replicas", "3"], "--replicas 3: need 1 to --machines (2)"),
                         (["--machines", "4", "--procs", "1", "--hsdp", "3"], "--hsdp 3: the replica groups must"),
                         (["--machines", "4", "--procs", "1", "--hsdp", "2", "--replicas", "3"], "hold only 2"),
                         (["--machines", "1", "--procs", "1", "--schedule", "priority"], "network priorities")):
        r = subprocess.run([sys.executable, "-m", "runtime", "plan", *bad, "-o", str(tmp_path / "x.json")],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "x.json").exists()


def test_the_agent_and_the_plan_command_start_without_loading_torch():
    """They need no torch of their own (their workers load it): importing the runtime package's Checkpointer et al.
    eagerly cost every agent start about 2 s."""
    code = ("import sys, runtime.agent, runtime.__main__, runtime.netns\n"
            "print('torch' in sys.modules)\n"
            "from runtime import Checkpointer, ConfigError, Plan, StateError, StoreError\n"
            "print('torch' in sys.modules, Checkpointer.__module__, StoreError.__module__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True", "runtime.api", "runtime.store"]


@pytest.mark.parametrize("kw", [{"faults": "explode:1:2"}, {"netns": 99}])
def test_a_refused_job_leaves_no_folder_in_shared_memory(tmp_path, monkeypatch, kw):
    """The store root is made in /dev/shm; a job refused at start (a malformed fault, namespaces that are not there)
    left it behind, empty, every time."""
    made = []
    real = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    with pytest.raises(ValueError):
        Job(default_plan(tmp_path / "plan.json", 2, 1), tmp_path / "job", ["x.py"], **kw)
    assert not any(os.path.exists(p) for p in made)


def test_event_lines_of_ranks_sharing_one_pipe_never_interleave():
    """A machine's ranks write their event lines to their agent's stdout, one pipe. Unbuffered (PYTHONUNBUFFERED),
    print writes a line and its newline apart, and two ranks' lines came out merged, both lost to the agent;
    emit_line writes each in one piece."""
    n = 5000
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    writer = textwrap.dedent(f"""
        import json, os, sys
        from runtime.api import emit_line
        os.write({ready_w}, b"x")
        os.read({go_r}, 1)  # both writers start together
        for i in range({n}):
            emit_line("GEMINI " + json.dumps({{"rank": int(sys.argv[1]), "i": i, "pad": "x" * 100}}))
    """)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    read, write = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(rank)], stdout=write, env=env,
                              pass_fds=(ready_w, go_r)) for rank in (0, 1)]
    for fd in (write, ready_w, go_r):
        os.close(fd)
    assert os.read(ready_r, 1) and os.read(ready_r, 1)
    os.close(go_w)
    with os.fdopen(read) as f:
        lines = f.read().splitlines()
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    os.close(ready_r)
    got = sorted((rec["rank"], rec["i"]) for rec in (json.loads(line[len("GEMINI "):]) for line in lines))
    assert got == [(rank, i) for rank in (0, 1) for i in range(n)]
