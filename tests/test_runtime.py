"""Fault-injection tests of the runtime: real torchrun agents and workers, killed with SIGKILL.

Four machines x one process (a small GPT, FSDP2 on gloo), group placement with m = 2 ({0,1}, {2,3}), a CPU-memory
checkpoint every iteration and a DCP checkpoint every 5. Every scenario must finish with final parameters bitwise
identical to the failure-free run.
"""

import filecmp

import pytest
import torch

from runtime.launcher import Job, default_plan

ITERS = 10


def run_job(tmp_path_factory, name, faults=""):
    work = tmp_path_factory.mktemp(name)
    plan = default_plan(work / "plan.json", machines=4, ppm=1, replicas=2, interval=1, persist=5)
    job = Job(plan, work, iters=ITERS, faults=faults, pg_timeout=120)
    try:
        res = job.run(timeout=300)
    finally:
        job.cleanup()
    assert res.ok, f"{name}: exit codes {res.returncodes}; logs {res.logs}"
    return res


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return run_job(tmp_path_factory, "baseline")


def assert_identical(res, baseline):
    for r in range(4):
        a = baseline.out_dir / f"final-rank-{r:05d}.bin"
        b = res.out_dir / f"final-rank-{r:05d}.bin"
        assert filecmp.cmp(a, b, shallow=False), f"rank {r}: final parameters differ"


def tiers(res):
    return {e["rank"]: (e["tier"], e["iteration"]) for e in res.records("recovered")}


def test_baseline_trains_and_persists(baseline):
    assert {e["rank"] for e in baseline.records("done")} == {0, 1, 2, 3}
    its = [e["iteration"] for e in baseline.records("iteration") if e["rank"] == 0]
    assert its == list(range(1, ITERS + 1))
    assert not baseline.records("recovered")


def test_kill_one_worker_mid_iteration(tmp_path_factory, baseline):
    res = run_job(tmp_path_factory, "kill", "kill:2:6")
    assert res.records("fault")
    assert tiers(res) == {r: ("local", 5) for r in range(4)}  # software failure: every rank from its own memory
    assert_identical(res, baseline)


def test_lose_a_whole_machine_and_replace_it(tmp_path_factory, baseline):
    res = run_job(tmp_path_factory, "lose", "lose:3:6")
    assert [e["machine"] for e in res.records("machine-lost")] == [3]
    t = tiers(res)
    assert t[3][0] == "peer" and t[3][1] >= 5  # the replacement's state came from machine 2's memory
    assert all(t[r][0] == "local" for r in (0, 1, 2))
    assert_identical(res, baseline)


def test_kill_while_writing_a_checkpoint(tmp_path_factory, baseline):
    res = run_job(tmp_path_factory, "write", "kill-write:1:6")
    t = tiers(res)
    assert {it for _, it in t.values()} == {5}  # iteration 6's shard of rank 1 was never committed
    assert_identical(res, baseline)


def test_corrupted_shard_is_detected_and_fetched_from_a_peer(tmp_path_factory, baseline):
    res = run_job(tmp_path_factory, "corrupt", "corrupt-kill:0:6")
    t = tiers(res)
    assert t[0] == ("peer", 6)  # machine 0's copy fails its checksum; machine 1 holds a good one
    assert_identical(res, baseline)


def test_lose_a_whole_replica_group_falls_back_to_storage(tmp_path_factory, baseline):
    res = run_job(tmp_path_factory, "group", "lose:0:8,lose:1:8")
    assert sorted(e["machine"] for e in res.records("machine-lost")) == [0, 1]
    assert tiers(res) == {r: ("storage", 5) for r in range(4)}  # every copy of ranks 0-1 is gone: DCP at 5
    assert_identical(res, baseline)


def test_durable_checkpoint_is_plain_dcp(baseline, tmp_path):
    """Plain DCP code that knows nothing of runtime/ loads the durable checkpoint, and it is the run's state: every
    parameter equals the four ranks' FSDP shards (dim 0) of the final iteration, concatenated."""
    import json

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from runtime.store import unpack

    step = baseline.out_dir.parent / "durable" / f"step-{ITERS:08d}"
    dcp_to_torch_save(str(step), str(tmp_path / "full.pt"))
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    shards = []
    for r in range(4):
        data = (baseline.out_dir / f"final-rank-{r:05d}.bin").read_bytes()
        manifest = json.loads((baseline.out_dir / f"final-rank-{r:05d}.json").read_text())
        shards.append(unpack(data, manifest))
    names = [k[len("model."):] for k in shards[0]]
    assert set(names) == set(full["model"])
    for name in names:
        whole = torch.cat([s[f"model.{name}"] for s in shards], dim=0)
        assert torch.equal(whole, full["model"][name]), name
    assert full["optim"]["state"], "optimizer state missing from the DCP checkpoint"
