"""The fault matrix on the MLP example: SGD with Nesterov momentum, a step LR schedule, dropout and a shuffling data
loader, whose scheduler, loader position and RNG state go through the Checkpointer's ``extra`` state; nothing in
the runtime is specific to the first example."""

import json

from fault_matrix import *  # noqa: F401,F403 - the matrix's tests and fixtures run here
from fault_matrix import ITERS
from conftest import needs_fsdp

pytestmark = needs_fsdp  # the example trains with FSDP2

SCRIPT = "examples/mlp/train.py"
# make test-long only: a worker killed while it writes takes the recovery of the plain kill, with a torn checkpoint
# that every machine abandons on top; make test runs that on machines of two ranks (test_faults_shared_machine's
# test_a_rank_killed_while_writing_leaves_its_machines_other_checkpoint_whole)
LONG = ("test_kill_while_writing_a_checkpoint",)


def test_extra_state_is_in_the_durable_checkpoint(baseline):
    step = baseline.durable / f"step-{ITERS:08d}"
    meta = json.loads((step / "state-rank-00002.json").read_text())
    extra = meta["skeleton"]["extra"]
    assert extra["loader"] == {"epoch": 0, "pos": 16 * ITERS}  # rank 2 read ITERS batches of 16
    assert extra["sched"]["last_epoch"] == ITERS
    # this rank's own tensors: batch norm's running statistics (each rank's differ) and the RNG state
    assert [e["name"] for e in meta["own"]["entries"]] == [
        "model/1.running_mean", "model/1.running_var", "model/1.num_batches_tracked", "extra/rng/cpu"]
    # SGD's momentum, not Adam's moments
    assert any(k.endswith("momentum_buffer") for k in json.dumps(meta["skeleton"]["optim"]).split('"'))
