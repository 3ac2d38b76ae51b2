"""The simulator side of closing the loop: profiles from the runtime, the measured set-up, exported plans and
`gemini-sim validate`, on hand-made run directories whose numbers are known."""

import json
import re

import pytest

from gemini_sim import interleave, plan as plan_mod, calibration as validate
from gemini_sim.cluster import workload
from gemini_sim.errors import UserError
from gemini_sim.cluster.config import GBPS


NET = 25e6  # bytes/s of every NIC in the hand-made set-up (200 Mbit/s)


class Result:
    def __init__(self, rc, out, err):
        self.returncode, self.stdout, self.stderr = rc, out, err


def cli(*args):
    from conftest import run_cli

    return Result(*run_cli(*args, check_rc=None))


def op(kind, name, a, b, nbytes=None):
    d = {"kind": kind, "name": name, "start_s": a, "end_s": b}
    if nbytes is not None:
        d["bytes"] = nbytes
    return d


def iteration(i, slow=1.0):
    """fwd compute, all-gather (4 MB, 0.2 s), bwd compute, reduce-scatter (4 MB, 0.3 s), optimizer."""
    f = 0.3 * slow
    ops = [op("compute", "forward", 0.0, f), op("collective", "all_gather", f, f + 0.2, 4_000_000),
           op("compute", "backward", f + 0.2, f + 0.8), op("collective", "reduce_scatter", f + 0.8, f + 1.1, 4_000_000),
           op("compute", "optimizer", f + 1.1, f + 1.15)]
    return {"iteration": i, "start_s": 0.0, "end_s": f + 1.15, "ops": ops}


def profile(machines=2, slow_one=True):
    its = [iteration(i, 3.0 if (slow_one and i == 4) else 1.0) for i in range(1, 8)]
    return {"format": "gemini-sim-profile", "version": 1, "machines": machines, "processes_per_machine": 1,
            "source": "test", "iterations": its}


def setup_dir(path, machines=2, shard=2_000_000):
    path.mkdir(parents=True, exist_ok=True)
    (path / "profile.json").write_text(json.dumps(profile(machines)))
    (path / "probe.json").write_text(json.dumps({"format": "gemini-sim-probe", "version": 1,
                                                 "network_bytes_per_s": NET, "copy_bytes_per_s": 2e9}))
    for r in range(machines):
        its = [{"iteration": i, "iteration_s": 1.45, "cpu_s": 0.5 + 0.01 * r} for i in range(1, 11)]
        (path / f"timings-rank-{r:05d}.json").write_text(json.dumps(
            {"format": "gemini-sim-timings", "version": 1,
             "shard_bytes": shard, "params": shard * machines // 12, "schedule": "naive", "checkpointing": False,
             "iterations": its}))
    return path


def test_typical_iteration_takes_medians_and_ignores_an_outlier():
    it = workload.typical_iteration(profile())
    names = [o["name"] for o in it["ops"]]
    assert names == ["forward", "all_gather", "backward", "reduce_scatter", "optimizer"]
    assert it["ops"][0]["end_s"] == pytest.approx(0.3)  # the 3x slower iteration 4 is out-voted
    assert it["end_s"] == pytest.approx(1.45)


def test_fitted_collectives_reproduce_the_measured_iteration(tmp_path):
    """With link_bytes_per_s, every collective alone on the ring takes its measured time: the simulated baseline of
    a serial profile is the profile's own iteration; with logical bytes on ideal rings it is shorter."""
    preset, timeline, prof = validate.setup_preset(setup_dir(tmp_path / "baseline"))
    sim = interleave.simulate(preset, interleave.InterleaveConfig(schedule="naive", replicas=2), timeline,
                              find_interval=False)
    assert sim.baseline_iteration_time_s == pytest.approx(1.45, rel=1e-6)
    plain = interleave.simulate(preset, interleave.InterleaveConfig(schedule="naive", replicas=2),
                                workload.from_profile(prof), find_interval=False)
    # ring on 2 machines: each sends half of 4 MB at 25 MB/s = 0.08 s per collective
    assert plain.baseline_iteration_time_s == pytest.approx(1.45 - 0.5 + 0.16, rel=1e-6)
    assert preset.cluster.network_gbps * GBPS == pytest.approx(NET)
    assert preset.checkpoint_bytes_per_machine == pytest.approx(2_000_000)


def test_export_plan_runs_the_simulated_configuration(tmp_path):
    base = setup_dir(tmp_path / "run" / "baseline")
    out = tmp_path / "gemini.json"
    r = cli("interleave", "--setup", str(base), "--schedule", "gemini", "--buffer-mb", "1", "--export-plan",
                str(out), "--json")
    assert r.returncode == 0, r.stderr
    sim = json.loads(r.stdout)
    p = plan_mod.read(out)
    assert p["schedule"]["name"] == "gemini" and p["schedule"]["rule"] == "idle-spans"
    assert p["schedule"]["chunk_bytes"] == 2 ** 19 and p["placement"]["holders"] == [[0, 1], [1, 0]]
    spans = p["schedule"]["spans"]
    # the idle NIC spans of the profile before the update: forward (0.3 s) and backward (0.6 s)
    assert [(s["start_s"], s["end_s"]) for s in spans] == [pytest.approx((0.0, 0.3)), pytest.approx((0.5, 1.1))]
    assert sum(s["bytes"] for s in spans) <= 2_000_000 + 1
    assert [s["after_collectives"] for s in spans] == [0, 1]  # the backward span opens when the all-gather ends
    assert p["provenance"]["predicted"]["overhead_pct"] == pytest.approx(sim["overhead_pct"])
    r = cli("interleave", "--setup", str(base), "--schedule", "priority", "--export-plan", str(out))
    assert r.returncode == 0
    bad = cli("interleave", "--setup", str(tmp_path / "nope"))
    assert bad.returncode == 2 and "missing profile.json" in bad.stderr and "Traceback" not in bad.stderr


def fake_measurements(d, schedule, iteration_s, complete_s, machines=2, cpu_s=None, thread_s=None):
    d.mkdir(parents=True, exist_ok=True)
    for r in range(machines):
        its = [{"iteration": i, "iteration_s": iteration_s} | ({"cpu_s": cpu_s + 0.01 * r} if cpu_s else {})
               | ({"checkpoint_s": thread_s * (1 + r) * (1 + i % 2)} if thread_s else {}) for i in range(1, 11)]
        cks = [{"iteration": i, "complete_s": complete_s} for i in range(1, 10)]
        (d / f"timings-rank-{r:05d}.json").write_text(json.dumps(
            {"format": "gemini-sim-timings", "version": 1,
             "shard_bytes": 2_000_000, "params": 166_666, "schedule": schedule, "checkpointing": True,
             "iterations": its, "checkpoints": cks}))


def test_validate_reports_relative_errors(tmp_path):
    run = tmp_path / "run"
    base = setup_dir(run / "baseline")
    preds = {}
    for s in ("blocking", "naive", "gemini"):
        r = cli("interleave", "--setup", str(base), "--schedule", s, "--buffer-mb", "1", "--export-plan",
                    str(run / s / "plan.json"), "--json")
        assert r.returncode == 0, r.stderr
        preds[s] = json.loads(r.stdout)
    # measured exactly as predicted for blocking, 10% slower for naive; gemini's checkpoint 20% later
    fake_measurements(run / "blocking", "blocking", preds["blocking"]["iteration_time_s"],
                      preds["blocking"]["checkpoint_complete_s"], cpu_s=0.56)
    fake_measurements(run / "naive", "naive", preds["naive"]["iteration_time_s"] * 1.1,
                      preds["naive"]["checkpoint_complete_s"])
    fake_measurements(run / "gemini", "gemini", preds["gemini"]["iteration_time_s"],
                      preds["gemini"]["checkpoint_complete_s"] * 1.2, thread_s=0.002)
    r = cli("validate", str(run), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    rows = {row["schedule"]: row for row in res["schedules"]}
    assert rows["blocking"]["iteration_s"]["rel_error"] == pytest.approx(0, abs=1e-9)
    assert rows["blocking"]["checkpoint_complete_s"]["rel_error"] == pytest.approx(0, abs=1e-9)
    assert rows["naive"]["iteration_s"]["rel_error"] == pytest.approx(1 / 1.1 - 1)
    assert rows["gemini"]["checkpoint_complete_s"]["rel_error"] == pytest.approx(1 / 1.2 - 1)
    base_it = 1.45
    assert rows["blocking"]["overhead_pct"]["measured"] == pytest.approx(
        100 * (preds["blocking"]["iteration_time_s"] / base_it - 1))
    assert res["baseline"]["rel_error"] == pytest.approx(0, abs=1e-6)
    # process CPU per iteration and rank above the baseline's (0.5, 0.51 there; 0.56, 0.57 here); none logged: "-"
    assert rows["blocking"]["extra_cpu_s"] == pytest.approx(0.06)
    assert rows["naive"]["extra_cpu_s"] is None
    # the training thread's own time on checkpoints: the ranks' mean per iteration (3 ms in even iterations, 6 in
    # odd), the median over the steady ones (4 to 10: four 3s, three 6s)
    assert rows["gemini"]["train_thread_s"] == pytest.approx(0.003) and rows["naive"]["train_thread_s"] is None
    assert (run / "validate.json").is_file()
    text = cli("validate", str(run))
    assert text.returncode == 0 and "blocking" in text.stdout and "-9.1%" in text.stdout


def test_validate_errors_are_one_line(tmp_path):
    r = cli("validate", str(tmp_path))
    assert r.returncode == 2 and "not a calibration run directory" in r.stderr and "Traceback" not in r.stderr
    setup_dir(tmp_path / "baseline")
    r = cli("validate", str(tmp_path))
    assert r.returncode == 2 and "no schedule runs" in r.stderr


def rotation_dir(d, overheads, machines=2, block=3):
    """A rotation run: rounds of (none, gemini) turns of ``block`` iterations; round r's none iterations take
    1 + 0.1 r s (the host drifts), its gemini iterations (1 + overheads[r] / 100) times that; the first iteration
    of every turn takes 9 s (it waits for the turn before) and must be left out."""
    d.mkdir(parents=True, exist_ok=True)
    its, it = [], 0
    for r, ov in enumerate(overheads):
        for name, factor in (("none", 1.0), ("gemini", 1 + ov / 100)):
            for pos in range(block):
                it += 1
                its.append({"iteration": it, "iteration_s": 9.0 if pos == 0 else (1 + 0.1 * r) * factor,
                            "schedule": name, "block_pos": pos})
    for k in range(machines):
        (d / f"timings-rank-{k:05d}.json").write_text(json.dumps(
            {"format": "gemini-sim-timings", "version": 1,
             "shard_bytes": 2_000_000, "params": 166_666, "schedule": "gemini", "checkpointing": True,
             "iterations": its, "checkpoints": []}))
    return d


def test_overhead_is_paired_within_rounds_with_a_confidence_interval(tmp_path):
    d = rotation_dir(tmp_path / "rotation", [2.0, 4.0, 6.0])
    paired = validate.paired_overheads(d, warmup=0)
    assert list(paired) == ["gemini"] and paired["gemini"] == pytest.approx([2.0, 4.0, 6.0])
    mean, half = validate.mean_ci(paired["gemini"])
    assert mean == pytest.approx(4.0) and half == pytest.approx(4.302653 * 2.0 / 3 ** 0.5, rel=1e-5)
    assert validate.mean_ci([5.0]) == (5.0, None)
    # the warm-up drops round 0's none turn (iterations 1-3): that round has no baseline and is skipped
    assert validate.paired_overheads(d, warmup=3)["gemini"] == pytest.approx([4.0, 6.0])
    # separate runs (no block_pos): no rounds
    (tmp_path / "plain").mkdir()
    fake_measurements(tmp_path / "plain", "gemini", 1.0, 0.5)
    assert validate.paired_overheads(tmp_path / "plain") == {}


def test_validate_reports_the_paired_overhead_of_a_rotation(tmp_path):
    run = tmp_path / "run"
    base = setup_dir(run / "baseline")
    r = cli("interleave", "--setup", str(base), "--schedule", "gemini", "--buffer-mb", "1", "--export-plan",
            str(run / "gemini" / "plan.json"), "--json")
    assert r.returncode == 0, r.stderr
    rotation_dir(run / "rotation", [1.0, 2.0, 3.0, 2.0])
    r = cli("validate", str(run), "--json", "--warmup", "0")
    assert r.returncode == 0, r.stderr
    ov = json.loads(r.stdout)["schedules"][0]["overhead_pct"]
    assert ov["measured"] == pytest.approx(2.0) and ov["rounds"] == pytest.approx([1.0, 2.0, 3.0, 2.0])
    assert ov["ci95"] == pytest.approx(3.182446 * (2 / 3) ** 0.5 / 2, rel=1e-5)
    assert ov["sd"] == pytest.approx((2 / 3) ** 0.5)  # the rounds' spread: squares 1, 0, 1, 0 over n - 1 = 3
    text = cli("validate", str(run), "--warmup", "0")
    assert text.returncode == 0 and f"2.0% ±{ov['ci95']:.1f} sd 0.8" in text.stdout


@pytest.mark.parametrize("predicted, measured, sd, agrees", [
    (10.9, 10.0, None, True),  # within 10% of the measured overhead
    (11.1, 10.0, None, False),
    (11.1, 10.0, 0.5, False),  # the spread is narrower than 10%: 10% rules
    (11.5, 10.0, 1.6, True),  # the spread is wider: within it
    (8.8, 7.4, 1.3, False),
    (-0.5, 0.0, 0.6, True),  # no measured overhead: only the spread allows any gap
    (0.1, 0.0, None, False),
])
def test_an_overhead_agrees_within_10_percent_or_the_run_to_run_spread(predicted, measured, sd, agrees):
    assert validate.overhead_agrees({"predicted": predicted, "measured": measured, "sd": sd}) is agrees


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("iterations"), "'iterations' is a required property"),
    (lambda t: t["iterations"][0].update(iteration_s="fast"), "$.iterations[0].iteration_s: 'fast' is not of type"),
    (lambda t: t.update(version=2), "timings version 2 is not supported"),
    (lambda t: t.pop("format"), "not a gemini-sim timings"),
])
def test_a_malformed_timings_file_is_a_one_line_error(tmp_path, change, message):
    run = tmp_path / "run"
    base = setup_dir(run / "baseline")
    t = json.loads((base / "timings-rank-00000.json").read_text())
    change(t)
    (base / "timings-rank-00000.json").write_text(json.dumps(t))
    with pytest.raises(UserError, match=re.escape(message)) as e:
        validate.setup_preset(base)
    assert "\n" not in str(e.value)


def test_a_probe_without_a_positive_bandwidth_is_refused(tmp_path):
    base = setup_dir(tmp_path / "baseline")
    (base / "probe.json").write_text(json.dumps({"format": "gemini-sim-probe", "version": 1,
                                                 "network_bytes_per_s": 0, "copy_bytes_per_s": 2e9}))
    with pytest.raises(UserError, match=r"\$\.network_bytes_per_s: 0 is less than or equal to the minimum of 0"):
        validate.setup_preset(base)


def test_the_host_cost_comes_from_the_probe(tmp_path):
    """A checkpoint's CPU per rank: its shard copied and hashed, sent to m-1 peers and m-1 shards received, at the
    probe's per-byte costs (an older probe's one-way send and receive, or this one's transfer, both ways at once,
    plus the kernel's share); it counts against training only where the checkpoint shares training's cores."""
    d = setup_dir(tmp_path / "s", shard=3_000_000)
    assert validate.host_cost(d, 2) == (None, False) and validate.host_cpu_s(d, 2) == 0.0  # an older probe
    probe = json.loads((d / "probe.json").read_text())
    per = {"copy": 1e-10, "hash": 2e-9, "send": 3e-10, "recv": 4e-10}
    now = {"copy": 1e-10, "hash": 2e-9, "transfer": 9e-10, "kernel": 5e-10}  # this probe's: both ways at once
    for shared, costs, moved in ((True, per, 3e-10 + 4e-10), (False, per, 3e-10 + 4e-10), (True, now, 1.4e-9)):
        (d / "probe.json").write_text(json.dumps(probe | {"host_cpu_s_per_byte": costs,
                                                          "checkpoint_shares_training_cores": shared}))
        for m in (1, 2, 3):
            cpu = 3e6 * (1e-10 + 2e-9) + 3e6 * (m - 1) * moved
            assert validate.host_cost(d, m) == (pytest.approx(cpu), shared)
            assert validate.host_cpu_s(d, m) == (pytest.approx(cpu) if shared else 0.0)
    (d / "probe.json").write_text(json.dumps(probe | {"host_cpu_s_per_byte": {"copy": 1e-10, "hash": 2e-9,
                                                                              "send": 3e-10}}))
    with pytest.raises(UserError, match="host_cpu_s_per_byte"):  # neither a transfer cost nor both halves
        validate.host_cost(d, 2)
    # whole checkpoints measured (of a 1.5 MB shard sent to 1 peer): that, scaled to the shard, a shard's moved
    # bytes more or less per copy, the kernel's share on top
    whole = {"cpu_s": 0.004, "shard_bytes": 1_500_000, "copies": 1}
    (d / "probe.json").write_text(json.dumps(probe | {"host_cpu_s_per_byte": now, "checkpoint_cpu": whole}))
    for m in (1, 2, 3):
        cpu = 0.008 + (m - 2) * 3e6 * 9e-10 + 3e6 * (m - 1) * 5e-10
        assert validate.host_cost(d, m) == (pytest.approx(cpu), True)


def test_a_gpu_probe_gives_the_simulator_its_copy_rates_and_slowdown(tmp_path):
    """On a GPU the probe's measured GPU <-> CPU rates (not the CPU memory-copy rate) set the copy path, shared by
    the ranks on one device; compute's slowdown beside a copy comes along."""
    d = setup_dir(tmp_path / "s")
    probe = json.loads((d / "probe.json").read_text())
    gpu = {"device": "NVIDIA H100 80GB HBM3", "d2h_bytes_per_s": 54.8e9, "h2d_bytes_per_s": 51.6e9,
           "copy_compute_slowdown": 0.015}
    for sharing in (1, 2):
        (d / "probe.json").write_text(json.dumps(probe | gpu | {"ranks_per_device": sharing}))
        c = validate.setup_preset(d)[0].cluster
        assert c.gpu == "NVIDIA H100 80GB HBM3" and c.copy_slowdown == 0.015
        assert c.pcie_gbps == pytest.approx(54.8e9 * 8 / 1e9 / sharing)
        assert c.h2d_gbps == pytest.approx(51.6e9 * 8 / 1e9 / sharing)
    cpu = validate.setup_preset(setup_dir(tmp_path / "cpu"))[0].cluster
    assert cpu.gpu == "cpu-rank" and cpu.pcie_gbps == pytest.approx(2e9 * 8 / 1e9) and cpu.copy_slowdown == 0
    (d / "probe.json").write_text(json.dumps(probe | gpu | {"copy_compute_slowdown": 1.5}))
    with pytest.raises(UserError, match="copy_compute_slowdown"):
        validate.setup_preset(d)


def test_plan_from_a_measured_setup(tmp_path, cli):
    """gemini-sim plan --setup: the optimizer on the measured cluster, timeline and host costs; the plan fits it."""
    from gemini_sim import plan as plan_mod

    d = setup_dir(tmp_path / "s")
    out = tmp_path / "plan.json"
    rc, stdout, err = cli("plan", "--setup", d, "--schedules", "naive,gemini", "--replicas", "2", "--span-fill",
                          "0.5", "-o", out)
    p = plan_mod.read(out)
    assert (p["cluster"]["machines"], p["cluster"]["processes_per_machine"]) == (2, 1)
    assert p["schedule"]["name"] in ("naive", "gemini") and p["placement"]["replicas"] == 2
    rc, stdout, err = cli("plan", "--setup", d, "--profile", d / "profile.json", "-o", out, check_rc=2)
    assert "--setup brings its own cluster and profile" in err and "Traceback" not in err
