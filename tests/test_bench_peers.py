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
        # DCP's older checkpoints were deleted as newer ones completed: the last one (2 x 3 iterations, then 1 timed
        # at once) is left on disk
        assert run["on_disk"] == ([2 * 3 + 1] if a.startswith("dcp") else []), (a, run["on_disk"])
        for kind in ("worker", "job"):
            assert f[kind]["bitwise"], (a, kind, f[kind])
            assert 0 <= f[kind]["lost"] <= peers.KILL_AT, (a, kind, f[kind])
            assert f[kind]["repeats"] == 1 and len(f[kind]["recoveries"]) == (f[kind]["lost"] < peers.KILL_AT)
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
    recoveries = [r for r in rows if "the recovery" in r[0]]
    assert len(recoveries) == 2 and all(r[1].endswith(" ms") for r in recoveries)


def test_the_repeats_of_a_kill_are_summed_up():
    runs = [{"lost": 0, "recover_s": 0.2, "bitwise": True}, {"lost": 1, "recover_s": 0.1, "bitwise": True},
            {"lost": peers.KILL_AT, "recover_s": 0.05, "bitwise": False}]  # the last resumed from nothing
    got = peers.kill_summary(runs)
    assert got["lost"] == peers.KILL_AT and got["recoveries"] == [0.2, 0.1] and got["repeats"] == 3
    assert got["recover_s"] == pytest.approx(0.15) and not got["bitwise"]


@pytest.mark.parametrize("gib", [0.25, 1.0])
def test_shapes_come_near_the_size_asked(gib):
    dim, layers = peers.shape_for(gib)
    per_rank = 12 * 12 * dim * dim * layers / 2  # 12 bytes a parameter, 12 dim^2 parameters a block, 2 ranks
    assert 0.7 < per_rank / (gib * 2 ** 30) < 1.3


def test_a_host_without_room_is_refused_before_any_run(tmp_path, monkeypatch):
    free = {"free": 10 * 2 ** 30}
    monkeypatch.setattr(peers.shutil, "disk_usage", lambda path: type("U", (), free)())
    peers.check_room(1.0, tmp_path)  # 10 GiB: enough for 1 GiB per rank (5 GiB of DCP, 10 of stores at keep 1)
    with pytest.raises(RuntimeError, match="10.0 GiB free, the runtime.s stores need 20.0 GiB"):
        peers.check_room(2.0, tmp_path)
