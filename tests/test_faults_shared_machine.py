"""Faults on machines of two ranks each (2 machines x 2 processes under the project's agent, the MLP example), as on a
GPU machine of several ranks: a machine's ranks share its store, each writing its own shard and receiving its peer's,
and either may prune or recycle what the other wrote. Every run must end bitwise where the failure-free one ends."""

import json
from pathlib import Path

import pytest

from conftest import needs_fsdp
from fault_matrix import ITERS, assert_identical, run_job as run, tiers

pytestmark = needs_fsdp  # the example trains with FSDP2
SCRIPT = [str(Path(__file__).resolve().parent.parent / "examples" / "mlp" / "train.py")]
RANKS = 4  # ranks 0-1 on machine 0, 2-3 on machine 1; each machine holds the other's shards (m = 2)
# make test-long only: a rank killed while writing goes through the same recovery (every rank from its own machine's
# memory, the machine's other rank included), with a torn checkpoint on top
LONG = ("test_a_killed_rank_and_its_machines_other_rank_resume_from_that_machines_memory",)


def run_job(tmp_path_factory, name, faults=""):
    return run(tmp_path_factory, SCRIPT, name, faults, machines=2, ppm=2)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return run_job(tmp_path_factory, "baseline")


def sources(res):
    return {e["rank"]: e.get("source_machine") for e in res.records("recovered")}


def memory(res, rank: int) -> list[tuple[int, str]]:
    """(iteration, where its memory came from) of every checkpoint of ``rank``'s last process."""
    cks = json.loads((res.out_dir / f"timings-rank-{rank:05d}.json").read_text())["checkpoints"]
    return [(c["iteration"], c["memory"]) for c in cks]


def test_every_rank_writes_its_checkpoints_into_memory_it_holds_once_the_store_is_full(baseline):
    """keep 2: checkpoint 1 takes new memory, and the memory of 2 and 3 is made ready meanwhile; every later one
    goes through a mapping the rank holds, whichever rank of its machine dropped the file (the one at close too)."""
    for r in range(RANKS):
        assert memory(baseline, r) == [(1, "new")] + [(it, "held") for it in range(2, ITERS + 1)], r


def test_a_killed_rank_and_its_machines_other_rank_resume_from_that_machines_memory(tmp_path_factory, baseline):
    res = run_job(tmp_path_factory, "kill", "kill:1:6")
    assert [e["rank"] for e in res.records("fault")] == [1]
    assert tiers(res) == {r: ("local", 5) for r in range(RANKS)}
    assert sources(res) == {r: r // 2 for r in range(RANKS)}
    assert_identical(res, baseline)


def test_a_lost_machines_two_ranks_come_back_from_their_peer(tmp_path_factory, baseline):
    res = run_job(tmp_path_factory, "lose", "lose:1:6")
    assert [e["machine"] for e in res.records("machine-lost")] == [1]
    assert tiers(res) == {0: ("local", 5), 1: ("local", 5), 2: ("peer", 5), 3: ("peer", 5)}
    assert sources(res) == {r: 0 for r in range(RANKS)}  # machine 0's ranks 0 and 1 had received 2's and 3's
    # once recovered, every rank's memory for its next checkpoints is made ready while it trains: on the survivor,
    # the files the processes before it left; on the new machine, new files beside the shard it received
    for r in range(RANKS):
        assert memory(res, r) == [(it, "held") for it in range(6, ITERS + 1)], r
    assert_identical(res, baseline)


def test_a_rank_killed_while_writing_leaves_its_machines_other_checkpoint_whole(tmp_path_factory, baseline):
    """Rank 3 dies writing its shard of 6 while rank 2, on the same machine, may have committed its own: 6 is not
    complete anywhere and 5 must still be there for both ranks of the machine."""
    res = run_job(tmp_path_factory, "write", "kill-write:3:6")
    assert tiers(res) == {r: ("local", 5) for r in range(RANKS)}
    # each machine dropped what it held of 6 before training it again (whichever of its ranks got there first)
    dropped = {m: set() for m in (0, 1)}
    for e in res.records("recovered"):
        dropped[e["rank"] // 2] |= set(e["abandoned"])
    assert dropped == {0: {6}, 1: {6}}
    assert_identical(res, baseline)
