"""Does the simulator predict the runtime? Measured set-up in, predictions and relative errors out.

A **run directory** (what ``make calibrate`` / ``python examples/tinygpt/calibrate.py`` writes)::

    RUN_DIR/baseline/            the runtime without checkpoints: the set-up's measurements
        profile.json             its timeline (gemini-sim profile format, see workload.py)
        probe.json               {"network_bytes_per_s", "copy_bytes_per_s", ...}: measured point-to-point
                                 bandwidth between two machines and memory-copy rate of one rank
        timings-rank-*.json      per rank: shard_bytes (its checkpoint), params (the model's), "iterations":
                                 [{"iteration", "iteration_s", "cpu_s" (optional: the rank's process CPU time in
                                 the iteration), ...}]
    RUN_DIR/<schedule>/          one per schedule (blocking, naive, gemini)
        plan.json                its plan (made by ``gemini-sim interleave --setup ... --export-plan``)
        timings-rank-*.json      a run of that plan alone (optional when rotation/ exists): as above, plus
                                 "checkpoints": [{"iteration", "complete_s", ...}]
    RUN_DIR/rotation/            optional: one run that takes the schedules in turn, in blocks of iterations
        timings-rank-*.json      iterations and checkpoints labelled with their "schedule" ("none": no checkpoint)
                                 and iterations with their "block_pos"

The simulated set-up (:func:`setup_preset`): the run's machines and processes, each NIC at the measured
point-to-point bandwidth, the copy to CPU memory at the measured copy rate (on a GPU: the measured GPU <-> CPU rates
and compute's slowdown beside a copy, :func:`host_path`), checkpoint bytes per machine as the runtime reported them.
The timeline is the profile's typical iteration, with each collective's effective bytes fitted to its
measured duration (``from_profile(link_bytes_per_s=...)``): the baseline iteration is thus calibrated, and what the
comparison tests is the prediction of what checkpoint traffic does to it.

Measured values are medians over the steady iterations (the first ``warmup`` are dropped): the iteration time
(mean across ranks per iteration) and the checkpoint completion time (the last rank's, from the start of the
iteration its traffic ran in; with ``data_s`` in the records, when the last byte arrived, as the simulator counts
it: the hashing and file writes that commit a copy come after and are the runtime's own). With a rotation run,
every schedule and the baseline ("none") come from it, side by side, so that a noisy host (a shared 2-core VM
varies by 10% from run to run) slows them alike; the first iteration of each block is left out, and the measured
overhead is the mean over rounds of each round's paired overhead (:func:`paired_overheads`), printed with the
half-width of its 95% confidence interval and the rounds' standard deviation (``9.1% ±2.3 sd 3.1``): the host
drifts within a run too. The fidelity target (:func:`overhead_agrees`) is a prediction within 10% of the measured
overhead, or within the rounds' standard deviation (the run-to-run spread) where that is wider. The extra CPU per
iteration and rank (``CPU +/iter/rank``) is the median process CPU time of an iteration (every thread: training,
gloo's, the checkpoint's) minus the baseline's: what checkpointing costs the host (the host cost model predicts
it per checkpoint from the probe, :func:`host_cost`, shown per iteration beside it; ``ckpt threads CPU`` is the
runtime's own threads' part of it, as the checkpoint records give it). ``train thread`` is the median time per
iteration the training thread itself spent capturing the state and starting checkpoints (the records'
``checkpoint_s``; waiting for one is the stall): on the critical path whatever the cores, and not in the
prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from statistics import median, stdev

from gemini_sim.cluster.config import Preset, preset_from_dict
from gemini_sim.errors import UserError
from gemini_sim.files import load_json
from gemini_sim.plan import check_format
from gemini_sim.cluster.workload import Timeline, from_profile, load_profile

SCHEDULE_DIRS = ("blocking", "naive", "gemini", "priority")


def _timings(d: Path) -> list[dict]:
    files = sorted(d.glob("timings-rank-*.json"))
    if not files:
        raise UserError(f"{d}: no timings-rank-*.json (did the runtime run finish?)")
    return [check_format(load_json(f, "runtime timings"), "gemini-sim-timings", str(f)) for f in files]


def _probe(d: Path) -> dict:
    return check_format(load_json(d / "probe.json", "probe"), "gemini-sim-probe", str(d / "probe.json"))


def setup_preset(setup_dir, replicas: int = 2) -> tuple[Preset, Timeline, dict]:
    """The simulator's view of a measured set-up (a runtime run directory with profile.json and probe.json)."""
    d = Path(setup_dir)
    for name in ("profile.json", "probe.json"):
        if not (d / name).is_file():
            raise UserError(f"{d}: missing {name}; run the runtime with --probe (make calibrate does)")
    profile = load_profile(d / "profile.json")
    probe = _probe(d)
    ranks = _timings(d)
    n, ppm = profile["machines"], profile.get("processes_per_machine", 1)
    if len(ranks) != n * ppm:
        raise UserError(f"{d}: {len(ranks)} timings files for {n} x {ppm} ranks")
    net = float(probe["network_bytes_per_s"])
    shard = sum(r["shard_bytes"] for r in ranks)
    params = ranks[0]["params"]  # the model's parameter count (every rank reports it)
    preset = preset_from_dict({
        "name": f"runtime set-up ({d})",
        "cluster": {"machines": n, "gpus_per_machine": ppm, "gpu_memory_gb": 1.0, "gpu_peak_tflops": 1.0,
                    "cpu_memory_gb": 1e3, "network_gbps": net * 8 / 1e9, **host_path(probe, ppm)},
        "model": {"name": "runtime TinyGPT", "parameters": float(params), "layers": 1, "hidden": 1, "seq_len": 1,
                  "global_batch_tokens": 1.0, "mfu": 0.5, "bytes_per_param": shard / params},
        "storage": {"remote_gbps": 1.0},
        "recovery": {"replicas": replicas},
    }, str(d))
    return preset, from_profile(profile, link_bytes_per_s=net), profile


def host_path(probe: dict, ppm: int) -> dict:
    """The ``[cluster]`` keys of a measured set-up's copy path, per machine of ``ppm`` ranks. On a GPU (the probe
    has ``d2h_bytes_per_s``): each rank's copies at its device's measured GPU <-> CPU rates, shared by the ranks on
    one device (``ranks_per_device``: several emulated machines on one GPU split its PCIe link), and compute's
    measured slowdown beside a copy. On CPU ranks: the copy to CPU memory at the measured memory-copy rate."""
    gbit = 8 / 1e9
    if "d2h_bytes_per_s" not in probe:
        return {"gpu": "cpu-rank", "pcie_gbps": ppm * float(probe["copy_bytes_per_s"]) * gbit}
    share = ppm / probe.get("ranks_per_device", 1)
    return {"gpu": probe.get("device") or "gpu", "pcie_gbps": share * probe["d2h_bytes_per_s"] * gbit,
            "h2d_gbps": share * probe["h2d_bytes_per_s"] * gbit,
            "copy_slowdown": float(probe.get("copy_compute_slowdown", 0.0))}


def host_cost(setup_dir, replicas: int) -> tuple[float | None, bool]:
    """The host cost model's inputs for a measured set-up: (the CPU seconds one checkpoint costs a rank, whether
    the checkpoint's threads share cores with training's). Where the probe took whole checkpoints
    (``checkpoint_cpu``: the process's CPU per checkpoint, every thread and the runtime's bookkeeping included), that,
    scaled to the shard, plus or minus a shard's moved bytes per copy more or fewer than it sent. Else the sum of its
    parts: the shard copied and hashed once, and m-1 shards' worth of bytes moved, at the probe's CPU cost per byte of
    each; a byte moved costs its sender and its receiver (``transfer``, or an older probe's ``send`` + ``recv``), and a
    rank sends m-1 shards while m-1 peers' shards come to its machine, so its end of every transfer adds up to that.
    Either way the kernel at both ends (``kernel``, per byte moved; absent in older probes), which no process is charged
    for. The parts fell short: 15.8 ms predicted against 25-34 ms of CPU a checkpoint added to every iteration of the
    rank measured (make calibrate, TinyGPT, 19.8 MB a shard). None for a probe without those figures."""
    d = Path(setup_dir)
    probe = _probe(d)
    per = probe.get("host_cpu_s_per_byte")
    if not per:
        return None, False
    shard = median(r["shard_bytes"] for r in _timings(d))  # one rank's
    moved = per["transfer"] if "transfer" in per else per["send"] + per["recv"]  # the latter: an older probe's
    kernel = shard * (replicas - 1) * per.get("kernel", 0.0)
    whole = probe.get("checkpoint_cpu")
    if whole:  # a whole checkpoint measured: its CPU, scaled to this shard, and moved bytes for more or fewer copies
        cpu = whole["cpu_s"] * shard / whole["shard_bytes"] + (replicas - 1 - whole["copies"]) * shard * moved
    else:
        cpu = shard * (per["copy"] + per["hash"]) + shard * (replicas - 1) * moved
    return max(0.0, cpu) + kernel, bool(probe.get("checkpoint_shares_training_cores", True))


def host_cpu_s(setup_dir, replicas: int) -> float:
    """InterleaveConfig.host_cpu_s for a measured set-up: the checkpoint's CPU where it shares training's cores."""
    cpu, shared = host_cost(setup_dir, replicas)
    return cpu if shared else 0.0  # shared is False without the probe figures


@dataclass(frozen=True)
class Measured:
    schedule: str
    iteration_s: float
    checkpoint_complete_s: float | None
    iterations: int
    checkpoints: int
    checkpoint_cpu_s: float | None = None  # CPU seconds a checkpoint costs one rank (median; runtime's own cost)
    iteration_cpu_s: float | None = None  # CPU seconds of a whole rank per iteration, all its threads (median)
    thread_s: float | None = None  # seconds per iteration the training thread spent capturing and starting checkpoints


def measured(run_dir, warmup: int = 3, schedule: str | None = None, ranks: list[dict] | None = None) -> Measured:
    """Medians of a run. ``schedule``: only the iterations and checkpoints of that schedule in a rotation run
    (``"none"``: the iterations without checkpoints), leaving out the first iteration of every block, which also
    waits for the previous block's checkpoint. ``ranks``: the run's timings when already read."""
    d = Path(run_dir)
    ranks = ranks if ranks is not None else _timings(d)
    per_it: dict[int, list[float]] = {}
    extra: dict[str, dict[int, list[float]]] = {"cpu_s": {}, "checkpoint_s": {}}  # per iteration, where recorded
    for r in ranks:
        for rec in r["iterations"]:
            if rec["iteration"] <= warmup:
                continue
            if schedule is not None and (rec.get("schedule") != schedule or rec.get("block_pos") == 0):
                continue
            per_it.setdefault(rec["iteration"], []).append(rec["iteration_s"])
            for key, values in extra.items():
                if key in rec:
                    values.setdefault(rec["iteration"], []).append(rec[key])
    steady = sorted(i for i, v in per_it.items() if len(v) == len(ranks))
    if not steady:
        raise UserError(f"{d}: no steady iterations measured" + (f" for schedule {schedule}" if schedule else ""))
    it_s = median(sum(per_it[i]) / len(per_it[i]) for i in steady)
    per_ck: dict[int, list[float]] = {}
    cpu: list[float] = []
    for r in ranks:
        for rec in r.get("checkpoints", []):
            if rec.get("at_close"):  # taken when training had ended: not a checkpoint beside training
                continue
            if schedule is None or rec.get("schedule") == schedule:
                per_ck.setdefault(rec["iteration"], []).append(rec.get("data_s", rec["complete_s"]))
                if "cpu_s" in rec and rec["iteration"] > warmup:
                    cpu.append(rec["cpu_s"])
    cks = [max(v) for k, v in sorted(per_ck.items()) if k > warmup and len(v) == len(ranks)]
    name = schedule or (ranks[0].get("schedule", d.name) if ranks[0].get("checkpointing", True) else "none")
    per_rank = {key: [sum(v[i]) / len(v[i]) for i in steady if len(v.get(i, ())) == len(ranks)]
                for key, v in extra.items()}  # the ranks' mean in every steady iteration that all recorded
    cpu_it, thread = per_rank["cpu_s"], per_rank["checkpoint_s"]
    return Measured(name, it_s, median(cks) if cks else None, len(steady), len(cks), median(cpu) if cpu else None,
                    median(cpu_it) if cpu_it else None, median(thread) if thread else None)


def paired_overheads(run_dir, warmup: int = 3, ranks: list[dict] | None = None) -> dict[str, list[float]]:
    """Per schedule of a rotation run, its overhead (%) in each round: the mean iteration time of its turn over the
    mean of that round's "none" turn, minus 1 (the first iteration of a turn left out). A round begins with each
    "none" turn; rounds where a schedule has no steady iteration are skipped. Pairing turns within a round cancels
    the host's drift from one minute to the next. ``ranks``: the run's timings when already read."""
    ranks = ranks if ranks is not None else _timings(Path(run_dir))
    per_round: dict[int, dict[str, list[float]]] = {}
    rnd = -1
    for idx, rec in enumerate(ranks[0]["iterations"]):
        if rec.get("block_pos") is None:
            return {}
        if rec["block_pos"] == 0 and rec.get("schedule") == "none":
            rnd += 1
        if rec["iteration"] <= warmup or rec["block_pos"] == 0 or rnd < 0:
            continue
        its = [r["iterations"][idx] for r in ranks if idx < len(r["iterations"])]
        if len(its) != len(ranks) or any(i["iteration"] != rec["iteration"] for i in its):
            continue
        per_round.setdefault(rnd, {}).setdefault(rec["schedule"], []).append(
            sum(i["iteration_s"] for i in its) / len(its))
    out: dict[str, list[float]] = {}
    for turns in per_round.values():
        if "none" not in turns:
            continue
        base = sum(turns["none"]) / len(turns["none"])
        for name, v in turns.items():
            if name != "none":
                out.setdefault(name, []).append(100 * (sum(v) / len(v) / base - 1))
    return out


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float | None]:
    """Mean and the half-width of its ``level`` confidence interval (Student's t; None for fewer than 2 values)."""
    from scipy import stats

    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, None
    return m, float(stats.t.ppf((1 + level) / 2, n - 1)) * spread(values) / n ** 0.5


def spread(values: list[float]) -> float | None:
    """The sample standard deviation of ``values`` (None for fewer than 2): how much one paired round of a schedule
    differs from the next, the run-to-run spread the fidelity target allows for."""
    return stdev(values) if len(values) >= 2 else None


def overhead_agrees(ov: dict) -> bool:
    """The fidelity target for an overhead (``compare``'s ``overhead_pct``): the prediction within 10% of the
    measured overhead, or within its run-to-run spread (the rounds' standard deviation) where that is wider."""
    allowed = max(0.1 * abs(ov["measured"]), ov.get("sd") or 0.0)
    return abs(ov["predicted"] - ov["measured"]) <= allowed


def _rel(pred: float | None, meas: float | None) -> float | None:
    if pred is None or meas is None or meas == 0:
        return None
    return (pred - meas) / meas


def compare(run_dir, warmup: int = 3) -> dict:
    """Predicted vs measured for every schedule run in ``run_dir``."""
    from gemini_sim import interleave, plan as plan_mod

    d = Path(run_dir)
    if not (d / "baseline").is_dir():
        raise UserError(f"{d}: not a calibration run directory (no baseline/); see gemini_sim/calibration.py")
    rotation = d / "rotation"
    baseline_run = measured(d / "baseline", warmup)
    # with a rotation, every schedule side by side in one job: the fair comparison on a noisy host
    rot = _timings(rotation) if rotation.is_dir() else None  # read once: every schedule is measured from it
    base = measured(rotation, warmup, "none", rot) if rot else baseline_run
    preset, timeline, profile = setup_preset(d / "baseline")  # each plan's replicas go in its InterleaveConfig
    paired = paired_overheads(rotation, warmup, rot) if rot else {}
    rows, sims, plans = [], [], {}
    for name in SCHEDULE_DIRS:
        sd = d / name
        if not (sd / "plan.json").is_file():
            continue
        plan = plans[name] = plan_mod.read(sd / "plan.json")
        cpu, shared = host_cost(d / "baseline", plan["placement"]["replicas"])
        cfg = interleave.InterleaveConfig(schedule=plan["schedule"]["name"], replicas=plan["placement"]["replicas"],
                                          buffer_bytes=plan["schedule"]["buffer_bytes"],
                                          interval=plan["checkpoint"]["interval_iters"],
                                          span_fill=plan["schedule"].get("span_fill", 1.0),
                                          host_cpu_s=cpu if shared else 0.0)
        sim = interleave.simulate(preset, cfg, timeline, find_interval=False)
        sims.append(sim)
        m = measured(rotation, warmup, name, rot) if rot else measured(sd, warmup)
        meas_over, ci = 100 * (m.iteration_s / base.iteration_s - 1), None
        if len(paired.get(name, ())) >= 2:  # rounds of a rotation: paired within each round, with its spread
            meas_over, ci = mean_ci(paired[name])
        rows.append({
            "schedule": name, "interval_iters": cfg.interval,
            "iteration_s": {"measured": m.iteration_s, "predicted": sim.iteration_time_s,
                            "rel_error": _rel(sim.iteration_time_s, m.iteration_s)},
            "checkpoint_complete_s": {"measured": m.checkpoint_complete_s, "predicted": sim.checkpoint_complete_s,
                                      "rel_error": _rel(sim.checkpoint_complete_s, m.checkpoint_complete_s)},
            "overhead_pct": {"measured": meas_over, "predicted": sim.overhead_pct,
                             "error_points": sim.overhead_pct - meas_over, "ci95": ci,
                             "sd": spread(paired.get(name, [])), "rounds": paired.get(name, [])},
            "iterations": m.iterations, "checkpoints": m.checkpoints, "checkpoint_cpu_s": m.checkpoint_cpu_s,
            "checkpoint_cpu_s_predicted": cpu, "train_thread_s": m.thread_s,
            "extra_cpu_s": None if m.iteration_cpu_s is None or base.iteration_cpu_s is None
            else m.iteration_cpu_s - base.iteration_cpu_s,
        })
    if not rows:
        raise UserError(f"{d}: no schedule runs (blocking/, naive/, gemini/ with plan.json)")
    plain = interleave.simulate(preset, interleave.InterleaveConfig(schedule="naive"),
                                from_profile(profile), find_interval=False)  # logical bytes on ideal rings
    fitted = sims[0].baseline_iteration_time_s  # the same for every schedule: no checkpoint
    probe = _probe(d / "baseline")
    return {
        "run_dir": str(d), "machines": preset.cluster.machines,
        "processes_per_machine": preset.cluster.gpus_per_machine,
        "network_mbit_s": probe["network_bytes_per_s"] * 8 / 1e6,
        "checkpoint_mb_per_machine": preset.checkpoint_bytes_per_machine / 1e6,
        "baseline": {"measured": base.iteration_s, "predicted": fitted, "rel_error": _rel(fitted, base.iteration_s),
                     "predicted_unfitted": plain.baseline_iteration_time_s,
                     "rel_error_unfitted": _rel(plain.baseline_iteration_time_s, base.iteration_s)},
        "schedules": rows, "measured_in": "rotation" if rot else "separate runs",
        "choice": optimizer_choice(d / "baseline", preset, timeline, plans, rows),
        "baseline_run_iteration_s": baseline_run.iteration_s,
    }


def optimizer_choice(setup_dir, preset: Preset, timeline: Timeline, plans: dict, rows: list[dict]) -> dict:
    """The schedule ``gemini-sim plan --setup`` picks for this set-up among those measured (their replicas,
    placement, staging buffer and span fill; a checkpoint every iteration; failures at Llama 3's rate, synthetic),
    against the one measured cheapest (the lowest measured overhead), and how far apart they are as measured."""
    from gemini_sim import optimize
    from gemini_sim.failures import synthetic

    first = next(iter(plans.values()))
    m, strategy = first["placement"]["replicas"], first["placement"]["strategy"]
    fill = plans["gemini"]["schedule"].get("span_fill") if "gemini" in plans else None
    trace = synthetic.for_cluster("poisson", preset.cluster.machines, preset.cluster.machines_per_rack)
    res = optimize.optimize(preset.with_replicas(m), trace, 100.0, schedules=list(plans), placements=[strategy],
                            replicas=[m], timeline=timeline, buffer_bytes=first["schedule"]["buffer_bytes"],
                            max_interval=1, host_cpu_s=lambda r: host_cpu_s(setup_dir, r), span_fill=fill)
    measured_of = {r["schedule"]: r["overhead_pct"]["measured"] for r in rows}
    best = min(measured_of, key=measured_of.get)
    chosen = res.best.schedule
    return {"chosen": chosen, "chosen_predicted_overhead_pct": res.best.overhead_pct,
            "chosen_measured_overhead_pct": measured_of[chosen], "measured_best": best,
            "measured_best_overhead_pct": measured_of[best], "gap_points": measured_of[chosen] - measured_of[best],
            "trace": trace.name}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _per_iteration(cpu: float | None, row: dict) -> float | None:
    """A checkpoint's CPU spread over its interval's iterations."""
    return None if cpu is None else cpu / row.get("interval_iters", 1)


def table(result: dict) -> tuple[list[str], list[list]]:
    headers = ["schedule", "iter meas (s)", "iter pred (s)", "error", "ckpt done meas (s)", "ckpt done pred (s)",
               "error", "overhead meas", "overhead pred", "CPU +/iter/rank meas/pred (s)", "ckpt threads CPU (s)",
               "train thread (s)"]
    rows = []
    for r in result["schedules"]:
        it, ck, ov = r["iteration_s"], r["checkpoint_complete_s"], r["overhead_pct"]
        rows.append([r["schedule"], _s(it["measured"]), _s(it["predicted"]), _pct(it["rel_error"]),
                     _s(ck["measured"]), _s(ck["predicted"]), _pct(ck["rel_error"]),
                     f"{ov['measured']:.1f}%" + (f" ±{ov['ci95']:.1f}" if ov.get("ci95") is not None else "")
                     + (f" sd {ov['sd']:.1f}" if ov.get("sd") is not None else ""),
                     f"{ov['predicted']:.1f}%",
                     f"{_s(r.get('extra_cpu_s'))} / {_s(_per_iteration(r.get('checkpoint_cpu_s_predicted'), r))}",
                     _s(r.get("checkpoint_cpu_s")),
                     _s(r.get("train_thread_s"))])
    return headers, rows
