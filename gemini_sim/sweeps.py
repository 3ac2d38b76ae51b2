"""Parameter sweeps on Dask: a grid of replays, placements or interleavings, run in parallel, written as one tidy
CSV (a row per cell: its parameters, its metrics, ``status`` and ``error``) plus a plot.

A spec is TOML::

    kind = "replay"                      # replay | placement | interleave
    [grid]                               # every combination of these lists is one cell
    preset = ["gemini-paper", "opt-175b"]
    trace = ["traces/bloom176b.csv", "synthetic:poisson"]
    strategy = ["gemini", "strawman"]
    seed = [0, 1]
    [options]                            # fixed for every cell
    days = 30

Cells run on a local Dask cluster by default, or on an existing one (``--scheduler tcp://host:8786``). A cell that
fails is written with ``status = "error"`` and its message, without losing the others. Re-running with the same
output skips every cell already done; failed cells are tried again.
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import json
import math
import os
from pathlib import Path

from gemini_sim.errors import UserError
from gemini_sim.files import load_toml, output_dir, read_text, save_figure, write_atomic

KINDS = {
    "replay": {"required": ("preset", "trace", "strategy"), "optional": ("seed",)},
    "placement": {"required": ("machines", "replicas", "strategy", "failures"), "optional": ("seed", "domains")},
    "interleave": {"required": ("preset", "schedule"), "optional": ("replicas", "jitter", "seed", "interval")},
}
OPTIONS = {"days", "mtbf_hours", "threshold", "samples", "bursts"}
MAX_CELLS = 100_000  # the grid's product, checked before any cell is built


@functools.cache
def _checks() -> dict:
    """Every grid and option value's check: the command line's own (gemini_sim/cli/inputs.py) for numbers."""
    from gemini_sim.cli import inputs

    return {"machines": inputs.MACHINES, "replicas": inputs.REPLICAS, "failures": inputs.whole(0, 1_000_000),
            "domains": inputs.whole(1, 1_000_000), "seed": inputs.SEED, "jitter": inputs.number(0, 0.99),
            "interval": inputs.whole(1, 10_000), "days": inputs.DAYS, "mtbf_hours": inputs.HOURS,
            "threshold": inputs.number(0, 1e6, lo_open=True), "samples": inputs.whole(1, 10_000_000)}


def _check_value(path, key: str, value) -> None:
    import argparse

    check = _checks().get(key.rsplit(".", 1)[-1])
    if key.endswith("bursts"):
        if not isinstance(value, bool):
            raise UserError(f"{path}: key '{key}' must be true or false, got {value!r}")
    elif check is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{path}: key '{key}' must be a number, got {value!r}")
        try:
            check(repr(value))
        except argparse.ArgumentTypeError as exc:
            raise UserError(f"{path}: key '{key}': {exc}") from None
    elif not isinstance(value, str) or not value:
        raise UserError(f"{path}: key '{key}' must be a non-empty string, got {value!r}")


def load_spec(path) -> dict:
    spec = load_toml(path, "sweep spec")
    for key in spec:
        if key not in ("kind", "grid", "options"):
            raise UserError(f"{path}: unknown key '{key}'; valid: kind, grid, options")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise UserError(f"{path}: key 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    grid = spec.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise UserError(f"{path}: missing table [grid]")
    allowed = KINDS[kind]["required"] + KINDS[kind]["optional"]
    for key, values in grid.items():
        if key not in allowed:
            raise UserError(f"{path}: unknown key 'grid.{key}' for kind {kind}; valid: {', '.join(allowed)}")
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: key 'grid.{key}' must be a non-empty list")
        for value in values:
            _check_value(path, f"grid.{key}", value)
    for key in KINDS[kind]["required"]:
        if key not in grid:
            raise UserError(f"{path}: missing key 'grid.{key}' for kind {kind}")
    if not isinstance(spec.get("options", {}), dict):
        raise UserError(f"{path}: 'options' must be a table ([options]), got a {type(spec['options']).__name__}")
    for key, value in spec.get("options", {}).items():
        if key not in OPTIONS:
            raise UserError(f"{path}: unknown key 'options.{key}'; valid: {', '.join(sorted(OPTIONS))}")
        _check_value(path, f"options.{key}", value)
    size = math.prod(len(v) for v in grid.values())
    if size > MAX_CELLS:
        raise UserError(f"{path}: the grid has {size:,} cells; at most {MAX_CELLS:,}")
    return spec


def cells(spec: dict) -> list[dict]:
    grid = spec["grid"]
    keys = sorted(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def cell_id(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def run_cell(kind: str, params: dict, options: dict, base: str = ".") -> dict:
    """Run one cell and return its metrics. Runs on a Dask worker: imports stay inside."""
    if kind == "replay":
        from gemini_sim.cluster import config
        from gemini_sim.failures import synthetic, traces
        from gemini_sim.replay.engine import replay

        preset = config.load_preset(params["preset"])
        trace_name = params["trace"]
        seed = int(params.get("seed", 0))
        if str(trace_name).startswith("synthetic:"):
            trace = synthetic.for_cluster(trace_name.split(":", 1)[1], preset.cluster.machines,
                                          preset.cluster.machines_per_rack, seed=seed,
                                          mtbf_hours=float(options.get("mtbf_hours", synthetic.DEFAULT_MTBF_HOURS)),
                                          days=float(options.get("days", 30)))
        else:
            path = Path(trace_name)
            trace = traces.load_trace(path if path.is_absolute() else Path(base) / path)
        r = replay(trace, preset, params["strategy"], seed=seed)
        d = r.as_dict()
        return {"failures": d["failures"], "wasted_hours": d["wasted_hours"],
                "gpu_hours_wasted": d["gpu_hours_wasted"], "effective_fraction": d["effective_training_fraction"],
                **d["components"]}
    if kind == "placement":
        from gemini_sim.placement import layouts as placement, survival as recovery

        n, m, k = int(params["machines"]), int(params["replicas"]), int(params["failures"])
        pl = placement.build(params["strategy"], n, m, seed=int(params.get("seed", 0)),
                             domains=int(params.get("domains", m)))
        if k > n:
            raise UserError(f"failures ({k}) exceed machines ({n})")
        if options.get("bursts"):
            dom = placement.domains_of(n, int(params.get("domains", m)))
            r = recovery.monte_carlo(pl, recovery.burst_sampler(dom, k), int(options.get("samples", 20000)),
                                     int(params.get("seed", 0)), k)
        else:
            r = recovery.probability(pl, k, int(options.get("samples", 20000)), int(params.get("seed", 0)))
        out = {"probability": r.probability, "method": r.method,
               "expected_lost_checkpoints": r.expected_lost_checkpoints}
        if r.ci95:
            out["ci95_low"], out["ci95_high"] = r.ci95
        return out
    if kind == "interleave":
        from gemini_sim.cluster import config
        from gemini_sim import interleave

        preset = config.load_preset(params["preset"])
        cfg = interleave.InterleaveConfig(schedule=params["schedule"], replicas=params.get("replicas"),
                                          jitter=float(params.get("jitter", 0.0)), seed=int(params.get("seed", 0)),
                                          interval=int(params.get("interval", 1)))
        r = interleave.simulate(preset, cfg, threshold_pct=float(options.get("threshold", 1.0)))
        d = r.as_dict()
        return {k: d[k] for k in ("iteration_time_s", "baseline_iteration_time_s", "overhead_pct",
                                  "checkpoint_time_s", "min_interval_iters", "idle_network_s")}
    raise UserError(f"unknown sweep kind {kind!r}")


def run_cell_safe(kind: str, params: dict, options: dict, base: str) -> dict:
    """Never raises: a failed cell becomes a row with status 'error' and the one-line reason."""
    try:
        return {**params, **run_cell(kind, params, options, base), "status": "ok", "error": ""}
    except Exception as exc:  # noqa: BLE001 - the point is to keep every other cell
        return {**params, "status": "error", "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}


def read_results(path: Path, keys=()) -> list[dict]:
    """The rows an earlier run of the sweep wrote to ``path`` (none if it is not there); a file that is not such a
    table (not UTF-8 CSV with a ``status`` column and the grid's keys) is refused in one line, not overwritten."""
    if not path.exists():
        return []
    import io

    why = f"{path}: is not the results of a sweep of this grid; move it away or choose another --out"
    try:
        text = read_text(path, "sweep results")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = list(reader)
    except (csv.Error, UserError) as exc:
        raise UserError(f"{why} ({exc})") from None
    if text.strip() and (not {"status", *keys} <= set(reader.fieldnames or ()) or any(None in r for r in rows)):
        raise UserError(why)
    return rows


def _param_view(row: dict, keys) -> dict:
    out = {}
    for k in keys:
        v = row[k]
        try:
            out[k] = json.loads(v) if isinstance(v, str) else v
        except json.JSONDecodeError:
            out[k] = v
    return out


def write_results(path: Path, rows: list[dict]) -> None:
    fields: list[str] = []
    for r in rows:
        for k in r:
            if k not in fields:
                fields.append(k)
    fields = [f for f in fields if f not in ("status", "error")] + ["status", "error"]
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    write_atomic(path, text.getvalue())  # never leave a half-written table


def run_sweep(spec_path, out_dir, scheduler: str | None = None, workers: int | None = None,
              progress: bool = False) -> tuple[list[dict], int, int]:
    """Run the cells not done yet; return (all rows, cells run now, cells skipped)."""
    out = output_dir(out_dir, "--out")
    spec = load_spec(spec_path)
    kind, options = spec["kind"], spec.get("options", {})
    results_path = out / "results.csv"
    todo = cells(spec)
    keys = sorted(spec["grid"])
    done_rows = [r for r in read_results(results_path, keys) if r.get("status") == "ok"]
    done = {cell_id(_param_view(r, keys)) for r in done_rows if all(k in r for k in keys)}
    pending = [c for c in todo if cell_id(c) not in done]
    base = str(Path(spec_path).resolve().parent)
    new_rows: list[dict] = []
    if pending:
        new_rows = _dask_map(kind, pending, options, base, scheduler, workers, progress)
    by_id = {cell_id(_param_view(r, keys)): r for r in done_rows}
    for r in new_rows:
        by_id[cell_id({k: r[k] for k in keys})] = r
    rows = [by_id[cell_id(c)] for c in todo if cell_id(c) in by_id]
    write_results(results_path, rows)
    _plot(kind, rows, out / "sweep.png")
    return rows, len(pending), len(todo) - len(pending)


def _dask_map(kind, pending, options, base, scheduler, workers, progress) -> list[dict]:
    from distributed import Client, LocalCluster, as_completed
    from tqdm import tqdm

    cluster = None
    if scheduler:
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise UserError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
    else:
        cluster = LocalCluster(n_workers=workers or min(2, os.cpu_count() or 1), threads_per_worker=1,
                               processes=True, dashboard_address=None, silence_logs=40)
        client = Client(cluster)
    try:
        futures = client.map(run_cell_safe, [kind] * len(pending), pending, [options] * len(pending),
                             [base] * len(pending), pure=False)
        rows = []
        with tqdm(total=len(futures), desc="sweep", unit="cell", disable=not progress or None, leave=False) as bar:
            for fut in as_completed(futures):
                rows.append(fut.result())
                bar.update(1)
        return rows
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _plot(kind: str, rows: list[dict], path: Path) -> None:
    from collections import defaultdict

    from matplotlib.figure import Figure

    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    if kind == "placement":
        series = defaultdict(list)
        for r in ok:
            series[(r["strategy"], r["machines"], r["replicas"])].append((int(r["failures"]), float(r["probability"])))
        for (s, n, m), pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=f"{s} N={n} m={m}")
        ax.set_xlabel("failures k")
        ax.set_ylabel("P(recover from CPU memory)")
    else:
        metric = "wasted_hours" if kind == "replay" else "overhead_pct"
        group = "strategy" if kind == "replay" else "schedule"
        other = [k for k in ("preset", "trace") if k in ok[0]]
        agg = defaultdict(list)
        for r in ok:
            agg[(tuple(str(r[k]) for k in other), r[group])].append(float(r[metric]))
        labels = sorted({k[0] for k in agg})
        names = sorted({k[1] for k in agg})
        width = 0.8 / max(1, len(names))
        for j, name in enumerate(names):
            vals = [sum(agg[(lab, name)]) / len(agg[(lab, name)]) if (lab, name) in agg else 0 for lab in labels]
            ax.bar([i + j * width for i in range(len(labels))], vals, width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))],
                      ["\n".join(Path(x).stem if "/" in x else x for x in lab) for lab in labels], fontsize=7)
        ax.set_ylabel(f"mean {metric}")
    ax.legend(fontsize=7)
    ax.set_title(f"sweep: {kind}, {len(ok)} cells")
    save_figure(fig, path, dpi=110)
