"""A job's identity, record and end (runtime/job.py, runtime/config.py), the memory jobs hold on a host (python -m
runtime jobs / free) and the check at start that the host has room for what the plan keeps (runtime/budget.py)."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import needs_fsdp_on_cpu
from runtime import config, job as jobs
from runtime.budget import Row, optimizer_bytes, verdict
from runtime.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


LAUNCH = str(uuid.uuid4())


@pytest.mark.parametrize("env, expected", [
    ({"GEMINI_JOB": "exp", "TORCHELASTIC_RUN_ID": "other"}, ("exp", True)),
    ({"TORCHELASTIC_RUN_ID": "pretrain-7"}, ("pretrain-7", True)),  # torchrun --rdzv-id
    ({"TORCHELASTIC_RUN_ID": LAUNCH}, (LAUNCH, False)),  # --standalone: a UUID of this launch alone
    ({"TORCHELASTIC_RUN_ID": "none"}, (None, False)),  # c10d without --rdzv-id: rank 0 makes a name
    ({}, (None, False)),
])
def test_the_jobs_name_comes_from_the_environment(env, expected):
    assert config.job_from(env) == expected


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "-x", "x" * 65, "é", "a b", "a\nb"])
def test_a_name_that_would_be_more_than_a_folder_name_is_refused_in_one_line(bad):
    with pytest.raises(ConfigError) as exc:
        config.resolve({"x": 1}, job=bad, env={})
    assert "\n" not in str(exc.value) and "is not a name" in str(exc.value)
    with pytest.raises(ConfigError, match="GEMINI_MACHINE_ID"):
        config.resolve({"x": 1}, job="ok", env={"GEMINI_MACHINE_ID": bad or "/"})


def test_settings_take_the_arguments_first_then_the_environment(tmp_path):
    from runtime.plan import default

    plan = default(1, 1, replicas=1)
    env = {"GEMINI_JOB": "envjob", "GEMINI_STORE_ROOT": str(tmp_path / "s"), "GEMINI_DURABLE_DIR": str(tmp_path / "d"),
           "GEMINI_MACHINE_ID": "7"}
    s = config.resolve(plan, env=env)
    assert (s.job, s.named, s.machine_id) == ("envjob", True, "7")
    assert s.store_dir(s.job) == tmp_path / "s" / "envjob" and s.durable(s.job) == tmp_path / "d" / "envjob"
    s = config.resolve(plan, job="arg", durable_dir=tmp_path / "x", env=env)
    assert s.job == "arg" and s.durable("arg") == tmp_path / "x" / "arg"
    for kw, needle in [({"profile_iters": -1}, "profile_iters"), ({"timeout_s": float("nan")}, "timeout_s"),
                       ({"host_cores": [0, -1]}, "host_cores"), ({"profile_iters": True}, "profile_iters")]:
        with pytest.raises(ConfigError, match=needle):
            config.resolve(plan, env=env, **kw)


def test_the_record_says_what_a_launch_resumes(tmp_path):
    rec = jobs.begin(tmp_path, "exp", 2, 4)
    assert rec["finished"] is None and (rec["machines"], rec["processes_per_machine"]) == (2, 4)
    assert jobs.read_record(tmp_path) == rec  # written
    assert jobs.begin(tmp_path, "exp", 2, 4) == rec  # the same job: the record as it was
    resized = jobs.begin(tmp_path, "exp", 4, 2)  # another layout: the job goes on, the change noted
    assert (resized["machines"], resized["processes_per_machine"]) == (4, 2)
    assert [c["from"] for c in resized["resized"]] == [[2, 4]] and jobs.read_record(tmp_path) == resized
    done = jobs.finish(tmp_path, resized, 12)
    assert jobs.read_record(tmp_path)["finished"]["iteration"] == 12 and done["finished"]["at"]
    assert jobs.reopen(tmp_path, done)["finished"] is None and jobs.read_record(tmp_path)["finished"] is None
    (tmp_path / jobs.RECORD).write_text("{not json")
    assert jobs.read_record(tmp_path) is None  # unreadable: a new one replaces it


def _fill(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "rank-00000.bin", "wb") as f:
        f.write(b"\1" * n)


def test_jobs_lists_what_each_job_holds_and_free_frees_it(tmp_path):
    root = tmp_path / "store"
    _fill(root / "big" / "machine-0000" / "iter-00000007", 3 << 20)
    _fill(root / "big" / "machine-0001" / "iter-00000006", 1 << 20)
    _fill(root / "small" / "machine-node" / "iter-00000002", 1 << 16)
    held = jobs.jobs(root)
    assert [(h.job, h.machines, h.newest) for h in held] == [
        ("big", ("machine-0000", "machine-0001"), 7), ("small", ("machine-node",), 2)]
    assert held[0].bytes >= 4 << 20
    env = dict(os.environ, GEMINI_STORE_ROOT=str(root))
    r = subprocess.run([sys.executable, "-m", "runtime", "jobs"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.splitlines()[1].split()[:3] == ["big", "0.00", "7"], r.stdout
    r = subprocess.run([sys.executable, "-m", "runtime", "free", "big", "nothere"], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no job 'nothere'" in r.stderr
    assert (root / "big").is_dir()  # nothing freed when one name is wrong
    with open(root / "small" / "machine-node" / "iter-00000002" / "rank-00000.bin", "rb"):  # in use here
        r = subprocess.run([sys.executable, "-m", "runtime", "free", "small"], capture_output=True, text=True,
                           env=env, cwd=ROOT)
    assert r.returncode == 2 and f"in use by process {os.getpid()}" in r.stderr
    r = subprocess.run([sys.executable, "-m", "runtime", "free", "big", "small"], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    assert r.returncode == 0 and not (root / "big").exists() and not (root / "small").exists(), r.stderr
    r = subprocess.run([sys.executable, "-m", "runtime", "jobs"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.stdout.startswith("no job holds memory")


def _row(host, shard, free, held=0, store="/dev/shm/gemini-0/exp/machine-0000", exact=True):
    return Row(host, 1, store, shard, free, held, exact)


def test_the_room_a_plan_needs_adds_up_per_host_and_counts_what_the_job_holds():
    # 2 machines x 1 rank, each keeping the other's shard too: 3 files (keep 2 + the one written) of 2 shards each
    receives = [[1], [0]]
    assert verdict([_row("a", 100, 600), _row("b", 100, 600)], receives, 3) is None
    why = verdict([_row("a", 100, 600), _row("b", 100, 599)], receives, 3)
    assert why.startswith("the checkpoint store on b") and "\n" not in why
    assert verdict([_row("a", 100, 600), _row("b", 100, 500, held=100)], receives, 3) is None  # its own files reused
    # both machines on one host (the agent's emulation) share its file system: their needs add up
    same = [_row("a", 100, 1199, store="/s/exp/machine-0000"), _row("a", 100, 1199, store="/s/exp/machine-0001",
                                                                   exact=False)]
    why = verdict(same, receives, 3)
    assert "(/s) needs 1.17 KiB for this job's 2 rank(s)" in why and "estimated" in why  # 1200 B
    assert verdict([*same[:1], _row("a", 100, 1200, store="/s/exp/machine-0001")], receives, 3) is None


def test_optimizer_state_is_estimated_by_its_kind():
    import torch

    p = [torch.nn.Parameter(torch.zeros(1000))]
    for opt, per in [(torch.optim.SGD(p, lr=0.1), 0), (torch.optim.SGD(p, lr=0.1, momentum=0.9), 1),
                     (torch.optim.AdamW(p), 2), (torch.optim.Adam(p, amsgrad=True), 3),
                     (torch.optim.RMSprop(p, momentum=0.9, centered=True), 3)]:
        assert optimizer_bytes(opt, lambda t: t) == (per * 4000 + 8, True), type(opt).__name__

    class Mine(torch.optim.SGD):
        pass

    assert optimizer_bytes(Mine(p, lr=0.1), lambda t: t) == (2 * 4000 + 8, False)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs, as a /dev/shm too small for the plan (root only: skipped elsewhere)."""
    where = tmp_path / "small"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


@needs_fsdp_on_cpu
def test_a_store_too_small_for_the_plan_is_refused_at_start_in_one_line(world1, small_tmpfs, tmp_path):
    import torch
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from runtime import Checkpointer, StoreError
    from runtime.plan import default

    model = nn.Linear(256, 256)  # 257 KiB of parameters, as much again of momentum: 3 files of 0.5 MiB > 1 MiB
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ckpt = Checkpointer(default(1, 1, replicas=1), model, opt, store_root=small_tmpfs, durable_dir=tmp_path / "d",
                        job="big", profile_iters=0)
    with pytest.raises(StoreError) as exc:
        ckpt.recover()
    why = str(exc.value)
    assert "\n" not in why and "needs 1.51 MiB" in why and "has 1.00 MiB free" in why and "estimated" in why
    assert "python -m runtime jobs" in why
    assert json.loads((tmp_path / "d" / "big" / "job.json").read_text())["finished"] is None
