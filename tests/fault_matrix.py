"""The fault matrix, run on an example training script through the public API (imported by test_faults_*.py).

Four machines x one process, group placement with m = 2 ({0,1}, {2,3}), a CPU-memory checkpoint every iteration and
a DCP checkpoint every 5, launched by the project's agent (real torchrun agents and workers, killed with SIGKILL).
Every scenario must finish with its whole final state (parameters, buffers, optimizer state, extra state, on every
rank) bitwise identical to the failure-free run's.
"""

from pathlib import Path

import pytest

from runtime.agent import Job, default_plan
from runtime.state import same_shard

ROOT = Path(__file__).resolve().parent.parent
ITERS = 10


def run_job(tmp_path_factory, script, name, faults="", machines=4, ppm=1, make_plan=None):
    """A job of ``script`` under the agent; its plan the matrix's (group placement) or ``make_plan(path)``'s."""
    work = tmp_path_factory.mktemp(name)
    plan = make_plan(work / "plan.json") if make_plan else \
        default_plan(work / "plan.json", machines=machines, ppm=ppm, replicas=2, interval=1, persist=5)
    job = Job(plan, work, [*script, "--iters", str(ITERS)], faults=faults)
    try:
        res = job.run(timeout=300)
    finally:
        job.cleanup()
    assert res.ok, f"{name}: {res.root_cause}; exit codes {res.returncodes}; logs {res.logs}"
    return res


def assert_identical(res, baseline):
    for r in range(4):
        name = f"final-rank-{r:05d}"
        assert same_shard(baseline.out_dir / name, res.out_dir / name), f"rank {r}: final state differs"


def tiers(res, attempt: int | None = None):
    """rank -> (tier, iteration) of its recovery (in that attempt of the job, if given; else its last), whose
    reported parts (fetching, loading into the model and optimizer, confirming the checksums) fit within the whole it
    reports: one after the other, but for a copy from a peer, loaded as it arrives."""
    events = res.events if attempt is None else res.attempts()[attempt]
    recovered = [e for e in events if e["msg"] == "recovered"]
    for e in recovered:
        if e["tier"] != "storage":
            assert min(e["fetch_s"], e["restore_s"], e["confirm_s"]) >= 0, e
            fetched = (sum if e["tier"] == "local" else max)((e["fetch_s"], e["restore_s"]))
            assert fetched + e["confirm_s"] <= e["seconds"], e
    return {e["rank"]: (e["tier"], e["iteration"]) for e in recovered}


@pytest.fixture(scope="module")
def script(request):
    """The example the importing test module runs (its SCRIPT), with its options (SCRIPT_ARGS)."""
    return [str(ROOT / request.module.SCRIPT), *getattr(request.module, "SCRIPT_ARGS", ())]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, script):
    return run_job(tmp_path_factory, script, "baseline")


def test_baseline_trains_and_persists(baseline):
    assert {e["rank"] for e in baseline.records("done")} == {0, 1, 2, 3}
    its = [e["iteration"] for e in baseline.records("iteration") if e["rank"] == 0]
    assert its == list(range(1, ITERS + 1))
    assert not baseline.records("recovered")
    assert (baseline.durable / "step-00000010" / "COMPLETE").exists()


def test_kill_one_worker_mid_iteration(tmp_path_factory, baseline, script):
    res = run_job(tmp_path_factory, script, "kill", "kill:2:6")
    assert res.records("fault")
    assert tiers(res) == {r: ("local", 5) for r in range(4)}  # software failure: every rank from its own memory
    assert_identical(res, baseline)


def test_lose_a_machine_then_its_peer_each_replaced(tmp_path_factory, baseline, script):
    # machine 3 is lost in iteration 4, then, after the job resumed, its peer machine 2 in iteration 8: the second
    # replacement's state comes from the memory of the first, which received it since
    res = run_job(tmp_path_factory, script, "lose", "lose:3:4,lose:2:8")
    assert [e["machine"] for e in res.records("machine-lost")] == [3, 2]
    assert len(res.attempts()) == 3
    assert tiers(res, 1) == {3: ("peer", 3), **{r: ("local", 3) for r in (0, 1, 2)}}
    assert tiers(res, 2) == {2: ("peer", 7), **{r: ("local", 7) for r in (0, 1, 3)}}  # 7: not a durable one
    assert_identical(res, baseline)


def test_kill_while_writing_a_checkpoint(tmp_path_factory, baseline, script):
    res = run_job(tmp_path_factory, script, "write", "kill-write:1:6")
    t = tiers(res)
    assert {it for _, it in t.values()} == {5}  # iteration 6's shard of rank 1 was never committed
    # every machine held some of iteration 6 (the other ranks' own shards): dropped, before it is trained again
    assert {e["rank"]: e["abandoned"] for e in res.records("recovered")} == {r: [6] for r in range(4)}
    assert_identical(res, baseline)


def test_corrupted_shard_is_detected_and_fetched_from_a_peer(tmp_path_factory, baseline, script):
    res = run_job(tmp_path_factory, script, "corrupt", "corrupt-kill:0:6")
    t = tiers(res)
    assert t[0] == ("peer", 6)  # machine 0's copy fails its checksum; machine 1 holds a good one
    assert t[1] == ("local", 6)
    assert_identical(res, baseline)


def test_a_corrupted_replica_sent_to_a_replacement_is_caught_and_dropped(tmp_path_factory, baseline, script):
    # machine 3 is lost and machine 2's copy of its shard of 5 (the only one left) is corrupt: the replacement
    # receives it, finds it bad while loading it, both copies are dropped, and every rank goes back to DCP at 5
    res = run_job(tmp_path_factory, script, "replica", "corrupt-copies:3:5,lose:3:6")
    failed = res.records("checksum-failed")
    assert {(e["rank"], e["iteration"], tuple(e["ranks"])) for e in failed} == {(r, 5, (3,)) for r in range(4)}
    assert tiers(res) == {r: ("storage", 5) for r in range(4)}
    assert_identical(res, baseline)


def test_lose_a_whole_replica_group_falls_back_to_storage(tmp_path_factory, baseline, script):
    res = run_job(tmp_path_factory, script, "group", "lose:0:8,lose:1:8")
    assert sorted(e["machine"] for e in res.records("machine-lost")) == [0, 1]
    assert tiers(res) == {r: ("storage", 5) for r in range(4)}  # every copy of ranks 0-1 is gone: DCP at 5
    assert_identical(res, baseline)
