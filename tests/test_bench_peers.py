"""The peers section of make bench (bench/peers.py, bench/peer_job.py) on a small state: every approach trains the
same job to the same state; its kills lose what each approach is known to lose, and every recovered state is bit
for bit an uninterrupted run's; the table and the summary rows are made from the figures."""

import sys
from pathlib import Path

import pytest

from conftest import needs_fsdp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import peers  # noqa: E402

pytestmark = needs_fsdp


def test_every_approach_on_a_small_state(tmp_path):
    approaches = [a for a in peers.APPROACHES if peers.available(a)]
    if "lm-resiliency" not in approaches:
        print("lm-resiliency not installed (pip install -e '.[bench]'): its adapter is not run")
    figures = peers.measure(0.001, tmp_path, repeats=1, rounds=1, block=3, latency=1, approaches=approaches,
                            progress=lambda m: None)
    assert list(figures) == approaches
    for a, f in figures.items():
        run = f["runs"][0]
        assert f["same_training"], a  # checkpointing changed nothing in training
        assert run["stall_s"] >= 0 and run["remote_s"] > 0 and run["iteration_on_s"] > 0, (a, run)
        assert (run["local_s"] is None) == (a == "dcp"), (a, run)  # dcp.save has no in-memory stage
        for kind in ("worker", "job"):
            assert f[kind]["bitwise"], (a, kind, f[kind])
            assert 0 <= f[kind]["lost"] <= peers.KILL_AT, (a, kind, f[kind])
    # what each keeps when it dies in the iteration after KILL_AT: the runtime and dcp.save lose nothing (the
    # runtime's memory outlives its processes); DCP's async save loses at most the one in flight; lm-resiliency's
    # memory dies with the job (its disk tier is written every 100 steps), but a lost worker's peers flush it
    assert figures["runtime"]["worker"]["lost"] == figures["runtime"]["job"]["lost"] == 0
    assert figures["dcp"]["worker"]["lost"] == figures["dcp"]["job"]["lost"] == 0
    assert figures["dcp-async"]["job"]["lost"] <= 1
    if "lm-resiliency" in figures:
        assert figures["lm-resiliency"]["job"]["lost"] == peers.KILL_AT
        assert figures["lm-resiliency"]["worker"]["lost"] <= 1

    lines = peers.table(0.001, figures)
    assert lines[2].split(" | ")[1:] == approaches[:-1] + [approaches[-1] + " |"]
    assert sum(line.startswith("| ") for line in lines) == 1 + 5 + 6  # the header, 5 measures, 2 x 3 kill rows
    rows = peers.summary_rows(0.001, figures)
    assert rows[-2][1] == "0" and rows[-1][1] == "yes"


@pytest.mark.parametrize("gib", [0.25, 1.0])
def test_shapes_come_near_the_size_asked(gib):
    dim, layers = peers.shape_for(gib)
    per_rank = 12 * 12 * dim * dim * layers / 2  # 12 bytes a parameter, 12 dim^2 parameters a block, 2 ranks
    assert 0.7 < per_rank / (gib * 2 ** 30) < 1.3
