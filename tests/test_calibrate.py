"""The loop end to end with real processes: the runtime profiles itself and probes the set-up, the simulator turns
that into a plan per schedule, the runtime runs each plan, `gemini-sim validate` compares. Small and on localhost
here (make calibrate is the full-size, bandwidth-limited run); plus the network-namespace set-up where permitted."""

import filecmp
import json
import os
import subprocess
import threading
import time

import pytest
import torch

from conftest import load_example, needs_fsdp
from gemini_sim import plan as plan_mod
from gemini_sim.cluster import workload
from runtime import netns
from runtime.agent import Job, default_plan
from runtime.plan import PlanError

calibrate = load_example("tinygpt", "calibrate")
ModelConfig, TinyGPT, batch = (getattr(load_example("tinygpt", "model"), n) for n in ("ModelConfig", "TinyGPT",
                                                                                    "batch"))

ACCEL = 1 if len(os.sched_getaffinity(0)) > 1 else 0  # compute on one core, the rest on the others
ITERS, PROFILE, BLOCK = 12, 6, 2  # the rotation: 2 rounds of (none, blocking, gemini) x 2 iterations = 12
ACCEL_MS, LAYERS = 10.0, 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    rc = calibrate.main([str(d), "--net", "localhost", "--machines", "4", "--iters", str(ITERS),
                         "--profile-iters", str(PROFILE), "--dim", "64", "--layers", str(LAYERS), "--seq", "32",
                         "--schedules", "blocking,gemini",
                         "--buffer-mb", "0.125", "--block", str(BLOCK), "--rounds", "2",
                         "--accel-cores", str(ACCEL), "--accel-ms", str(ACCEL_MS)])
    assert rc == 0
    return d


@needs_fsdp
def test_runtime_writes_a_profile_the_simulator_reads(run_dir):
    base = run_dir / "baseline"
    prof = workload.load_profile(base / "profile.json")  # validated
    assert prof["machines"] == 4 and prof["processes_per_machine"] == 1
    from torch.distributed.fsdp import FSDPModule  # the supported hooks where this torch has them

    assert prof["source"].endswith("fsdp2-comm" if hasattr(FSDPModule, "set_custom_all_gather") else "wrapped")
    assert [it["iteration"] for it in prof["iterations"]] == list(range(1, PROFILE + 1))
    timings = json.loads((base / "timings-rank-00000.json").read_text())
    total_params = timings["params"]  # the whole model's
    assert (timings["backend"], timings["device"] == "cpu") in (("gloo", True), ("nccl", False))
    for it in prof["iterations"]:
        ops = it["ops"]
        assert all(a["end_s"] <= b["start_s"] + 1e-6 for a, b in zip(ops, ops[1:]))  # one thread: no overlap
        assert ops[-1]["name"] == "optimizer" and ops[-1]["end_s"] == pytest.approx(it["end_s"])
        gathered = sum(o["bytes"] for o in ops if o["name"] == "all_gather")
        reduced = sum(o["bytes"] for o in ops if o["name"] == "reduce_scatter")
        assert gathered >= 4 * total_params  # every fp32 parameter gathered at least once (fwd; bwd again)
        assert reduced >= 4 * total_params  # every gradient reduce-scattered once
        assert {o["name"] for o in ops if o["kind"] == "compute"} >= {"forward", "backward", "optimizer"}
        # the emulated accelerator's time is in the compute spans: per block ACCEL_MS forward, twice that backward
        for name, per_block in (("forward", ACCEL_MS), ("backward", 2 * ACCEL_MS)):
            spent = sum(o["end_s"] - o["start_s"] for o in ops if o["name"] == name)
            assert spent >= LAYERS * per_block / 1000
    per_rank = sorted(base.glob("profile-rank-*.json"))
    assert len(per_rank) == 4
    probe = json.loads((base / "probe.json").read_text())
    assert probe["network_bytes_per_s"] > 0 and probe["copy_bytes_per_s"] > 0
    per = probe["host_cpu_s_per_byte"]  # what a byte of checkpoint costs: each part measured, the kernel's too
    assert set(per) == {"copy", "hash", "transfer", "kernel"} and per["transfer"] > 0
    # and a whole checkpoint's CPU, taken once the optimizer has its state: the shard the run's checkpoints have
    whole = probe["checkpoint_cpu"]
    shard = {json.loads(f.read_text())["shard_bytes"] for f in base.glob("timings-rank-*.json")}
    assert whole["cpu_s"] > 0 and whole["copies"] == 1 and shard == {whole["shard_bytes"]}
    # every file the runtime wrote is what its schema (gemini_sim/schema/) says
    plan_mod.check_format(probe, "gemini-sim-probe", "probe.json")
    for f in per_rank:
        plan_mod.check_format(json.loads(f.read_text()), "gemini-sim-profile", f.name)
    for f in [*base.glob("timings-rank-*.json"), *(run_dir / "rotation").glob("timings-rank-*.json")]:
        plan_mod.check_format(json.loads(f.read_text()), "gemini-sim-timings", f.name)
    # state on the CPU: each checkpoint is copied whole before its first chunk is sent (the copy, not sharing the
    # host's cores with the sends, is in memory sooner: bench/results.md, peers)
    cks = [c for f in (run_dir / "rotation").glob("timings-rank-*.json") for c in json.loads(f.read_text())[
        "checkpoints"]]
    assert cks and all(c["chunks"] for c in cks)
    assert all(min(posted for _, posted, _ in c["chunks"]) >= c["copied_s"] - 1e-3 for c in cks)  # from the release
    # when each chunk from the peer landed: every one of its chunks (shards of one size), oldest first
    assert all([k for k, _ in c["arrived"]] == [k for k, _, _ in c["chunks"]] for c in cks)
    assert all(all(a <= b for (_, a), (_, b) in zip(c["arrived"], c["arrived"][1:])) for c in cks)


def test_the_hosts_busy_cpu_counts_every_thread():
    """host_busy_s, which the probe's kernel share rests on: two threads checksumming (the GIL let go) until this
    process has spent a CPU-second keep the host busy at least as long (clock ticks: 10 ms per CPU). Counted in
    CPU, not wall time: beside other tests on two cores a second of wall time may get far less."""
    from runtime.profiler import host_busy_s
    from runtime.state import checksum

    data = memoryview(bytearray(64 << 20))
    b0, c0 = host_busy_s(), time.process_time()
    deadline = time.perf_counter() + 30

    def spin():
        while time.process_time() - c0 < 1.0 and time.perf_counter() < deadline:
            checksum(data)

    t = threading.Thread(target=spin)
    t.start()
    spin()
    t.join()
    busy, mine = host_busy_s() - b0, time.process_time() - c0
    assert busy >= 0.9 * mine - 0.05 and mine >= 1.0  # the host saw at least what this process spent


@needs_fsdp
def test_plans_come_from_the_profile(run_dir):
    g = plan_mod.read(run_dir / "gemini" / "plan.json")
    assert g["schedule"]["name"] == "gemini" and g["schedule"]["spans"]
    assert g["schedule"]["chunk_bytes"] == 2 ** 16
    b = plan_mod.read(run_dir / "blocking" / "plan.json")
    assert b["schedule"]["rule"] == "after-update" and "spans" not in b["schedule"]
    for s in ("blocking", "gemini"):  # the simulator's full result is kept beside its plan
        sim = json.loads((run_dir / s / "interleave.json").read_text())
        assert sim["schedule"] == s and sim["machines"] == 4
        assert sim["iteration_time_s"] >= sim["baseline_iteration_time_s"] > 0


@needs_fsdp
def test_schedules_take_turns_and_checkpoint_without_changing_training(run_dir):
    d = run_dir / "rotation"
    turns = ["none", "blocking", "gemini"]
    for r in range(4):
        assert filecmp.cmp(run_dir / "baseline" / f"final-rank-{r:05d}.bin", d / f"final-rank-{r:05d}.bin",
                           shallow=False), f"rank {r} trained differently while checkpointing"
        t = json.loads((d / f"timings-rank-{r:05d}.json").read_text())
        its = t["iterations"]
        assert [i["schedule"] for i in its] == [turns[(i - 1) // BLOCK % 3] for i in range(1, ITERS + 1)]
        assert [i["block_pos"] for i in its] == [(i - 1) % BLOCK for i in range(1, ITERS + 1)]
        cks = t["checkpoints"]
        assert all(c["bytes"] == t["shard_bytes"] and c["peers"] == 1 and c["complete_s"] > 0 for c in cks)
        # blocking checkpoints its own iterations (3, 4, 9, 10); gemini sends iteration i during i + 1, so within
        # its blocks (5-6, 11-12) only 5 and 11 (a block's last checkpoint is dropped when the turn ends), and the
        # last iteration's when the job closes
        blocking = [c for c in cks if c["schedule"] == "blocking"]
        gemini = [c for c in cks if c["schedule"] == "gemini"]
        assert [c["iteration"] for c in blocking] == [3, 4, 9, 10]
        assert all(c["released_in"] == c["iteration"] for c in blocking)
        assert [c["iteration"] for c in gemini] == [5, 11, 12]
        assert all(c["released_in"] == c["iteration"] + 1 for c in gemini)
        assert [c.get("at_close", False) for c in gemini] == [False, False, True]


@needs_fsdp
def test_validate_compares_every_schedule(run_dir):
    res = json.loads((run_dir / "validate.json").read_text())
    assert res["measured_in"] == "rotation"
    rows = {r["schedule"]: r for r in res["schedules"]}
    assert set(rows) == {"blocking", "gemini"}
    for r in rows.values():
        for key in ("iteration_s", "checkpoint_complete_s"):
            assert r[key]["measured"] > 0 and r[key]["predicted"] > 0
            assert r[key]["rel_error"] == pytest.approx((r[key]["predicted"] - r[key]["measured"])
                                                        / r[key]["measured"])
    assert rows["blocking"]["overhead_pct"]["predicted"] > 0  # training waits for the whole checkpoint
    # the optimizer's pick from the measured set-up, among the schedules measured, against the cheapest measured
    c = res["choice"]
    assert {c["chosen"], c["measured_best"]} <= set(rows)
    assert c["measured_best_overhead_pct"] == min(r["overhead_pct"]["measured"] for r in rows.values())
    assert c["gap_points"] == pytest.approx(rows[c["chosen"]]["overhead_pct"]["measured"]
                                            - c["measured_best_overhead_pct"])
    predicted = {s: r["overhead_pct"]["predicted"] for s, r in rows.items()}
    if abs(predicted["blocking"] - predicted["gemini"]) > 1:  # the replay's waste follows the overhead here
        assert c["chosen"] == min(predicted, key=predicted.get)


@needs_fsdp
def test_training_and_checkpoint_traffic_run_on_their_own_cores(run_dir):
    """--accel-cores 1 pins training's thread to one core (the emulated accelerator) and every other thread, the
    checkpoint's among them, to the other cores (the host); a single-core machine pins nothing."""
    everything = sorted(os.sched_getaffinity(0))
    compute, host = calibrate.split_cores(ACCEL)
    assert (compute, host) == (([], []) if ACCEL == 0 else (everything[:1], everything[1:]))
    assert calibrate.split_cores(0) == ([], [])
    if len(everything) > 1:
        assert calibrate.split_cores(None) == (everything[:len(everything) // 2], everything[len(everything) // 2:])
    for r in range(4):
        t = json.loads((run_dir / "rotation" / f"timings-rank-{r:05d}.json").read_text())
        assert t["cores"] == (compute or everything)
        assert t["checkpoints"] and all(c["cores"] == (host or everything) for c in t["checkpoints"])
        # the CPU time of every iteration is logged (all threads of the rank)
        assert all(0 < i["cpu_s"] for i in t["iterations"])
    setup = (run_dir / "setup.txt").read_text()
    assert f"compute_cores={','.join(map(str, compute)) or 'all'}" in setup
    assert f"accel_ms={ACCEL_MS:g}" in setup


def _train_step(accel_ms: float):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, layers=3, seq=16, accel_ms=accel_ms)
    model = TinyGPT(cfg)
    x, y = batch(cfg, 0, 1, 0)
    t0, c0 = time.perf_counter(), time.process_time()
    out = model(x)
    t1 = time.perf_counter()
    torch.nn.functional.cross_entropy(out.reshape(-1, cfg.vocab), y.reshape(-1)).backward()
    t2 = time.perf_counter()
    grads = [p.grad.clone() for p in model.parameters()]
    return out.detach(), grads, t1 - t0, t2 - t1, time.process_time() - c0


def test_emulated_accelerator_waits_without_the_cpu_and_computes_the_same():
    """--accel-ms: every block's forward takes MS more and its backward 2 x MS, spent waiting (the CPU is free, as
    when a GPU computes); outputs and gradients are bitwise those of the model without it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker runs (idle intra-op threads would spin and count as CPU)
    try:
        _train_step(0.0)  # warm-up: torch's first calls cost extra CPU
        out0, g0, *_, cpu0 = _train_step(0.0)
        out1, g1, fwd, bwd, cpu1 = _train_step(30.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out0, out1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert fwd >= 3 * 0.030 and bwd >= 3 * 0.060
    assert cpu1 < cpu0 + 0.5 * 3 * 0.090  # the 0.27 s of waits did not burn CPU


def test_calibrate_refuses_bad_core_counts(capsys):
    n = len(os.sched_getaffinity(0))
    assert calibrate.main(["/nonexistent/never", "--accel-cores", str(n)]) == 2
    assert "--accel-cores must be between 0 and" in capsys.readouterr().err


def test_runtime_refuses_a_schedule_it_does_not_run(tmp_path):
    p = default_plan(tmp_path / "plan.json", 2, 1)
    d = plan_mod.read(p)
    d["schedule"]["name"] = "priority"
    plan_mod.write(d, p)
    with pytest.raises(PlanError, match="not run by the runtime.*network priorities"):
        Job(p, tmp_path / "job", ["train.py"])


@needs_fsdp
@pytest.mark.skipif(netns.available() is not None, reason=f"network namespaces: {netns.available()}")
def test_network_namespaces_limit_the_bandwidth(tmp_path):
    """Two machines in namespaces with 80 Mbit/s links: the runtime's probe measures about that, and training
    across the limited links gives the same parameters as on localhost."""
    tag = 1  # beside the namespaces of make calibrate / make netns-up (tag 0)
    netns.up(2, 80, tag=tag)
    try:
        assert netns.current(tag) == {"machines": 2, "mbit": 80, "host": "10.78.1.254", "tag": tag}
        plan = default_plan(tmp_path / "plan.json", 2, 1)
        outs = {}
        for name, use in (("ns", True), ("lo", False)):
            job = Job(plan, tmp_path / name, [str(calibrate.TRAIN), "--iters", "3", "--probe", "--deterministic"],
                      netns=tag if use else False)
            try:
                res = job.run(timeout=240)
            finally:
                job.cleanup()
            assert res.ok, res.logs
            outs[name] = res.out_dir
        rate = json.loads((outs["ns"] / "probe.json").read_text())["network_bytes_per_s"] * 8 / 1e6
        assert 60 < rate < 84, f"measured {rate:.0f} Mbit/s through an 80 Mbit/s link"
        lo = json.loads((outs["lo"] / "probe.json").read_text())["network_bytes_per_s"] * 8 / 1e6
        assert lo > 3 * rate  # localhost is not limited
        for r in range(2):
            assert filecmp.cmp(outs["ns"] / f"final-rank-{r:05d}.bin", outs["lo"] / f"final-rank-{r:05d}.bin",
                               shallow=False)
    finally:
        netns.down(tag)
    assert netns.current(tag) is None


@pytest.mark.skipif(netns.available() is not None, reason=f"network namespaces: {netns.available()}")
def test_namespaces_come_back_right_after_down_and_a_failed_set_up_is_one_line(tmp_path, capsys, monkeypatch):
    """An up() right after down() works (down frees the NIC names itself), and a set-up that fails leaves nothing
    behind and stops calibrate with a one-line error, exit code 2."""
    tag = 2
    for _ in range(2):
        netns.up(2, 80, tag=tag)
        netns.down(tag)
    assert netns.current(tag) is None

    def fail(*a, **k):
        raise RuntimeError("ip link add: File exists")

    monkeypatch.setattr(netns, "up", fail)
    assert calibrate.main([str(tmp_path / "out"), "--net", "netns"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: cannot set up the network namespaces: ip link add: File exists"
    assert netns.current(0) is None


@pytest.mark.skipif(netns.available() is not None, reason=f"network namespaces: {netns.available()}")
def test_namespaces_are_unavailable_where_tc_cannot_limit_a_link(tmp_path, monkeypatch):
    """A host (a sandbox, say) that makes namespaces but where tc fails is no place for the limited links: available()
    says why in one line, and its probe namespace is gone."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "tc").write_text("#!/bin/sh\necho 'RTNETLINK answers: Operation not supported' >&2\nexit 2\n")
    (fake / "tc").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert netns.available() == "cannot limit a link's bandwidth with tc: RTNETLINK answers: Operation not supported"
    after = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert not {n for n in after - before if n.startswith("gemini-probe")}


def test_the_model_builds_its_tensors_on_the_tokens_device():
    """Every tensor the forward pass makes (the causal mask, the positions) lives where the tokens do: on a GPU a CPU
    one would fail. The meta device stands in for the GPU here: it refuses CPU tensors the same way."""
    cfg = ModelConfig(dim=16, layers=1, seq=8)
    model = TinyGPT(cfg).to("meta")
    out = model(torch.zeros(2, 8, dtype=torch.long, device="meta"))
    assert out.shape == (2, 8, cfg.vocab) and out.device.type == "meta"
