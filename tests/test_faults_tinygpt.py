"""The fault matrix on the TinyGPT example (AdamW, FSDP2 over transformer blocks), and its durable checkpoint read
by plain DCP code."""

import json

import torch

from fault_matrix import *  # noqa: F401,F403 - the matrix's tests and fixtures run here
from fault_matrix import ITERS
from conftest import needs_fsdp

pytestmark = needs_fsdp  # the example trains with FSDP2
from runtime.state import unpack

SCRIPT = "examples/tinygpt/train.py"
SCRIPT_ARGS = ("--deterministic",)  # on a GPU, bit for bit only so (on the CPU it is anyway)
# The matrix's scenarios whose path through the runtime is the same for any model (a shard killed half-written, a
# checksum, a corrupted replica, the fall back to storage, a shard fetched from a peer): `make test` runs them on the
# MLP example (test_faults_mlp), `make test-long` here as well. The same goes for the kill: its path is the MLP's, and
# AdamW's state coming back bit for bit from memory in a new process is test_api's
# test_a_new_process_resumes_from_memory_bit_for_bit; a shard from a peer is the same bytes, loaded the same way.
# `make test` runs this example's failure-free job and reads its durable checkpoint with plain DCP.
LONG = ("test_kill_one_worker_mid_iteration", "test_kill_while_writing_a_checkpoint",
        "test_corrupted_shard_is_detected_and_fetched_from_a_peer",
        "test_a_corrupted_replica_sent_to_a_replacement_is_caught_and_dropped",
        "test_lose_a_whole_replica_group_falls_back_to_storage", "test_lose_a_machine_then_its_peer_each_replaced")


def test_durable_checkpoint_is_plain_dcp(baseline, tmp_path):
    """Plain DCP code that knows nothing of runtime/ loads the durable checkpoint, and it is the run's state: every
    parameter equals the four ranks' FSDP shards (dim 0) of the final iteration, concatenated."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    step = baseline.durable / f"step-{ITERS:08d}"
    dcp_to_torch_save(str(step), str(tmp_path / "full.pt"))
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    shards = []
    for r in range(4):
        data = (baseline.out_dir / f"final-rank-{r:05d}.bin").read_bytes()
        manifest = json.loads((baseline.out_dir / f"final-rank-{r:05d}.json").read_text())
        shards.append(unpack(data, manifest))
    names = [k.removeprefix("model/") for k in shards[0] if k.startswith("model/")]  # the final state's parameters
    assert set(names) == set(full["model"])
    for name in names:
        whole = torch.cat([s["model/" + name] for s in shards], dim=0)
        assert torch.equal(whole, full["model"][name]), name
    assert full["optim"]["state"], "optimizer state missing from the DCP checkpoint"
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(next(iter(full["optim"]["state"].values())))
