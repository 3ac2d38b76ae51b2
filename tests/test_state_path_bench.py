"""bench/state_path.py's arithmetic and table, and bench/run.py's results file (the GPU session runs them in one
call under a time limit: they must not trip on their own, and what finished must survive the limit)."""

import sys
from pathlib import Path

import pytest

from conftest import needs_fsdp
from runtime import netns

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import state_path  # noqa: E402

GiB = 2 ** 30
LONG = ("test_the_limited_link_case_runs_through_the_namespaces_links",)  # make test-long: some 60 s on 2 cores


@pytest.mark.parametrize("gib", [0.05, 0.25, 1, 8])
def test_the_model_shape_gives_about_the_state_asked(gib):
    dim, layers = state_path.shape_for(gib * GiB)
    per_rank = 12 * 12 * dim * dim * layers / 2  # blocks only: 12 dim^2 params each, 12 bytes each, 2 ranks
    assert 0.6 < per_rank / (gib * GiB) < 1.5


def test_rows_judge_each_target_from_the_measurements():
    rt = {"dim": 2048, "layers": 4, "params": 2e8, "shard_bytes": 1.2e9, "device": "NVIDIA H100", "backend": "gloo",
          "iteration_s": 1.0, "iteration_ckpt_s": 1.01, "stall_s": 0.025, "local_s": 0.03, "replicated_s": 1.0,
          "replicated_beside_training_s": 1.5, "local_recovery_s": 0.05, "peer_recovery_s": 2.0,
          "link_bytes_per_s": 1.0e9, "link_both_bytes_per_s": 1.25e9, "probe_link_bytes_per_s": 0.9e9,
          "peer_fetch_s": 1.5, "copy_bytes_per_s": 54.8e9, "h2d_bytes_per_s": 51.6e9,
          "local_restore_s": 0.04, "peer_restore_s": 0.3, "local_first_s": 0.5}
    dcp = {"save_fsync_s": 2.2, "async_stall_s": 1.2, "async_total_s": 3.0, "load_warm_s": 1.1, "load_cold_s": 1.4,
           "torch": "2.11.0"}
    rows = state_path.rows_for(1, rt, dcp)
    verdicts = [r[3] for r in rows]
    # stall 25 ms vs 1.2e9 / 54.8e9 = 21.9 ms (1.14x); link both ways 0.96 s vs replicated 1.0 s (96%); peer (one
    # way: 1.2 s) 60%; 28x; +1.0%
    assert verdicts[:5] == ["pass", "pass", "FAIL", "info", "FAIL"]
    assert verdicts[5].startswith("info (the two ranks share one GPU") and rows[5][2] == "-"
    assert "1.14x" in rows[0][1] and "(96% of" in rows[1][1] and "(peer: 60%" in rows[2][1]
    assert "28.0x" in rows[4][1] and "+1.0%" in rows[5][1]
    # the copy alone: 1.2e9 B / 51.6 GB/s = 23 ms, a 1.4 s cold load 60 times as long (1.1 s warm: 47 times)
    assert "copy alone at the measured 51.6 GB/s, 60x, the most this host allows" in rows[4][0]
    assert "10.00 Gbit/s per direction" in rows[1][0] and "the probe's 7.20" in rows[1][0] and "1500 ms" in rows[2][0]
    assert "first checkpoints, into memory not yet reserved, the slowest in local memory after 500 ms" in rows[1][0]
    assert "optimizer: 40 / 300 ms (from the peer, beside the transfer as the shard arrives), where the copy alone " \
        "at the measured 51.6 GB/s takes 23 ms; from the peer, the shard all here after 1500 ms" in rows[2][0]
    assert "recoveries (local 50 ms, peer 2000 ms;" in rows[2][0]
    both = state_path.rows_for(1, dict(rt, local_recoveries_s=[0.07, 0.05], peer_recoveries_s=[2.0, 2.4]), dcp)
    assert "recoveries (local 70, 50 ms, peer 2000, 2400 ms;" in both[2][0]
    fast = state_path.rows_for(1, dict(rt, link_both_bytes_per_s=4e9), dcp)
    assert fast[1][3] == "FAIL" and "(30% of" in fast[1][1]  # 0.3 s at that rate
    nccl = state_path.rows_for(1, dict(rt, backend="cpu:gloo,cuda:nccl"), dcp)  # a GPU per rank: judged
    assert nccl[5][2:] == ("<= 2% (compute-bound, GPU)", "pass")
    assert state_path.rows_for(1, dict(rt, backend="cpu:gloo,cuda:nccl", iteration_ckpt_s=1.03), dcp)[5][3] == "FAIL"
    cpu = state_path.rows_for(1, dict(rt, device="cpu"), dict(dcp, load_cold_s=None))
    assert cpu[5][3].startswith("info") and "against a warm load" in cpu[4][1] and " 47x, the most" in cpu[4][0]
    assert "page-locked" not in rows[0][0]
    unlocked = state_path.rows_for(1, dict(rt, page_lock_refused="cudaHostRegister: operation not supported"), dcp)
    assert rows[0][0] + "; the store's memory was NOT page-locked, so its copies ran at pageable speed " \
        "(cudaHostRegister: operation not supported)" == unlocked[0][0]


def test_a_gpu_stall_counts_the_training_streams_wait_in_the_iteration_whose_update_waited():
    """On a GPU the host does not wait for the copy out: the training stream does (timed with CUDA events, per
    checkpoint); the stall of an iteration adds that wait to the host's own, in the iteration the checkpoint's
    traffic ran in (its update waited)."""
    rank = {"iterations": [{"iteration": i, "stall_s": 0.001 * i, "update_wait_s": 0.0001} for i in (1, 2, 3)],
            "checkpoints": [{"iteration": 1, "released_in": 2, "stream_wait_s": 0.02},
                            {"iteration": 2, "released_in": 3, "stream_wait_s": 0.0}]}
    assert state_path.stalls(rank) == pytest.approx({1: 0.0011, 2: 0.0221, 3: 0.0031})
    cpu = {"iterations": rank["iterations"], "checkpoints": [{"iteration": 1, "released_in": 2}]}
    assert state_path.stalls(cpu) == pytest.approx({1: 0.0011, 2: 0.0021, 3: 0.0031})


@needs_fsdp  # a TinyGPT job under the agent
def test_the_compute_bound_overhead_case_runs_and_pairs_its_rounds(tmp_path):
    """The compute-bound case (on a GPU in make bench): one job of one rank alternating turns without and with a
    checkpoint every iteration, paired per round; here on the CPU with a tiny model, where the row is information
    only. The verdict of a mean with its CI: pass only when below the target with 95% confidence."""
    o = state_path.overhead_figures(0.002, tmp_path, batch=2, seq=16, rounds=2, block=4)
    assert o["rounds"] == 2 and o["ci95"] is not None and o["device"] == "cpu" and o["iteration_s"] > 0
    assert (o["dim"], o["layers"]) == state_path.shape_for(0.002 * GiB, 1) and o["shard_bytes"] > 12 * 512 * 512
    row = state_path.overhead_row(o)
    assert row[3].startswith("info (CPU") and "mean of 2 paired rounds" in row[0]
    gpu = dict(o, device="NVIDIA H200", overhead_pct=0.5)
    assert state_path.overhead_row(dict(gpu, ci95=0.4))[3] == "pass"
    assert state_path.overhead_row(dict(gpu, ci95=2.0))[3].startswith("inconclusive")
    assert state_path.overhead_row(dict(gpu, overhead_pct=2.5, ci95=0.1))[3] == "FAIL"


def test_the_sizes_come_from_the_environment_where_given(monkeypatch, capsys):
    """GEMINI_BENCH_GIB (make gpu-bench GIB=...): the GPU session picks its sizes to fit its time; a bad value is
    one line and exit 2, before any job starts."""
    monkeypatch.setenv("GEMINI_BENCH_GIB", "0.5 8")
    assert state_path.default_sizes() == [0.5, 8.0]
    for bad in ("nan", "0", "1 65", "one", "inf"):
        monkeypatch.setenv("GEMINI_BENCH_GIB", bad)
        with pytest.raises(SystemExit) as e:
            state_path.default_sizes()
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "GEMINI_BENCH_GIB must be sizes in GiB between 0 and 64" in err
    monkeypatch.setenv("GEMINI_BENCH_GIB", "")
    import torch

    assert state_path.default_sizes() == ([1.0, 8.0] if torch.cuda.is_available() else [0.25])


def test_the_results_are_written_after_every_bench_and_kept_when_interrupted(tmp_path, monkeypatch, capsys):
    run = __import__("run")  # bench/run.py
    out = tmp_path / "results.md"
    seen = []

    def second():  # a bench in steps (state_path.measure): a list of rows per step
        seen.append(out.read_text())  # the first bench's row is already on disk
        yield [("second, step 1", "2 s", "-", "info")]
        seen.append(out.read_text())  # and so is the step before
        raise KeyboardInterrupt  # a time limit's SIGINT

    monkeypatch.setattr(run, "BENCHES", {"first": lambda: [("first thing", "1 s", "<= 2 s", "pass")],
                                         "second": second, "third": lambda: [("third", "-", "-", "info")]})
    monkeypatch.setattr(sys, "argv", ["run.py", "--out", str(out)])
    assert run.main() == 130
    assert "| first thing | 1 s | <= 2 s | pass |" in seen[0] and "second, step 1" not in seen[0]
    assert "| second, step 1 | 2 s | - | info |" in seen[1]
    text = out.read_text()
    assert "| first thing | 1 s | <= 2 s | pass |" in text and "| second, step 1 | 2 s | - | info |" in text
    assert "| second: the rest not run (interrupted) |" in text and "| third: not run (interrupted) |" in text
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]  # no temporary left behind
    assert "interrupted in second" in capsys.readouterr().err


def test_the_largest_state_sizes_come_last(monkeypatch):
    """A GPU session's bench may run out of time: the first size (with the compute-bound case and recovery's copy)
    runs before the runtime bench and the calibration, the other sizes, which take longest, after them."""
    run = __import__("run")  # bench/run.py
    names = list(run.BENCHES)
    assert names.index("state-path") < names.index("calibration") < names.index("state-path-large")
    assert list(state_path.measure([], Path("unused"), 10, 8, 128)) == []  # no other size (CPU): nothing to do
    calls = []
    monkeypatch.setattr(state_path, "default_sizes", lambda: [1.0, 8.0])
    monkeypatch.setattr(state_path, "compute_bound", lambda: (64, 512))
    monkeypatch.setattr(state_path, "measure", lambda sizes, work, **kw: calls.append((sizes, kw)) or [])
    run.bench_state_path()
    run.bench_state_path_large()
    assert [c[0] for c in calls] == [[1.0], [8.0]]
    assert (calls[0][1]["overhead"], calls[0][1]["copy_in"]) == ((64, 512), True)
    assert (calls[1][1]["overhead"], calls[1][1]["copy_in"]) == (None, False)


def test_the_copy_in_bench_runs_and_its_row_names_the_best_setting(tmp_path):
    """Recovery's copy (runtime.device.copy_in) measured for real on this host's device, small: the script the GPU
    session runs must not trip, and it checks every byte arrived."""
    c = state_path.copy_in_figures(8 << 20, tmp_path)
    assert c["bytes"] == 8 << 20 and c["configs"] and all(x["seconds"] > 0 for x in c["configs"])
    what, measured, _, verdict = state_path.copy_in_row(c)
    assert "(0.01 GiB," in what and verdict == "info" and measured.count("GB/s") == 3
    assert c["fresh"] > 0 and "fresh_populated" in c and "from a mapping made anew" in what
    gpu = dict(c, device="NVIDIA H200", pin_two_stages=0.017, bytes=GiB, plain=0.09, default=0.04, fresh=0.08,
               fresh_populated=0.05, configs=[{"threads": 4, "stage_bytes": 128 << 20, "seconds": 0.04},
                                              {"threads": 8, "stage_bytes": 512 << 20, "seconds": 0.025}])
    what, measured, _, _ = state_path.copy_in_row(gpu)
    assert measured == "11.9 GB/s / 26.8 GB/s / 42.9 GB/s (8 x 512 MiB)" and "buffers, apart: 17 ms" in what
    assert what.endswith("from a mapping made anew, as recovery's, its pages mapped as they are first read: the "
                         "default 13.4 GB/s, with every page mapped in one call first (MADV_POPULATE_READ) 21.5 GB/s")
    assert state_path.copy_in_row(dict(gpu, fresh_populated=None))[0].endswith("first (MADV_POPULATE_READ) not "
                                                                              "possible here")
    assert c["page_lock_refused"] is None and "refused" not in what
    what = state_path.copy_in_row(dict(gpu, fresh=None,
                                       page_lock_refused="pinned allocation: CUDA error: not supported"))[0]
    assert what.endswith("; page-locked memory was refused (pinned allocation: CUDA error: not supported): the "
                         "staging was ordinary memory")


def test_the_header_says_how_much_cpu_other_tenants_took(tmp_path):
    """bench/run.py reads the steal ticks of /proc/stat's cpu line at the start and at every write."""
    run = __import__("run")  # bench/run.py
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 50 0 25 400 5 0 2 18 0 0\n")
    before = run.cpu_jiffies(str(stat))
    assert before == (35, 1000)
    stat.write_text("cpu  300 0 100 1400 10 0 5 185 0 0\n")  # 1000 more ticks, 150 of them stolen
    assert run.steal_line(before, run.cpu_jiffies(str(stat))).endswith(": 15.0%.")
    assert run.cpu_jiffies(str(tmp_path / "absent")) is None
    stat.write_text("intr 1 2 3\n")
    assert run.cpu_jiffies(str(stat)) is None
    assert run.steal_line(None, (1, 2)).endswith(": not known.")


def test_the_fastest_recovery_counts_each_at_its_slowest_rank():
    """A fault job recovers once per attempt after a fault; per recovery the slowest rank's figures count (recovery
    ends with a barrier), and of the recoveries the fastest, with all of them listed in order."""
    rec = lambda rank, tier, s, fetch, restore: {"msg": "recovered", "rank": rank, "tier": tier, "seconds": s,
                                                 "fetch_s": fetch, "restore_s": restore, "iteration": 4}
    attempts = [[{"msg": "start"}],
                [rec(0, "local", 0.5, 0.1, 0.3), rec(1, "peer", 0.7, 0.4, 0.2)],
                [rec(0, "local", 0.45, 0.2, 0.1), rec(1, "peer", 0.6, 0.3, 0.25)]]  # the same iteration again
    assert state_path.fastest_recovery(attempts, "peer") == {"seconds": 0.6, "fetch_s": 0.3, "restore_s": 0.25,
                                                             "all_s": [0.7, 0.6]}
    assert state_path.fastest_recovery(attempts, "local")["all_s"] == [0.5, 0.45]
    two = [[rec(0, "local", 0.5, 0.1, 0.3), rec(1, "local", 0.4, 0.3, 0.1)]]
    assert state_path.fastest_recovery(two, "local") == {"seconds": 0.5, "fetch_s": 0.3, "restore_s": 0.3,
                                                         "all_s": [0.5]}
    assert state_path.fastest_recovery(attempts, "storage") is None


def test_fault_jobs_fail_twice_while_the_job_runs_that_far():
    assert state_path.faults("kill", (0, 1), 5, 10) == "kill:0:5,kill:1:6"  # two ranks: the agent retries both
    assert state_path.faults("lose", (1,), 5, 5) == "lose:1:5"  # no iteration 6
    assert state_path.faults("lose", (1,), 5, 6) == "lose:1:5,lose:1:6"


def test_the_limited_link_rows_judge_replication_and_peer_recovery_against_the_link():
    x = {"mbit": 1000, "gib": 0.1, "shard_bytes": 1.2e8, "replicated_s": 1.1, "peer_recovery_s": 1.3,
         "peer_recoveries_s": [1.4, 1.3], "peer_fetch_s": 1.05, "peer_restore_s": 0.2,
         "link_bytes_per_s": 1.2e8, "link_both_bytes_per_s": 1.1e8}
    rows = state_path.limited_link_rows(x)
    # both ways: 1.2e8 / 1.1e8 = 1.09 s for the shard, replicated in 1.1 s (99%); one way 1 s, recovered in 1.3 (77%)
    assert [r[3] for r in rows] == ["pass", "FAIL"] and [r[2] for r in rows] == [">= 80% of the link"] * 2
    assert rows[0][1] == "1100 ms (99% of the link)" and rows[1][1] == "1300 ms (77% of the link)"
    assert "limited to 1000 Mbit/s each way by tc" in rows[0][0] and "0.96 Gbit/s one way, 0.88 Gbit/s per " \
        "direction" in rows[0][0] and "1091 ms for the shard" in rows[0][0]
    assert "(1400, 1300 ms; the shard all here after 1050 ms; loading it into the model and optimizer, beside the " \
        "transfer as it arrives: 200 ms; the link one way: 1000 ms)" in rows[1][0]
    assert state_path.limited_link_rows(dict(x, peer_recovery_s=1.25))[1][3] == "pass"  # 80% exactly
    assert state_path.limited_link_rows(dict(x, replicated_s=1.37))[0][3] == "FAIL"  # 79.6%


def test_the_limited_link_case_says_why_it_was_not_measured(tmp_path, monkeypatch):
    """Where this host cannot make the namespaces (the GPU machine's sandbox, a user without root), the row says why
    and no job runs."""
    monkeypatch.setattr(netns, "available", lambda: "network namespaces need root (CAP_NET_ADMIN)")
    monkeypatch.setattr(state_path, "_agent_job", lambda *a, **k: pytest.fail("no job without namespaces"))
    rows = state_path.limited_link_rows(state_path.limited_link_figures(tmp_path, 8, 128))
    assert rows == [("state path over a limited link (each machine's NIC limited to 1000 Mbit/s each way by tc): "
                     "replication and recovery from the peer", "not measured: network namespaces need root "
                     "(CAP_NET_ADMIN)", ">= 80% of the link", "not measured")]


@needs_fsdp  # a TinyGPT job under the agent
@pytest.mark.skipif(netns.available() is not None, reason=f"network namespaces: {netns.available()}")
def test_the_limited_link_case_runs_through_the_namespaces_links(tmp_path):
    """The case for real, small (the smallest TinyGPT, 200 Mbit/s NICs): the link it measures is the namespaces'
    (within the NICs' limit, where loopback here carries several Gbit/s), a machine lost twice comes back from the
    peer's memory both times, the set-up is gone after."""
    x = state_path.limited_link_figures(tmp_path, batch=2, seq=16, gib=0.01, iters=6, mbit=200)
    for rate in (x["link_bytes_per_s"], x["link_both_bytes_per_s"]):
        assert 0.5 * 200e6 / 8 < rate <= 1.02 * 200e6 / 8
    assert len(x["peer_recoveries_s"]) == 2 and x["peer_recovery_s"] == min(x["peer_recoveries_s"])
    # the shard crosses the link at its rate at best, so neither can beat it
    fastest = x["shard_bytes"] / (1.02 * 200e6 / 8)
    assert x["replicated_s"] > fastest and x["peer_fetch_s"] > fastest
    assert len(state_path.limited_link_rows(x)) == 2
    assert netns.current(state_path.LINK_TAG) is None
