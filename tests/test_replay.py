import dataclasses
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TRACES
from gemini_sim.cluster import config
from gemini_sim.replay import policies as strategies
from gemini_sim.failures import traces
from gemini_sim.replay.engine import replay
from gemini_sim.failures.synthetic import SyntheticSpec, generate
from gemini_sim.failures.traces import FailureEvent, Trace

PAPER = config.load_preset("gemini-paper")


def long_trace(mtbf_job_h: float, failures: int, mix, machines=16, seed=0, model="poisson"):
    spec = SyntheticSpec(model, mtbf_hours=mtbf_job_h * machines, days=mtbf_job_h * failures / 24,
                         machines=machines, seed=seed, mix=tuple(mix.items()))
    return generate(spec)


def per_failure_s(result, tier):
    """Mean lost progress + retrieval of the failures that recovered from ``tier`` on their own."""
    own = [o for o in result.outcomes if o.tier == tier and not o.during_recovery]
    return sum(o.lost_s + o.retrieval_s for o in own) / len(own)


@pytest.mark.parametrize("name, mtbf_h, mix, tier", [
    ("gemini", 10, {"software": 1}, "local"),           # every failure recovers from local CPU memory
    ("gemini", 10, {"hardware": 1}, "peer"),            # one machine lost: a peer holds its checkpoint
    ("highfreq", 20, {"hardware": 1}, "storage"),
    ("async-remote", 20, {"software": 1}, "local"),
    ("strawman", 300, {"hardware": 1}, "storage"),       # MTBF >> 3 h so the phase is uniform
])
def test_replay_agrees_with_the_closed_form(name, mtbf_h, mix, tier):
    trace = long_trace(mtbf_h, 4000, mix)
    pol = strategies.policy(name, PAPER, trace.mtbf_h * 3600)
    r = replay(trace, PAPER, pol)
    # A second failure during a recovery can escalate the tier (both machines of a group lost): rare at this MTBF.
    assert r.tier_counts()[tier] >= 0.97 * r.failures
    expected = strategies.closed_form_wasted_per_failure_s(pol, tier)
    # A blocking snapshot's stall sits inside the rolled-back window; the replay books it as a checkpoint stall.
    stall = (pol.remote if tier == "storage" else pol.memory).stall_s
    assert per_failure_s(r, tier) + stall == pytest.approx(expected, rel=0.03)


def test_gemini_frequency_respects_checkpoint_and_iteration_time():
    pol = strategies.policy("gemini", PAPER, 1e6)
    t_iter = PAPER.iteration_time_s
    assert pol.memory.interval_s == pytest.approx(t_iter)  # one checkpoint per iteration fits here
    slow = dataclasses.replace(PAPER, cluster=dataclasses.replace(PAPER.cluster, network_gbps=5)).with_replicas(3)
    pol = strategies.policy("gemini", slow, 1e6)
    assert pol.memory.interval_s >= max(pol.memory.complete_s, t_iter)
    assert pol.memory.interval_s / t_iter == pytest.approx(round(pol.memory.interval_s / t_iter))
    assert pol.memory.interval_s - t_iter < pol.memory.complete_s


def test_young_daly_interval():
    mtbf = 100 * 3600
    pol = strategies.policy("young-daly", PAPER, mtbf)
    c = PAPER.remote_write_s
    assert pol.remote.interval_s == pytest.approx((2 * c * mtbf) ** 0.5, abs=PAPER.iteration_time_s)


event_st = st.tuples(st.floats(0, 500), st.sampled_from(traces.KINDS), st.integers(1, 20))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(event_st, max_size=25), extra=st.floats(0, 50), seed=st.integers(0, 5),
       name=st.sampled_from(list(strategies.STRATEGIES)), replicas=st.sampled_from([1, 2, 3, 4]))
def test_wall_time_splits_exactly_into_useful_and_wasted(events, extra, seed, name, replicas):
    evs = tuple(FailureEvent(t, k, m) for t, k, m in sorted(events))
    duration = (evs[-1].time_h if evs else 0) + extra + 1
    trace = Trace("h", evs, duration)
    preset = PAPER.with_replicas(replicas)
    r = replay(trace, preset, name, seed=seed)
    assert r.failures == len(evs)
    assert r.useful_s + r.wasted_s == pytest.approx(r.horizon_s, abs=1e-6 * r.horizon_s + 1e-6)
    assert min(r.lost_s, r.retrieval_s, r.restart_s, r.stall_s, r.useful_s, r.degraded_s) >= -1e-9
    assert all(o.lost_s >= -1e-9 for o in r.outcomes)
    if name != "gemini-continue":
        assert r.degraded_s == 0


def test_tier_choice_follows_placement():
    two = dataclasses.replace(PAPER, cluster=dataclasses.replace(PAPER.cluster, machines=2), name="two")
    evs = (FailureEvent(10, "software", 1), FailureEvent(20, "hardware", 1), FailureEvent(30, "hardware", 2))
    r = replay(Trace("t", evs, 40), two, "gemini")
    assert [o.tier for o in r.outcomes] == ["local", "peer", "storage"]
    # Without peers (m=1) a lost machine means remote storage.
    r1 = replay(Trace("t", evs, 40), two.with_replicas(1), "gemini")
    assert [o.tier for o in r1.outcomes] == ["local", "storage", "storage"]


def test_remote_fallback_rolls_back_past_memory_recoveries():
    # Software failure at 2 h recovers from memory; a whole-cluster loss at 2.5 h must go back to the last remote
    # checkpoint, which is the job's start (GEMINI persists every 3 h): everything trained so far is lost.
    evs = (FailureEvent(2.0, "software", 1), FailureEvent(2.5, "unknown", 16))
    r = replay(Trace("t", evs, 5), PAPER, "gemini")
    assert [o.tier for o in r.outcomes] == ["local", "storage"]
    restart = PAPER.recovery.restart_s + PAPER.cpu_to_gpu_s
    trained_before = 2.5 * 3600 - restart - r.outcomes[0].lost_s
    assert r.outcomes[1].lost_s == pytest.approx(trained_before, abs=1e-6)


def test_recovery_from_memory_copies_back_at_the_cpu_to_gpu_rate():
    """Recovery copies the shard CPU -> GPU: a machine type whose H2D differs from its D2H (the H100 measured here:
    51.6 vs 54.8 GB/s) recovers at its H2D rate, locally and after the peer's transfer."""
    h100 = dataclasses.replace(PAPER, cluster=dataclasses.replace(PAPER.cluster, pcie_gbps=8 * 54.8 * 8,
                                                                  h2d_gbps=8 * 51.6 * 8))
    pol = strategies.STRATEGIES["gemini"](h100, 6335 * 3600)
    back = h100.checkpoint_bytes_per_machine / (8 * 51.6e9)
    assert pol.retrieve_local_s == pytest.approx(back)
    assert pol.retrieve_peer_s == pytest.approx(h100.peer_transfer_s + back)


def test_failure_during_recovery_starts_recovery_over():
    evs = (FailureEvent(1.0, "hardware", 1), FailureEvent(1.0, "software", 1))
    r = replay(Trace("t", evs, 3), PAPER, "strawman")
    assert r.outcomes[1].during_recovery and r.outcomes[1].lost_s == 0
    assert r.useful_s + r.wasted_s == pytest.approx(r.horizon_s)


def test_cost_grows_with_failures_not_iterations():
    llama = config.load_preset("llama3-405b")
    short = Trace("s", (FailureEvent(1, "hardware", 1),), 2)
    year = Trace("y", (FailureEvent(1, "hardware", 1),), 365 * 24)
    a, b = replay(short, llama, "gemini"), replay(year, llama, "gemini")
    assert a.sim_events == b.sim_events < 20
    assert year.duration_h * 3600 / llama.iteration_time_s > 1e6  # a million iterations, replayed in ~10 events
    many = long_trace(1, 500, {"hardware": 1}, machines=2048)
    assert replay(many, llama, "gemini").sim_events < 5 * len(many.events) + 10


def test_capped_events_and_gpu_hours():
    r = replay(traces.load_trace(TRACES / "bloom176b.csv"), PAPER, "gemini")
    assert r.capped_events == 1  # the 48-machine maintenance on a 16-machine cluster
    assert r.gpu_hours_wasted == pytest.approx(r.wasted_hours * 128)


def test_gemini_wastes_least_on_real_and_synthetic_traces():
    for trace in (traces.load_trace(TRACES / "bloom176b.csv"), long_trace(30, 200, {"hardware": 3, "software": 1})):
        wasted = {s: replay(trace, PAPER, s).wasted_s for s in strategies.STRATEGIES}
        assert min(wasted, key=wasted.get) in ("gemini", "gemini-continue")
        assert min(v for k, v in wasted.items() if not k.startswith("gemini")) > wasted["gemini"]
        assert wasted["strawman"] > wasted["highfreq"]


def _continue_minus_wait(preset, k: int) -> float:
    """What going on without k lost machines saves against waiting for them, per such failure (negative: saved):
    no replacement wait, but (k / N) of the speed until the replacements come, and one more restart and peer
    retrieval to grow back onto them."""
    rec, pol = preset.recovery, strategies.policy("gemini", preset, 1e6)
    return rec.restart_s + pol.retrieve_peer_s - rec.replace_s + rec.replace_s * k / preset.cluster.machines


@pytest.mark.parametrize("k", [1, 3])
def test_going_on_without_lost_machines_costs_their_share_until_they_are_replaced(k):
    trace = Trace("one", (FailureEvent(5.0, "hardware", k),), 10)
    wait, go_on = replay(trace, PAPER, "gemini"), replay(trace, PAPER, "gemini-continue")
    assert [o.tier for o in go_on.outcomes] == [o.tier for o in wait.outcomes]
    assert go_on.lost_s == pytest.approx(wait.lost_s)
    assert wait.restart_s == pytest.approx(PAPER.recovery.restart_s + PAPER.recovery.replace_s)
    assert go_on.restart_s == pytest.approx(2 * PAPER.recovery.restart_s)  # the loss, then growing back
    assert go_on.degraded_s == pytest.approx(PAPER.recovery.replace_s * k / PAPER.cluster.machines)
    assert go_on.wasted_s - wait.wasted_s == pytest.approx(_continue_minus_wait(PAPER, k))
    # a loss of every machine cannot go on: it waits like gemini
    everything = Trace("all", (FailureEvent(5.0, "hardware", PAPER.cluster.machines),), 10)
    assert replay(everything, PAPER, "gemini-continue").wasted_s == pytest.approx(
        replay(everything, PAPER, "gemini").wasted_s)


def test_continue_or_wait_on_the_bundled_trace():
    """On the BLOOM trace every failure that took some machines (not all) costs going on instead of waiting what the
    closed form says in restarts, retrieval and speed; lost progress differs only by where each later failure falls
    in its tier's cycle, since the two timelines drift apart (at most one interval of that tier a failure)."""
    trace = traces.load_trace(TRACES / "bloom176b.csv")
    wait, go_on = replay(trace, PAPER, "gemini"), replay(trace, PAPER, "gemini-continue")
    n, rec = PAPER.cluster.machines, PAPER.recovery
    pol = strategies.policy("gemini", PAPER, 1e6)
    partial = [min(e.machines, n) for e in trace.events if e.loses_machines and e.machines < n]
    assert len(partial) == 2
    assert go_on.restart_s - wait.restart_s == pytest.approx(len(partial) * (rec.restart_s - rec.replace_s))
    assert go_on.degraded_s == pytest.approx(sum(rec.replace_s * k / n for k in partial))
    assert go_on.retrieval_s - wait.retrieval_s == pytest.approx(len(partial) * pol.retrieve_peer_s)
    for a, b in zip(wait.outcomes, go_on.outcomes):
        assert a.tier == b.tier
        cycle = pol.remote.interval_s if a.tier == "storage" else pol.memory.interval_s
        assert abs(a.lost_s - b.lost_s) <= cycle


def test_cli_replay_json_shape(cli, tmp_path):
    rc, out, err = cli("replay", "--synthetic", "burst", "--days", "20", "--seed", "3", "--json",
                       "--preset", "opt-175b", "--out", tmp_path)
    d = json.loads(out)
    names = [s["name"] for s in d["strategies"]]
    assert names == list(strategies.STRATEGIES)
    for s in d["strategies"]:
        assert {"name", "wasted_hours", "gpu_hours_wasted", "failures", "components"} <= set(s)
        assert set(s["components"]) == {"lost_progress_hours", "retrieval_hours", "checkpoint_stall_hours",
                                        "restart_hours", "degraded_hours"}
        assert s["wasted_hours"] == pytest.approx(sum(s["components"].values()))
    assert d["trace"]["synthetic"] is True
    for f in ("replay.json", "replay-breakdown.png", "replay-cumulative.png", "replay-trace.png"):
        assert (tmp_path / f).stat().st_size > 0


def test_cli_multiple_traces_and_strategy_subset(cli, tmp_path):
    rc, out, err = cli("replay", "--trace", TRACES / "bloom176b.csv", TRACES / "bloom176b.csv", "--json",
                       "--strategies", "gemini,strawman")
    runs = json.loads(out)["runs"]
    assert len(runs) == 2 and [s["name"] for s in runs[0]["strategies"]] == ["gemini", "strawman"]


def test_cli_replicas_that_do_not_fit_memory(cli):
    rc, out, err = cli("replay", "--synthetic", "poisson", "--preset", "gemini-paper", "--replicas", "60",
                       check_rc=2)
    assert "exceeds" in err or "GB missing" in err


def test_replay_uses_the_configured_placement_under_rack_failures():
    # gemini-paper has racks of 4; a failure that takes 4 machines takes a whole rack. Group placement keeps both
    # copies of a checkpoint in one rack (remote storage needed); domain-aware puts them in different racks.
    rack = Trace("r", (FailureEvent(5, "hardware", 4),), 10)
    group = replay(rack, PAPER, "gemini")
    aware_preset = dataclasses.replace(PAPER, recovery=dataclasses.replace(PAPER.recovery, placement="domain-aware"))
    aware = replay(rack, aware_preset, "gemini")
    assert group.outcomes[0].tier == "storage" and aware.outcomes[0].tier == "peer"
    assert aware.wasted_s < group.wasted_s


def test_placement_config_key_is_validated(tmp_path):
    text = (config.resources.files("gemini_sim.cluster.presets") / "gemini-paper.toml").read_text()
    f = tmp_path / "p.toml"
    f.write_text(text.replace("replicas = 2", "replicas = 2\nplacement = \"hash\""))
    with pytest.raises(config.UserError, match="recovery.placement"):
        config.load_config(f)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(times=st.lists(st.sampled_from([0.0, 0.5, 10.0, 10.0, 37.25]), min_size=1, max_size=12),
       extra=st.sampled_from([0.0, 0.0, 1e-9, 3.0]), name=st.sampled_from(list(strategies.STRATEGIES)),
       seed=st.integers(0, 3))
def test_every_row_of_a_trace_reaches_the_replay(tmp_path_factory, times, extra, name, seed):
    """Failures replayed == failures in the trace, for any trace: rows at the same instant, a row at the job's last
    instant (the default duration is the last failure's time), a row at time 0; read from CSV as a user writes it."""
    rows = "".join(f"{t},hardware,1,row {i}\n" for i, t in enumerate(sorted(times)))
    header = f"# duration_hours: {max(times) + extra}\n" if extra else ""
    path = tmp_path_factory.mktemp("t") / "trace.csv"
    path.write_text(header + "time_hours,kind,machines,note\n" + rows)
    trace = traces.load_trace(path)
    r = replay(trace, PAPER, name, seed=seed)
    assert r.failures == len(times) == len(r.outcomes)
    assert r.useful_s + r.wasted_s == pytest.approx(r.horizon_s, abs=1e-6 * r.horizon_s + 1e-6)
