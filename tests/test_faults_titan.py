"""The fault matrix on TorchTitan's Llama 3 (examples/titan: its debug model, its own FSDP2 parallelisation, AdamW
and a warm-up schedule), on the CPU build. TorchTitan is an extra of its own: `make test-titan` installs it in a venv
of its own and runs this module; where it is not installed (`make test`), the module is skipped."""

import importlib.util
import json

import pytest

from fault_matrix import *  # noqa: F401,F403 - the matrix's tests and fixtures run here
from fault_matrix import assert_identical, run_job, tiers
from conftest import needs_fsdp

pytestmark = [needs_fsdp, pytest.mark.skipif(importlib.util.find_spec("torchtitan") is None,
                                             reason="TorchTitan is not installed (make test-titan installs it)")]

SCRIPT = "examples/titan/train.py"
SCRIPT_ARGS = ("--deterministic",)

HSDP = ("--replicate", "2")  # 2 replica groups (machines 0-1 and 2-3), each sharding the model over its 2 ranks


def hsdp_plan(path):
    """The copies where the replicas are: machine i's on machine i + 2, the one that holds the same shard
    (``python -m runtime plan --hsdp 2``)."""
    from gemini_sim import plan as contract
    from runtime.plan import default

    plan = default(4, 1, replicas=2, interval=1, persist=5, hsdp=2)
    assert plan.holders == [[0, 2], [1, 3], [2, 0], [3, 1]]
    contract.write(plan.data, path)
    return path


def test_hsdp_loses_a_whole_replica_group_and_recovers_from_the_other_ones_memory(tmp_path_factory, script):
    """HSDP, with each machine's copy on the machine of the other replica group that holds the same shard: losing
    a whole replica group at once (machines 0 and 1, as a rack might go), every rank resumes from memory, the lost
    ones' shards from their replicas' machines, and the whole final state is the failure-free run's, bit for bit
    (the group placement of the rest of the matrix loses every copy of those shards and goes back to DCP)."""
    hsdp = [*script, *HSDP]
    baseline = run_job(tmp_path_factory, hsdp, "hsdp-baseline", make_plan=hsdp_plan)
    res = run_job(tmp_path_factory, hsdp, "hsdp-group", "lose:0:8,lose:1:8", make_plan=hsdp_plan)
    assert sorted(e["machine"] for e in res.records("machine-lost")) == [0, 1]
    assert tiers(res) == {0: ("peer", 7), 1: ("peer", 7), 2: ("local", 7), 3: ("local", 7)}
    assert_identical(res, baseline)
    for path in baseline.out_dir.glob("timings-rank-*.json"):  # the holders were sent each rank's own part only
        cks = json.loads(path.read_text())["checkpoints"]
        assert cks and all(0 < c["sent_bytes"] < c["bytes"] / 1000 for c in cks), path
