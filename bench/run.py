"""Benchmarks: performance targets live here, never in timed unit tests. Writes a Markdown table.

Usage: python bench/run.py [--out bench/results.md] [--only NAME] [--calibration-dir out/calibrate]
Each benchmark returns rows (what, measured, target, verdict); timings are the best of a few repeats on this
machine, taken in one run so that ratios are comparable.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from gemini_sim.files import write_atomic


def best_of(fn, repeats=3):
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def bench_replay_year():
    from gemini_sim.cluster import config
    from gemini_sim.replay import policies as strategies
    from gemini_sim.replay.engine import replay
    from gemini_sim.failures.synthetic import SyntheticSpec, generate

    llama = config.load_preset("llama3-405b")
    trace = generate(SyntheticSpec("poisson", mtbf_hours=54 * 24 / 419 * 2048, days=365, machines=2048, seed=0))
    names = list(strategies.STRATEGIES)
    secs, results = best_of(lambda: [replay(trace, llama, s) for s in names])
    events = sum(r.sim_events for r in results)
    iters = trace.duration_h * 3600 / llama.iteration_time_s
    return [(f"replay 1-year synthetic trace, llama3-405b, {len(names)} strategies "
             f"({len(trace.events)} failures each, {iters:,.0f} iterations, {events:,} SimPy events, "
             f"{events / secs:,.0f} events/s)", f"{secs:.3f} s", "< 2 s", "pass" if secs < 2 else "FAIL")]


def bench_placement_exact():
    from gemini_sim.placement import layouts as placement, survival as recovery

    def run():
        recovery.ring_safe.cache_clear()  # cold: no counts carried over between repeats
        for m in (2, 3, 4):
            p = placement.mixed(4096, m)
            for k in range(1, 65):
                assert recovery.probability(p, k).method == "exact"
    secs, _ = best_of(run)
    return [("exact recovery probability, mixed placement, N=4096, m=2..4, k=1..64 (192 values)",
             f"{secs * 1000:.1f} ms", "< 100 ms", "pass" if secs < 0.1 else "FAIL")]


def bench_interleave():
    import dataclasses

    from gemini_sim.cluster import config
    from gemini_sim import interleave

    paper = config.load_preset("gemini-paper")
    rows = []
    slice_default = interleave.model.SLICE
    for machines, target, full in ((16, 1.0, True), (128, 10.0, True), (128, None, False)):
        preset = dataclasses.replace(paper, cluster=dataclasses.replace(paper.cluster, machines=machines))
        interleave.model.SLICE = 10 ** 9 if full else slice_default  # full: every machine's flows simulated
        try:
            secs, res = best_of(lambda: interleave.simulate(preset, interleave.InterleaveConfig(schedule="gemini"),
                                                            find_interval=False), repeats=2)
        finally:
            interleave.model.SLICE = slice_default
        ev = res.sim_events
        how = "all machines simulated" if full else f"symmetric {res.simulated_machines}-machine slice"
        rows.append((f"interleave: one simulated iteration + profile, gemini schedule, {machines} machines, {how} "
                     f"({res.flows:,} flows, {ev:,} rate recomputations, {ev / secs:,.0f}/s)",
                     f"{secs:.2f} s", f"< {target:g} s" if target else "-",
                     ("pass" if secs < target else "FAIL") if target else "info"))
    # Schedule comparison on the paper's preset, side by side in one run.
    for s in interleave.SCHEDULES:
        r = interleave.simulate(paper, interleave.InterleaveConfig(schedule=s))
        rows.append((f"gemini-paper, schedule {s}: overhead {r.overhead_pct:.2f}%, checkpoint {r.checkpoint_time_s:.2f} s, "
                     f"min interval {r.min_interval_iters} iteration(s)", "-", "-", "info"))
    return rows


_SCALE_CASE = """
import dataclasses, json, resource, sys, time
from gemini_sim.cluster import config
from gemini_sim import interleave
n, over, schedule, placement, find, threshold, full, slow_nic = json.loads(sys.argv[1])
if full:
    interleave.model.SLICE = 10 ** 9  # every machine simulated, even where a symmetric slice would do
p = config.load_preset("llama3-405b")
p = dataclasses.replace(p, cluster=dataclasses.replace(p.cluster, machines=n),
                        recovery=dataclasses.replace(p.recovery, placement=placement))
t0 = time.perf_counter()
cfg = interleave.InterleaveConfig(schedule=schedule, oversubscription=over, slow_nic=slow_nic)
r = interleave.simulate(p, cfg, find_interval=find, threshold_pct=threshold)
print(json.dumps({"s": time.perf_counter() - t0, "gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "sim": r.simulated_machines, "flows": r.flows, "k": r.min_interval_iters,
                  "played": r.intervals_played,
                  "overhead": r.overhead_pct, "iteration": r.iteration_time_s, "checkpoint": r.checkpoint_time_s}))
"""


def _scale_case(n, over, schedule="gemini", placement="auto", find=False, threshold=1.0, full=False,
                slow_nic=1.0) -> dict:
    import json
    import subprocess

    out = subprocess.run([sys.executable, "-c", _SCALE_CASE, json.dumps([n, over, schedule, placement, find,
                                                                          threshold, full, slow_nic])],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_scale():
    """The interleaving model from 16 to 2048 machines (the llama3-405b preset resized: 8 GPUs per machine,
    racks of 2), non-blocking and 2:1 oversubscribed spine; each case in its own process, so its peak memory is its
    own (it includes about 0.1 GB of imported libraries). On a non-blocking fabric a 16-machine symmetric slice stands
    for the cluster; the rows with every machine simulated show it gives the same iteration and checkpoint times. With racks of two
    machines and group placement the checkpoint traffic stays inside a rack; random placement sends it across the
    oversubscribed spine."""
    rows, table = [], ["| machines | spine | placement | simulated machines | flows | iteration (s) | "
                       "checkpoint (s) | seconds | peak memory |", "|---|---|---|---|---|---|---|---|---|"]
    for n in (16, 64, 256, 1024, 2048):
        for over, full, placement in ((1.0, False, "auto"), (1.0, True, "auto"), (2.0, False, "auto"),
                                      (2.0, False, "random")):
            if full and n <= 32:
                continue  # no slice below 33 machines: the row above is the full cluster already
            r = _scale_case(n, over, placement=placement, full=full)
            table.append(f"| {n} | {'non-blocking' if over == 1 else f'{over:g}:1 oversubscribed'} | "
                         f"{'group' if placement == 'auto' else placement} | {r['sim']} | "
                         f"{r['flows']:,} | {r['iteration']:.4f} | {r['checkpoint']:.4f} | {r['s']:.2f} | "
                         f"{r['gb']:.2f} GB |")
            if n == 2048 and over > 1 and placement == "auto":
                ok = r["s"] <= 5 and r["gb"] < 1
                rows.append(("interleave at scale: one iteration with checkpoint traffic, gemini schedule, 2048 "
                             "machines, 2:1 oversubscribed spine, every machine simulated",
                             f"{r['s']:.2f} s, {r['gb']:.2f} GB", "<= 5 s, < 1 GB", "pass" if ok else "FAIL"))
    big = dict(n=2048, over=2.0)
    for what, case in (("interval search (gemini, group placement, 1% budget)", dict(find=True)),
                       ("interval search, symmetry broken (naive, random placement, 0.02% budget)",
                        dict(schedule="naive", placement="random", find=True, threshold=0.02)),
                       ("one iteration, symmetry broken (gemini, random placement)", dict(placement="random")),
                       ("one iteration, symmetry broken (gemini, group placement, machine 0's NIC at half speed)",
                        dict(slow_nic=0.5))):
        r = _scale_case(**big, **case)
        played = ", ".join(map(str, r["played"]))
        found = f", min interval {r['k']} (simulated with K = {played} iterations)" if case.get("find") else ""
        rows.append((f"interleave at scale: {what}, 2048 machines, 2:1 oversubscribed{found}",
                     f"{r['s']:.2f} s, {r['gb']:.2f} GB", "<= 60 s", "pass" if r["s"] <= 60 else "FAIL"))
    SECTIONS.append("\n".join(["## Interleaving model: scale", "", " ".join(bench_scale.__doc__.split()), ""]
                               + table))
    return rows


def bench_runtime():
    """The runtime on 4 machines x 1 process (gloo, CPU), a GPT of ~3.3M parameters: checkpoint to memory +
    replication against a fsync'd DCP save to local disk; recovery from a peer's memory against a DCP load; iteration
    time with and without a checkpoint every iteration. Ratios from the same run."""
    import json
    import statistics
    import tempfile
    from pathlib import Path

    from runtime.agent import Job, default_plan

    work = Path(tempfile.mkdtemp(prefix="gemini-bench-"))
    plan = default_plan(work / "plan.json", 4, 1, replicas=2, interval=1, persist=5)
    train = [str(Path(__file__).resolve().parent.parent / "examples" / "tinygpt" / "train.py"), "--iters", "15",
             "--dim", "256", "--layers", "4"]

    def run(name, no_checkpoint=False, **kw):
        job = Job(plan, work / name, train + (["--no-checkpoint"] if no_checkpoint else []), fresh=True, **kw)
        res = job.run(timeout=600)
        job.cleanup()
        if not res.ok:
            raise RuntimeError(f"bench job {name} failed: {res.logs}")
        stats = [json.loads(p.read_text()) for p in sorted(res.out_dir.glob("timings-rank-*.json"))]
        return res, stats

    _, plain = run("no-checkpoint", no_checkpoint=True)
    _, ckpt = run("checkpoint")
    peer, _ = run("peer", faults="lose:1:12")
    storage, _ = run("storage", faults="lose:0:12,lose:1:12")
    mean = lambda rows, k: statistics.mean(r[k] for r in rows if k in r)
    it_plain, it_ckpt = mean(plain, "iteration_s"), mean(ckpt, "iteration_s")
    mem = mean(ckpt, "replicated_s")
    dcp_save = mean(ckpt, "persist_s")
    peer_s = max(e["seconds"] for e in peer.records("recovered") if e["tier"] == "peer")
    dcp_load = max(e["seconds"] for e in storage.records("recovered"))
    params, shard = int(ckpt[0]["params"]), statistics.mean(r["shard_bytes"] for r in ckpt)
    info = f"{params / 1e6:.2f}M params, world 4 (4 machines x 1 process), {shard / 1e6:.1f} MB model+Adam per rank"
    return [
        (f"runtime: checkpoint to CPU memory + replication to 1 peer ({info}, {2 * shard / 1e6:.1f} MB moved per "
         f"rank) vs DCP save to local disk (fsync)", f"{mem * 1000:.1f} ms vs {dcp_save * 1000:.1f} ms "
         f"({dcp_save / mem:.1f}x)", "memory faster", "pass" if mem < dcp_save else "FAIL"),
        ("runtime: recovery from a peer's memory vs DCP load from disk", f"{peer_s * 1000:.0f} ms vs "
         f"{dcp_load * 1000:.0f} ms ({dcp_load / peer_s:.1f}x)", "memory faster", "pass" if peer_s < dcp_load
         else "FAIL"),
        ("runtime: iteration time without / with a checkpoint every iteration", f"{it_plain * 1000:.1f} ms / "
         f"{it_ckpt * 1000:.1f} ms ({100 * (it_ckpt / it_plain - 1):+.1f}%)", "-", "info"),
    ]


CALIBRATION_DIR = None  # --calibration-dir: use that run of make calibrate instead of a fresh one


def bench_calibration():
    """The simulator against the runtime (examples/tinygpt/calibrate.py): prediction errors per schedule."""
    import json

    from gemini_sim import calibration

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "tinygpt"))
    import calibrate

    d = Path(CALIBRATION_DIR or "out/bench-calibrate")
    if CALIBRATION_DIR is None:
        if calibrate.main([str(d)]) != 0:
            raise RuntimeError("calibration run failed")
    res = json.loads((d / "validate.json").read_text())
    setup = (d / "setup.txt").read_text().strip() if (d / "setup.txt").exists() else ""
    where = (f"{res['machines']} machines x {res['processes_per_machine']}, NIC {res['network_mbit_s']:.0f} Mbit/s "
             f"measured, {res['checkpoint_mb_per_machine']:.1f} MB checkpoint per machine; {setup}")
    b = res["baseline"]
    rows = [(f"calibration ({where}): baseline iteration, measured vs simulated (collectives fitted to the profile)",
             f"{b['measured']:.3f} s vs {b['predicted']:.3f} s ({100 * b['rel_error']:+.1f}%; ideal rings "
             f"{100 * b['rel_error_unfitted']:+.1f}%)", "-", "info")]
    for r in res["schedules"]:
        it, ck, ov = r["iteration_s"], r["checkpoint_complete_s"], r["overhead_pct"]
        worst = max(abs(it["rel_error"]), abs(ck["rel_error"] or 0))
        rows.append((f"calibration: `{r['schedule']}`, checkpoint every iteration: iteration time / checkpoint "
                     f"completion, measured vs predicted", f"{it['measured']:.3f} / {ck['measured']:.3f} s vs "
                     f"{it['predicted']:.3f} / {ck['predicted']:.3f} s ({100 * it['rel_error']:+.1f}% / "
                     f"{100 * (ck['rel_error'] or 0):+.1f}%); overhead {ov['measured']:.1f}% measured, "
                     f"{ov['predicted']:.1f}% predicted" + (f"; host CPU +{r['extra_cpu_s']:.3f} s/iteration/rank"
                                                            if r.get("extra_cpu_s") is not None else ""),
                     "errors within 10%", "pass" if worst <= 0.10 else "FAIL"))
        gap = abs(ov["predicted"] - ov["measured"])
        inside_ci = ov.get("ci95") is not None and gap <= ov["ci95"]
        rows.append((f"calibration: `{r['schedule']}` overhead, predicted (network model + host cost model) vs "
                     f"measured (mean of {len(ov.get('rounds') or [])} paired rounds +- 95% CI of the mean; sd: the "
                     "rounds' standard deviation, the run-to-run spread)",
                     f"{ov['predicted']:.1f}% vs {ov['measured']:.1f}%" + (f" +- {ov['ci95']:.1f}" if ov.get("ci95")
                                                                         else "")
                     + (f", sd {ov['sd']:.1f}" if ov.get("sd") is not None else "")
                     + f"; {gap:.1f} points apart, {'inside' if inside_ci else 'outside'} the mean's CI",
                     "within 10% or the run-to-run spread", "pass" if calibration.overhead_agrees(ov) else "FAIL"))
        if r.get("checkpoint_cpu_s_predicted") is not None:
            rows.append((f"calibration: `{r['schedule']}` CPU of one checkpoint per rank: the runtime's own threads "
                         f"measured / the process's extra CPU per iteration measured / predicted from the probe "
                         f"(whole checkpoints taken by the probe, and the kernel's share, which the process figure "
                         f"leaves out)",
                         f"{r['checkpoint_cpu_s'] or 0:.4f} / {r['extra_cpu_s'] or 0:.4f} / "
                         f"{r['checkpoint_cpu_s_predicted']:.4f} s" + (
                             f"; the training thread capturing and starting checkpoints: "
                             f"{1e3 * r['train_thread_s']:.1f} ms/iteration" if r.get("train_thread_s") is not None
                             else ""), "-", "info"))
    c = res["choice"]
    rows.append(("calibration: the schedule the optimizer picks from the measured set-up (`gemini-sim plan --setup`) "
                 "vs the one measured cheapest", f"{c['chosen']} vs {c['measured_best']} ({c['gap_points']:.1f} points "
                 "apart as measured)", "the same or within 1 point", "pass" if c["gap_points"] <= 1.0 else "FAIL"))
    timings = json.loads((d / "baseline" / "timings-rank-00000.json").read_text())
    device, backend = timings.get("device", "not recorded"), timings.get("backend", "not recorded")
    rows.append(("calibration with NCCL on a GPU machine (the same measurements, with the device's name)",
                 f"ran on {device} with {backend}" + ("" if device != "cpu" else
                                                      ": no GPU on this host, the NCCL figures are not measured"),
                 "recorded", "pass" if backend == "nccl" else "not measured"))
    return rows


def _state_path(first: bool):
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import state_path

    work = Path(tempfile.mkdtemp(prefix="gemini-state-path-"))
    sizes = state_path.default_sizes()
    return state_path.measure(sizes[:1] if first else sizes[1:], work, iters=10, batch=8, seq=128,
                              overhead=state_path.compute_bound() if first else None, copy_in=first,
                              limited_link=first and state_path.on_cpu())


def bench_state_path():
    """The checkpoint path against DCP at the first rank state size (bench/state_path.py; on a GPU 1 GiB, with the
    compute-bound overhead case), and recovery's copy to the device."""
    return _state_path(first=True)


def bench_state_path_large():
    """The same at the other sizes (on a GPU 8 GiB; none on CPU): after the rest, as it takes the longest, so that a
    GPU session whose time runs out has the others."""
    return _state_path(first=False)


PEERS_DATA = Path(__file__).resolve().parent / "data" / "peers-cpu.json"


def bench_peers():
    """The runtime beside lm-resiliency, DCP's async stager and dcp.save on the same job (bench/peers.py), at 0.25
    and 1 GiB per rank (GEMINI_BENCH_PEERS_GIB: other sizes), 3 repeats alternating; the table goes after the main
    one, the figures to bench/data/peers-cpu.json (notebooks/peers.ipynb plots them)."""
    import json
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peers

    sizes = [float(g) for g in os.environ.get("GEMINI_BENCH_PEERS_GIB", "0.25 1").split()]
    work = Path(tempfile.mkdtemp(prefix="gemini-peers-"))
    missing = [a for a in peers.APPROACHES if not peers.available(a)]
    section = ["## Peers: the same job under each in-memory checkpointing a user has", "",
               " ".join(peers.__doc__.split("\n\n")[2].split()), "", *peers.settings(),
               "Missing here (not installed: `pip install -e '.[bench]'`): " + ", ".join(missing) if missing else "",
               ""]
    data, at = {}, len(SECTIONS)
    SECTIONS.append("")
    try:
        for gib in sizes:
            figures = peers.measure(gib, work / f"{gib:g}", repeats=3, rounds=2,
                                    progress=lambda m: print(m, flush=True))
            data[f"{gib:g}"] = figures
            section += peers.table(gib, figures) + [""]
            write_atomic(PEERS_DATA, json.dumps(data, indent=1) + "\n")
            SECTIONS[at] = "\n".join(section)  # each size's table as soon as it is measured
            yield peers.summary_rows(gib, figures)
    finally:  # a failed run's folder too (its error has the logs' tail): DCP's checkpoints in it fill a disk
        shutil.rmtree(work, ignore_errors=True)


BENCHES = {"replay": bench_replay_year, "placement": bench_placement_exact, "interleave": bench_interleave,
           "scale": bench_scale, "runtime": bench_runtime, "state-path": bench_state_path,
           "calibration": bench_calibration, "peers": bench_peers, "state-path-large": bench_state_path_large}
SECTIONS: list[str] = []  # Markdown sections after the table (the scale table)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results.md")
    ap.add_argument("--only", action="append", choices=list(BENCHES))
    ap.add_argument("--calibration-dir", help="report this make-calibrate run instead of running a fresh one")
    args = ap.parse_args()
    global CALIBRATION_DIR, STARTED
    CALIBRATION_DIR = args.calibration_dir
    STARTED = cpu_jiffies()
    rows = []
    SECTIONS.clear()
    names = args.only or list(BENCHES)
    for i, name in enumerate(names):
        print(f"bench {name} ...", flush=True)
        before = len(rows)
        try:
            result = BENCHES[name]()
            for step in [result] if isinstance(result, list) else result:  # a generator: a list of rows per step
                rows += step
                write_results(args.out, rows)  # after every step: a later one that dies loses nothing before it
        except KeyboardInterrupt:  # Ctrl-C, or a time limit's SIGINT: keep what the finished benches measured
            partial = len(rows) > before
            write_results(args.out, rows + [(f"{n}: {'the rest ' if n == name and partial else ''}not run "
                                             "(interrupted)", "-", "-", "not measured") for n in names[i:]])
            print(f"bench interrupted in {name}; {args.out} has the benches that finished", file=sys.stderr)
            return 130
    write_results(args.out, rows)
    print(Path(args.out).read_text())
    return 0


def cpu_jiffies(stat: str = "/proc/stat") -> tuple[int, int] | None:
    """(CPU time stolen by the hypervisor for other tenants, all CPU time) so far, in clock ticks, from the
    ``cpu`` line of /proc/stat (the runtime's reader); None where it cannot be read."""
    from runtime.profiler import cpu_ticks

    ticks = cpu_ticks(stat)
    return None if ticks is None else (ticks[7], sum(ticks[:8]))


def steal_line(before: tuple[int, int] | None, after: tuple[int, int] | None) -> str:
    """The header's sentence on how much of the host's CPU other tenants took while the benches ran: on a shared
    VM that is what makes one run's figures noisier than another's."""
    known = before is not None and after is not None and after[1] > before[1]
    share = f"{100 * (after[0] - before[0]) / (after[1] - before[1]):.1f}%" if known else "not known"
    return f"CPU time taken by other tenants of the host (steal) during the run: {share}."


STARTED: tuple[int, int] | None = None  # /proc/stat's figures when main() began


def write_results(out: str, rows: list[tuple[str, str, str, str]]) -> None:
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `make bench` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}.",
        "Timings: best of 3 repeats, one process, one core. " + steal_line(STARTED, cpu_jiffies()),
        "Earlier runs, and what was tried along the way: `bench/history.md`.",
        "",
        "| benchmark | measured | target | verdict |",
        "|---|---|---|---|",
    ] + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows] + [""] + [s + "\n" for s in SECTIONS]
    write_atomic(out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
