"""Resuming on a changed cluster from memory (runtime/sources.py): a job that loses a machine and goes on without it
(2 -> 1, the agent's ``on_loss="continue"``), and a job relaunched on more machines (1 -> 2), each reshards the
newest iteration its machines' memory holds through DCP, and ends with the whole state where a job that DCP
resharded from a durable checkpoint of the same iteration ends. And the durable tier and the memory one are read by
the same code path."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from conftest import needs_fsdp, needs_fsdp_on_cpu
from runtime.agent import Job, default_plan
from runtime.state import same_shard

ROOT = Path(__file__).resolve().parent.parent
MLP = str(ROOT / "examples" / "mlp" / "train.py")
ITERS = 10


def run(tmp, machines, work, out, faults="", iters=ITERS, store=None, on_loss="replace", cleanup=True):
    plan = default_plan(tmp / f"plan-{machines}.json", machines, 1, replicas=min(2, machines), persist=100)
    job = Job(plan, tmp / work, [MLP, "--iters", str(iters)], faults=faults, store_root=store, out_dir=tmp / out,
              on_loss=on_loss, max_restarts=0 if faults.startswith("kill") else 4)
    try:
        return job.run(timeout=300)
    finally:
        if cleanup:
            job.cleanup()


def recovered(res) -> dict[int, tuple]:
    return {e["rank"]: (e["tier"], e["iteration"], e.get("from_world")) for e in res.records("recovered")}


def same_finals(a: Path, b: Path, ranks: int) -> bool:
    return all(same_shard(a / f"final-rank-{r:05d}", b / f"final-rank-{r:05d}") for r in range(ranks))


def reference(tmp, before: int, after: int, iteration: int = 4):
    """A job of ``before`` machines that finishes at ``iteration`` (its final checkpoint durable), then relaunched
    on ``after`` machines to the end: DCP reshards the durable checkpoint."""
    first = run(tmp, before, "ref", "ref-first", iters=iteration)
    assert first.ok, first.root_cause
    res = run(tmp, after, "ref", "ref")
    assert res.ok, res.root_cause
    assert recovered(res) == {r: ("storage", iteration, before) for r in range(after)}
    return tmp / "ref"


@needs_fsdp
def test_a_job_that_loses_a_machine_goes_on_without_it_from_memory(tmp_path):
    res = run(tmp_path, 2, "job", "shrunk", faults="lose:1:5", on_loss="continue")
    assert res.ok, res.root_cause
    resized = res.records("job-resized")
    assert [e["machines"] for e in resized] == [1]
    assert json.loads(Path(resized[0]["plan"]).read_text())["cluster"]["machines"] == 1
    # machine 0 held both shards of iteration 4 (m = 2): the one rank left reshards them from its own memory
    assert recovered(res) == {0: ("resharded", 4, 2)}
    assert same_finals(tmp_path / "shrunk", reference(tmp_path, 2, 1), 1)


@needs_fsdp
def test_a_job_relaunched_on_more_machines_reshards_from_memory(tmp_path):
    store = Path(tempfile.mkdtemp(prefix="gemini-test-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        died = run(tmp_path, 1, "job", "first", faults="kill:0:5", store=store, cleanup=False)
        assert not died.ok  # its memory stays, for the relaunch
        res = run(tmp_path, 2, "job", "grown", store=store, cleanup=False)
        assert res.ok, res.root_cause
    finally:
        shutil.rmtree(store, ignore_errors=True)
    # rank 1, on the new machine, had the pieces of its shard sent from machine 0's memory
    assert recovered(res) == {0: ("resharded", 4, 1), 1: ("resharded", 4, 1)}
    rec = json.loads((tmp_path / "job" / "durable" / "job" / "job.json").read_text())
    assert rec["machines"] == 2 and [c["from"] for c in rec["resized"]] == [[1, 1]]
    assert same_finals(tmp_path / "grown", reference(tmp_path, 1, 2), 2)


@needs_fsdp_on_cpu
def test_durable_and_memory_checkpoints_are_read_by_one_path(world1, tmp_path, monkeypatch):
    """The same iteration, from a durable checkpoint and from the store, both through load_through_dcp (DCP with a
    FileSystemReader, and with the stores' MemoryReader), into the same state."""
    import torch
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from runtime import Checkpointer, sources
    from runtime.plan import default
    from runtime.state import flatten

    def make(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        fully_shard(model[0], mesh=init_device_mesh("cpu", (1,)))
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        return model, torch.optim.Adam(model.parameters(), lr=0.01)

    model, opt = make(0)
    ckpt = Checkpointer(default(1, 1, replicas=1, persist=3), model, opt, store_root=tmp_path / "shm",
                        durable_dir=tmp_path / "d", job="t", profile_iters=0)
    ckpt.recover()
    for it in range(1, 4):
        model(torch.randn(5, 4, generator=torch.Generator().manual_seed(it))).square().sum().backward()
        ckpt.after_backward()
        opt.step()
        opt.zero_grad()
        ckpt.after_step(it)
    ckpt.close(finished=False)
    truth = {k: v.clone() for k, v in ckpt.capture()[0].items()}

    calls = []
    real = sources.load_through_dcp
    monkeypatch.setattr(sources, "load_through_dcp", lambda *a: calls.append(type(a[1]).__name__) or real(*a))
    for read in ("durable", "memory"):
        model2, opt2 = make(1)
        fresh = Checkpointer(default(1, 1, replicas=1), model2, opt2, store_root=tmp_path / "other",
                             durable_dir=tmp_path / "other-d", job=read, profile_iters=0)
        template, _ = flatten(fresh._capture.state())
        if read == "durable":
            tensors, skeleton = sources.load_durable(tmp_path / "d" / "t" / "step-00000003", template, 0)
        else:
            held = ckpt.store.listing()
            per_machine = [{(it, r) for it, r, _ in held}]
            tensors, skeleton = sources.fetch_resharded(ckpt.store, fresh.groups, 0, 1, 1, 3, 1, per_machine,
                                                        template)
        fresh._restore(tensors, skeleton)
        got = fresh.capture()[0]
        assert got.keys() == truth.keys()
        for k in truth:
            assert torch.equal(got[k], truth[k]), (read, k)
        fresh.close(finished=False)
    assert calls == ["FileSystemReader", "MemoryReader"]


def test_the_plan_for_a_changed_cluster_keeps_the_plans_choices(tmp_path):
    from runtime.plan import default, resized

    plan = default(4, 2, replicas=2, interval=2, persist=10, schedule="gemini")
    small = resized(plan, 3)
    assert (small.machines, small.processes_per_machine, small.interval, small.persist_interval) == (3, 2, 2, 10)
    assert small.schedule["name"] == "gemini" and small.data["placement"]["strategy"] == "mixed"
    assert resized(plan, 1).holders == [[0]]  # one machine keeps one copy
    import subprocess
    import sys

    (tmp_path / "p.json").write_text(json.dumps(plan.data))
    r = subprocess.run([sys.executable, "-m", "runtime", "plan", "--like", str(tmp_path / "p.json"), "--machines",
                        "6", "-o", str(tmp_path / "six.json")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    six = json.loads((tmp_path / "six.json").read_text())
    assert six["cluster"]["machines"] == 6 and six["checkpoint"]["interval_iters"] == 2
    r = subprocess.run([sys.executable, "-m", "runtime", "plan", "--like", str(tmp_path / "p.json"), "--machines",
                        "6", "--procs", "3", "-o", str(tmp_path / "x.json")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--like takes" in r.stderr
    with pytest.raises(ValueError, match="on_loss"):
        Job(tmp_path / "six.json", tmp_path / "w", ["x.py"], on_loss="pray")
