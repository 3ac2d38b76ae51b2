import dataclasses
import math
import json

import pytest
from hypothesis import example, given, settings, strategies as st

from gemini_sim.cluster import config, workload
from gemini_sim import interleave
from gemini_sim.cluster.config import GBPS
from gemini_sim.errors import UserError
from gemini_sim.interleave import InterleaveConfig, simulate
from gemini_sim.interleave.model import overlap

PAPER = config.load_preset("gemini-paper")


def small(layers=6, gbps=400.0, machines=8, replicas=2, params=39e9):
    """The paper's cluster, fewer layers and machines so that tests run fast (same per-layer shapes)."""
    c = dataclasses.replace(PAPER.cluster, machines=machines, network_gbps=gbps)
    m = dataclasses.replace(PAPER.model, layers=layers, parameters=params * layers / 48,
                            global_batch_tokens=PAPER.model.global_batch_tokens * machines / 16)
    return dataclasses.replace(PAPER, cluster=c, model=m, name="small").with_replicas(replicas)


def profile_of(ops, machines=4):
    return {"format": "gemini-sim-profile", "version": 1, "machines": machines,
            "iterations": [{"start_s": 0, "end_s": ops[-1]["end_s"], "ops": ops}]}


def test_lone_ring_collective_takes_its_bandwidth_term():
    preset = small(machines=4)
    nbytes = 4e9
    prof = profile_of([{"kind": "collective", "name": "all_gather", "start_s": 0, "end_s": 0.1, "bytes": nbytes},
                       {"kind": "compute", "name": "optimizer", "start_s": 0.1, "end_s": 0.2}])
    tl = workload.from_profile(prof)
    r = simulate(preset, InterleaveConfig(schedule="priority"), tl, find_interval=False)
    expected = 3 / 4 * nbytes / (400 * GBPS) + 0.1
    assert r.baseline_iteration_time_s == pytest.approx(expected, rel=1e-9)


def test_zero3_timeline_shape():
    preset = small(layers=5)
    tl = workload.zero3(preset)
    comm = [op for op in tl.ops if op.stream == "comm"]
    assert sum(op.collective == "all_gather" for op in comm) == 10
    assert sum(op.collective == "reduce_scatter" for op in comm) == 5
    assert tl.ops[tl.update].name == "optimizer"
    fwd = [op.duration_s for op in tl.ops if op.name.startswith("forward")]
    bwd = [op.duration_s for op in tl.ops if op.name.startswith("backward")]
    assert bwd[0] == pytest.approx(2 * fwd[0])
    tokens = preset.model.global_batch_tokens / preset.cluster.gpus
    assert fwd[0] == pytest.approx(2 * preset.model.parameters / 5 * tokens /
                                   (preset.cluster.gpu_peak_tflops * 1e12 * preset.model.mfu))


def test_blocking_adds_the_whole_checkpoint_to_the_iteration():
    preset = small()
    r = simulate(preset, InterleaveConfig(schedule="blocking"))
    # PCIe (25 GB/s) is slower than the NIC (50 GB/s): the copy-out bounds the checkpoint; the last send follows.
    d2h = preset.checkpoint_bytes_per_machine / (preset.cluster.pcie_gbps * GBPS)
    last_send = 0.5 * 2 ** 30 / (preset.cluster.network_gbps * GBPS)
    assert r.iteration_time_s - r.baseline_iteration_time_s == pytest.approx(d2h + last_send, rel=0.02)
    assert r.overhead_pct > 1
    # The interval that amortizes the stall under 1%:
    assert r.min_interval_iters == pytest.approx(100 * (d2h + last_send) / r.baseline_iteration_time_s, abs=1.01)


@pytest.mark.parametrize("schedule", ["gemini", "priority"])
def test_checkpoint_every_iteration_for_free_when_idle_time_suffices(schedule):
    r = simulate(small(), InterleaveConfig(schedule=schedule))
    assert r.overhead_pct == pytest.approx(0, abs=0.05)
    assert r.min_interval_iters == 1
    assert r.checkpoint_complete_s < r.iteration_time_s


def test_naive_costs_time_and_smart_schedules_do_not_cost_more():
    preset = small(replicas=4)
    res = {s: simulate(preset, InterleaveConfig(schedule=s, jitter=0.1), find_interval=False)
           for s in interleave.SCHEDULES}
    assert res["naive"].overhead_pct > 0.5
    assert res["gemini"].overhead_pct <= res["naive"].overhead_pct
    assert res["priority"].overhead_pct <= res["gemini"].overhead_pct + 1e-9
    assert res["blocking"].overhead_pct >= res["priority"].overhead_pct


def test_priority_never_slows_training_collectives():
    preset = small(gbps=100)  # network-bound training: no idle span is long
    base = simulate(preset, InterleaveConfig(schedule="priority"), find_interval=False)
    train_end = max(b for i, a, b in base.run.op_spans)
    assert train_end == pytest.approx(base.baseline_iteration_time_s, rel=1e-9)


def test_network_bound_training_needs_a_longer_interval():
    preset = small(gbps=100)
    r = simulate(preset, InterleaveConfig(schedule="gemini"), max_interval=16)
    assert r.overhead_pct > 1 and r.min_interval_iters is not None and r.min_interval_iters > 1
    again = simulate(preset, InterleaveConfig(schedule="gemini", interval=r.min_interval_iters),
                     find_interval=False)
    assert again.overhead_pct <= 1.0


def test_more_replicas_never_cost_less():
    a = simulate(small(gbps=100), InterleaveConfig(schedule="naive"), find_interval=False)
    b = simulate(small(gbps=100, replicas=3), InterleaveConfig(schedule="naive"), find_interval=False)
    assert b.overhead_pct >= a.overhead_pct - 1e-9 and b.checkpoint_time_s > a.checkpoint_time_s


def test_profile_round_trip_and_errors(tmp_path):
    ops = [{"kind": "compute", "name": "forward", "start_s": 0, "end_s": 0.05},
           {"kind": "collective", "name": "all_reduce", "start_s": 0.06, "end_s": 0.08, "bytes": 1e8},
           {"kind": "compute", "name": "optimizer", "start_s": 0.08, "end_s": 0.09}]
    f = tmp_path / "p.json"
    f.write_text(json.dumps(profile_of(ops)))
    tl = workload.from_profile(workload.load_profile(f))
    assert [op.name for op in tl.ops] == ["forward", "host", "all_reduce", "optimizer"]
    assert tl.ops[tl.update].name == "optimizer"
    for bad, needle in [({"format": "x"}, "not a gemini-sim profile"),
                        ({**profile_of(ops), "version": 9}, "version 9"),
                        (profile_of([{**ops[1], "name": "shuffle"}]), "name must be one of"),
                        (profile_of([{**ops[0], "start_s": 0.5, "end_s": 0.25}]), "end_s is before start_s"),
                        (profile_of([{**ops[0], "end_s": -1}]), "end_s: -1 is less than the minimum of 0")]:
        f.write_text(json.dumps(bad))
        with pytest.raises(UserError, match=needle):
            workload.load_profile(f)


def test_bad_configs():
    with pytest.raises(UserError, match="unknown schedule"):
        InterleaveConfig(schedule="eager")
    with pytest.raises(UserError, match="interval"):
        InterleaveConfig(interval=0)
    with pytest.raises(UserError, match="replicas"):
        simulate(small(), InterleaveConfig(replicas=9))


def test_cli_interleave_json(cli, tmp_path):
    rc, out, err = cli("interleave", "--preset", "gemini-paper", "--schedule", "blocking", "--json",
                       "--plot", tmp_path / "g.png")
    d = json.loads(out)
    for key in ("schedule", "iteration_time_s", "baseline_iteration_time_s", "overhead_pct", "checkpoint_time_s",
                "min_interval_iters"):
        assert key in d
    assert d["schedule"] == "blocking" and d["overhead_pct"] > 1
    assert (tmp_path / "g.png").stat().st_size > 0
    rc, out, err = cli("interleave", "--schedule", "lazy", check_rc=2)
    assert "unknown schedule" in err and err.count("\n") == 1


def test_symmetric_slice_matches_the_full_cluster(monkeypatch):
    preset = small(machines=48, layers=3)
    sliced = {s: simulate(preset, InterleaveConfig(schedule=s), find_interval=False) for s in ("naive", "gemini")}
    assert all(r.simulated_machines == 16 for r in sliced.values())
    monkeypatch.setattr(interleave.model, "SLICE", 10 ** 6)  # where symmetric_slice reads it
    for s, a in sliced.items():
        b = simulate(preset, InterleaveConfig(schedule=s), find_interval=False)
        assert b.simulated_machines == 48
        assert a.iteration_time_s == pytest.approx(b.iteration_time_s, rel=1e-9)
        assert a.checkpoint_complete_s == pytest.approx(b.checkpoint_complete_s, rel=1e-9)


def test_host_cost_adds_the_checkpoints_cpu_spread_over_the_interval():
    """The host cost model: a checkpoint's CPU on training's cores delays the interval by as much."""
    preset = small()
    base = simulate(preset, InterleaveConfig(schedule="gemini"))
    for k in (1, 4):
        r = simulate(preset, InterleaveConfig(schedule="gemini", interval=k, host_cpu_s=0.3), find_interval=False)
        plain = simulate(preset, InterleaveConfig(schedule="gemini", interval=k), find_interval=False)
        assert r.iteration_time_s == pytest.approx(plain.iteration_time_s + 0.3 / k, rel=1e-12)
        assert r.host_cpu_per_iteration_s == pytest.approx(0.3 / k) and r.copy_slowdown_per_iteration_s == 0
        assert r.checkpoint_complete_s == pytest.approx(plain.checkpoint_complete_s, rel=1e-12)
    # the smallest interval under the budget grows with the host's cost: overhead(k) = 100 * 0.3 / k / t_iter
    t = base.baseline_iteration_time_s
    r = simulate(preset, InterleaveConfig(schedule="gemini", host_cpu_s=0.3), threshold_pct=1.0)
    assert base.min_interval_iters == 1 and r.min_interval_iters == math.ceil(100 * 0.3 / t / 1.0)
    b = simulate(preset, InterleaveConfig(schedule="blocking", host_cpu_s=0.3), threshold_pct=1.0)
    b0 = simulate(preset, InterleaveConfig(schedule="blocking"), threshold_pct=1.0)
    stall = b0.iteration_time_s - b0.baseline_iteration_time_s + 0.3
    assert b.min_interval_iters == math.ceil(100 * stall / t / 1.0 - 1e-9)
    with pytest.raises(UserError, match="host CPU"):
        InterleaveConfig(host_cpu_s=float("nan"))


@given(st.lists(st.floats(0, 100, allow_nan=False), max_size=16), st.lists(st.floats(0, 100, allow_nan=False),
                                                                            max_size=16))
@settings(max_examples=300, deadline=None)
def test_overlap_of_two_interval_sets_is_the_brute_force_sum(a, b):
    def disjoint(points):  # consecutive pairs of sorted points: intervals that do not overlap each other
        p = sorted(points)
        return [(p[i], p[i + 1]) for i in range(0, len(p) - 1, 2)]

    xs, ys = disjoint(a), disjoint(b)
    brute = sum(max(0.0, min(x1, y1) - max(x0, y0)) for x0, x1 in xs for y0, y1 in ys)
    assert overlap(xs, ys) == pytest.approx(brute, abs=1e-9)
    assert overlap(xs, ys) == pytest.approx(overlap(ys, xs), abs=1e-9)


def test_copy_slowdown_lengthens_the_compute_that_ran_beside_the_copy():
    """The GPU half of the cost model: compute slows by copy_slowdown while the GPU-to-CPU copy runs beside it."""
    plain = small()
    slowed = dataclasses.replace(plain, cluster=dataclasses.replace(plain.cluster, copy_slowdown=0.05))
    for schedule, k in (("naive", 1), ("gemini", 1), ("gemini", 3)):
        cfg = InterleaveConfig(schedule=schedule, interval=k)
        a, b = simulate(plain, cfg, find_interval=False), simulate(slowed, cfg, find_interval=False)
        copy_s = plain.gpu_to_cpu_s  # the whole shard over PCIe: the copy cannot overlap compute for longer
        assert 0 < b.run.copy_overlap_s <= copy_s * (1 + 1e-9)
        assert b.iteration_time_s == pytest.approx(a.iteration_time_s + 0.05 * b.run.copy_overlap_s / k, rel=1e-12)
        assert b.copy_slowdown_per_iteration_s == pytest.approx(0.05 * b.run.copy_overlap_s / k, rel=1e-12)
        assert b.as_dict()["copy_slowdown_per_iteration_s"] == b.copy_slowdown_per_iteration_s
        assert a.copy_slowdown_per_iteration_s == 0 and b.host_cpu_per_iteration_s == 0
        assert b.checkpoint_complete_s == a.checkpoint_complete_s  # the network model itself is unchanged
    # blocking copies while training waits: nothing overlaps, nothing slows
    b = simulate(slowed, InterleaveConfig(schedule="blocking"), find_interval=False)
    assert b.run.copy_overlap_s == 0
    assert b.iteration_time_s == simulate(plain, InterleaveConfig(schedule="blocking"),
                                          find_interval=False).iteration_time_s
    # the interval search sees the slowdown too: a large one forces a longer interval
    heavy = dataclasses.replace(plain, cluster=dataclasses.replace(plain.cluster, copy_slowdown=0.9))
    assert simulate(plain, InterleaveConfig(schedule="naive"), threshold_pct=1.0).min_interval_iters < \
        simulate(heavy, InterleaveConfig(schedule="naive"), threshold_pct=1.0).min_interval_iters


def _scan(overhead, threshold, kmax):
    return next((k for k in range(1, kmax + 1) if overhead(k) <= threshold), None)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0, 50, allow_nan=False), min_size=1, max_size=40), st.floats(0, 20, allow_nan=False),
       st.integers(1, 40))
def test_the_interval_search_finds_what_a_scan_of_every_interval_finds(drops, threshold, kmax):
    # Any overhead that falls as K grows: a running sum of drops from a start value, held beyond the list.
    levels = [50.0]
    for d in drops:
        levels.append(max(levels[-1] - d, 0.0))
    overhead = lambda k: levels[min(k - 1, len(levels) - 1)]  # noqa: E731
    calls = []
    found = interleave.simulation.smallest_interval(lambda k: calls.append(k) or overhead(k), threshold, kmax)
    assert found == _scan(overhead, threshold, kmax)
    assert len(calls) == len(set(calls)) and all(1 <= k <= kmax for k in calls)  # each K simulated once, in range
    assert len(calls) <= 2 * kmax.bit_length() + 3  # doubling and bisection, plus the prediction and the K below it


def test_an_overhead_that_falls_slowly_is_searched_by_doubling_not_one_k_at_a_time():
    # Just over the budget until K = 30: each prediction says "one more", so following predictions would simulate
    # K = 2, 3, ..., 30. After the first one falls short the search doubles and bisects instead.
    calls = []
    overhead = lambda k: 0.5 if k >= 30 else 1.001  # noqa: E731
    assert interleave.simulation.smallest_interval(lambda k: calls.append(k) or overhead(k), 1.0, 32) == 30
    assert len(calls) <= 2 * (32).bit_length() + 3


@settings(max_examples=200, deadline=None)
@given(st.floats(0.01, 100), st.floats(0.01, 5), st.integers(1, 64))
@example(25.0, 4.999999999999999, 7)  # c / threshold a hair over 5: 5 falls short, 6 is the answer
def test_an_amortised_overhead_is_found_in_three_simulations(cost, threshold, kmax):
    # A checkpoint's cost spread over the interval: c / K. The prediction from K = 1 is the answer, so the search
    # simulates K = 1, the prediction and the K below it, not the doubling and bisection's 8 or so.
    calls = []
    found = interleave.simulation.smallest_interval(lambda k: calls.append(k) or cost / k, threshold, kmax)
    assert found == _scan(lambda k: cost / k, threshold, kmax)
    assert len(calls) <= 3


def test_one_slow_nic_bounds_the_rings_and_its_own_copies_as_if_every_nic_were_that_slow():
    """Machine 0's NIC at half speed: every ring step waits for the two flows that cross it, and under `blocking`
    the checkpoint ends with machine 0's pair; both end exactly when they would with every NIC at half speed."""
    healthy, halved = small(), small(gbps=200.0)
    tl = workload.zero3(healthy)
    slow = simulate(healthy, InterleaveConfig(schedule="blocking", slow_nic=0.5), tl, find_interval=False)
    all_slow = simulate(halved, InterleaveConfig(schedule="blocking"), tl, find_interval=False)
    plain = simulate(healthy, InterleaveConfig(schedule="blocking"), tl, find_interval=False)
    for attr in ("baseline_iteration_time_s", "iteration_time_s", "checkpoint_complete_s", "checkpoint_time_s"):
        assert getattr(slow, attr) == pytest.approx(getattr(all_slow, attr), rel=1e-9), attr
    assert slow.checkpoint_time_s > plain.checkpoint_time_s


def test_a_slow_nic_breaks_the_symmetry_so_the_whole_cluster_is_simulated():
    preset = small(machines=48, layers=3)
    healthy = simulate(preset, InterleaveConfig(schedule="gemini"), find_interval=False)
    slow = simulate(preset, InterleaveConfig(schedule="gemini", slow_nic=0.25), find_interval=False)
    assert healthy.simulated_machines == 16 and slow.simulated_machines == 48
    assert slow.baseline_iteration_time_s > healthy.baseline_iteration_time_s
    # GEMINI plans machine 0's sends at its own NIC's speed: the shard needs a longer idle span than before.
    used = [(a, b) for a, b, nbytes, _ in slow.spans if nbytes]
    assert used and used != [(a, b) for a, b, nbytes, _ in healthy.spans if nbytes]
    assert slow.checkpoint_time_s > healthy.checkpoint_time_s
    with pytest.raises(UserError, match="slow NIC"):
        InterleaveConfig(slow_nic=0.0)
