"""HSDP under a plan that knows its replicas (``python -m runtime plan --hsdp R``): the TinyGPT example sharded within
2 replica groups and replicated across them, under the project's agent. Each rank sends its copy's holder (the rank
at its position in the other group) only its own part, the holder builds the shard from its own checkpoint when it
is needed, and a lost replica group recovers from the other group's memory, bit for bit; the bytes the runtime sent
and held are the simulator's for the same placement."""

import dataclasses
import json

import pytest

from conftest import needs_fsdp
from fault_matrix import ITERS, ROOT, assert_identical, run_job, tiers
from gemini_sim import plan as contract
from gemini_sim.cluster import config, topology
from gemini_sim.placement import layouts, linkload
from runtime.agent import Job
from runtime.plan import default

pytestmark = needs_fsdp

SCRIPT = [str(ROOT / "examples/tinygpt/train.py"), "--deterministic"]
HSDP = [*SCRIPT, "--replicate", "2"]


def hsdp_plan(path, machines=4, ppm=1):
    """Machine i's copy on the machine at its position in the other replica group."""
    plan = default(machines, ppm, replicas=2, interval=1, persist=5, hsdp=2)
    contract.write(plan.data, path)
    return path


def checkpoints(res) -> dict[int, list[dict]]:
    """rank -> its checkpoint records (the last attempt's, for a rank restarted)."""
    out = {}
    for path in sorted(res.out_dir.glob("timings-rank-*.json")):
        out[int(path.stem.split("-")[-1])] = json.loads(path.read_text())["checkpoints"]
    return out


@pytest.fixture(scope="module")
def hsdp_baseline(tmp_path_factory):
    return run_job(tmp_path_factory, HSDP, "hsdp-baseline", make_plan=hsdp_plan)


def test_hsdp_sends_and_holds_only_each_ranks_own_part_as_the_simulator_says(hsdp_baseline):
    """Every checkpoint sends its holder only the rank's own part (what is not a DTensor: Adam's step counts), and
    the machine holds its shard and that part: the simulator's traffic and memory of the hsdp placement with the
    shard's and the own part's sizes, machine by machine."""
    cks = checkpoints(hsdp_baseline)
    assert sorted(cks) == [0, 1, 2, 3]
    placement = layouts.hsdp(4, 2, 2)
    preset = config.load_preset("gemini-paper")
    graph = topology.build(dataclasses.replace(preset.cluster, machines=4), preset.storage)
    for rank, records in cks.items():
        assert len(records) >= ITERS - 1
        shard = {c["bytes"] for c in records}
        sent = {c["sent_bytes"] for c in records}
        held = {c["held_bytes"] for c in records}
        assert len(shard) == len(sent) == len(held) == 1, (shard, sent, held)
        shard, own, held = shard.pop(), sent.pop(), held.pop()
        assert 0 < own < shard / 1000  # the own part: a few step counters, against the shard's parameters and state
        cost = linkload.cost(placement, shard, graph, own_bytes=own)
        assert cost.sent_bytes[rank] == own and cost.received_bytes[rank] == own
        assert layouts.memory_bytes(placement, shard, own)[rank] == held == shard + own
        full = linkload.cost(layouts.group(4, 2), shard, graph)  # the same copies made without knowing the replicas
        assert full.sent_bytes[rank] == shard and layouts.memory_bytes(layouts.group(4, 2), shard)[rank] == 2 * shard


def test_hsdp_loses_a_whole_replica_group_and_rebuilds_its_shards_from_the_other(tmp_path_factory, hsdp_baseline):
    """Losing replica group 0 (machines 0 and 1) loses every byte of ranks 0 and 1; the holders in group 1 build
    their shards from their own checkpoints and the few bytes they were sent, and the whole final state is the
    failure-free run's, bit for bit."""
    res = run_job(tmp_path_factory, HSDP, "hsdp-lose-group", "lose:0:8,lose:1:8", make_plan=hsdp_plan)
    assert sorted(e["machine"] for e in res.records("machine-lost")) == [0, 1]
    assert tiers(res) == {0: ("peer", 7), 1: ("peer", 7), 2: ("local", 7), 3: ("local", 7)}
    assert_identical(res, hsdp_baseline)


def test_a_job_that_is_not_hsdp_under_an_hsdp_plan_fails_its_first_checkpoint(tmp_path):
    """The plan says ranks 0 and 2 hold the same DTensor pieces; FSDP over all 4 ranks does not: the holder finds
    out at the first checkpoint and the job stops with an error that names both ranks, rather than keep copies that
    could never be rebuilt."""
    plan = hsdp_plan(tmp_path / "plan.json", machines=2, ppm=2)
    job = Job(plan, tmp_path / "work", [*SCRIPT, "--iters", "3"], max_restarts=0)
    try:
        res = job.run(timeout=120)
    finally:
        job.cleanup()
    assert not res.ok
    assert "HSDP replica of rank" in (res.root_cause or ""), res.root_cause
    assert "is the job HSDP with the plan's replica groups?" in res.root_cause
