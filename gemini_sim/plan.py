"""The Plan: a versioned JSON contract between the simulator and the runtime.

``gemini_sim/schema/plan-v1.schema.json`` is the schema; every plan that is read is validated against it (errors
name the JSON path and what was expected), then checked for consistency (holders index real machines, ranks map to
machines, intervals fit together). A plan with an unknown future ``schema_version`` is refused.
"""

from __future__ import annotations

import hashlib
from collections import Counter
import json
from datetime import datetime, timezone
from importlib import metadata, resources
from pathlib import Path

import jsonschema

from gemini_sim.errors import UserError
from gemini_sim.files import load_json, write_json

SCHEMA_VERSION = 1
# The vocabulary the simulator and the runtime share. Schedules, by the rule a plan's runtime follows for each:
RULES = {"blocking": "after-update", "naive": "at-start", "gemini": "idle-spans", "priority": "low-priority"}
SCHEDULES = tuple(RULES)
# Where a checkpoint is recovered from, nearest first: this machine's memory, a peer's memory, durable storage.
TIERS = ("local", "peer", "storage")


FORMATS = {"gemini-sim-profile": "profile", "gemini-sim-timings": "timings", "gemini-sim-probe": "probe"}


def schema(version: int = SCHEMA_VERSION, name: str = "plan") -> dict:
    """The JSON Schema of a contract: ``plan`` (this module), or the runtime's ``profile``, ``timings`` and
    ``probe`` formats (gemini_sim/schema/NAME-vVERSION.schema.json)."""
    return json.loads(resources.files("gemini_sim.schema").joinpath(f"{name}-v{version}.schema.json").read_text())


def check_format(data, fmt: str, where: str) -> dict:
    """Check a runtime file (``fmt``: one of :data:`FORMATS`, e.g. ``gemini-sim-timings``) against its schema;
    a one-line :class:`UserError` naming the JSON path otherwise. Returns ``data``."""
    name = FORMATS[fmt]
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise UserError(f"{where}: not a gemini-sim {name} (key 'format' must be '{fmt}')")
    version = data.get("version")
    if type(version) is not int or version != 1:
        raise UserError(f"{where}: {name} version {version!r} is not supported (expected 1)")
    _against_schema(data, schema(version, name), where)
    return data


def sha256_of(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tool_version() -> str:
    try:
        return metadata.version("gemini-sim")
    except metadata.PackageNotFoundError:
        return "unknown"


def _path(error: jsonschema.ValidationError) -> str:
    out = "$"
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _against_schema(data, sch: dict, where: str) -> None:
    """A one-line :class:`UserError` for the shallowest schema violation, naming its JSON path."""
    errors = sorted(jsonschema.Draft202012Validator(sch).iter_errors(data),
                    key=lambda e: (len(list(e.absolute_path)), str(e.absolute_path)))
    if errors:
        raise UserError(f"{where}: {_path(errors[0])}: {errors[0].message}")


def validate(data, where: str = "plan") -> dict:
    """Validate parsed JSON against the schema and the plan's own consistency rules; return it."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: a plan must be a JSON object")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{where}: $.schema_version: expected an integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise UserError(f"{where}: schema_version {version} is newer than this gemini-sim understands "
                        f"({SCHEMA_VERSION}); upgrade gemini-sim")
    if version < 1:
        raise UserError(f"{where}: $.schema_version: unknown version {version}")
    cluster = data.get("cluster")
    for key, limit in (("rank_to_machine", MAX_RANKS), ("holders", MAX_RANKS)):  # sized before the schema walks them
        part = cluster if key == "rank_to_machine" else data.get("placement")
        items = part.get(key) if isinstance(part, dict) else None
        if isinstance(items, list) and len(items) > limit:
            raise UserError(f"{where}: {key} lists {len(items):,} entries; at most {limit:,}")
    _against_schema(data, schema(version), where)
    _check_consistency(data, where)
    return data


def _check_consistency(d: dict, where: str) -> None:
    c, p, k = d["cluster"], d["placement"], d["checkpoint"]
    n, ppm = c["machines"], c["processes_per_machine"]
    ranks = c["rank_to_machine"]
    if len(ranks) != n * ppm:
        raise UserError(f"{where}: $.cluster.rank_to_machine: has {len(ranks)} ranks, expected machines x "
                        f"processes_per_machine = {n * ppm}")
    for r, m in enumerate(ranks):
        if m >= n:
            raise UserError(f"{where}: $.cluster.rank_to_machine[{r}]: machine {m} does not exist ({n} machines)")
    counts = Counter(ranks)  # one pass: counting per machine was quadratic (2 minutes for 100,000 machines)
    if any(counts[m] != ppm for m in range(n)):
        raise UserError(f"{where}: $.cluster.rank_to_machine: every machine must run {ppm} ranks")
    holders = p["holders"]
    if len(holders) != n:
        raise UserError(f"{where}: $.placement.holders: has {len(holders)} entries, expected one per machine ({n})")
    if p["replicas"] > n:
        raise UserError(f"{where}: $.placement.replicas: {p['replicas']} exceeds machines ({n})")
    for i, hs in enumerate(holders):
        if hs[0] != i:
            raise UserError(f"{where}: $.placement.holders[{i}]: must start with machine {i} itself")
        if len(hs) != p["replicas"] or len(set(hs)) != len(hs):
            raise UserError(f"{where}: $.placement.holders[{i}]: expected {p['replicas']} distinct machines")
        if any(h >= n for h in hs):
            raise UserError(f"{where}: $.placement.holders[{i}]: machine index out of range (0..{n - 1})")
    groups = p.get("replica_groups")
    if groups is not None:
        if n % groups:
            raise UserError(f"{where}: $.placement.replica_groups: {groups} replica groups do not divide the {n} "
                            f"machines")
        per = n // groups
        for i, hs in enumerate(holders):
            if any(h % per != i % per for h in hs):
                raise UserError(f"{where}: $.placement.holders[{i}]: with {groups} replica groups every holder of "
                                f"machine {i} must be at its position ({i % per}) in a group")
    if k["persist_interval_iters"] % k["interval_iters"]:
        raise UserError(f"{where}: $.checkpoint.persist_interval_iters: must be a multiple of interval_iters "
                        f"({k['interval_iters']})")
    sched = d["schedule"]
    if sched["chunk_bytes"] > sched["buffer_bytes"]:
        raise UserError(f"{where}: $.schedule.chunk_bytes: larger than the staging buffer")
    for j, span in enumerate(sched.get("spans", [])):
        if span["end_s"] < span["start_s"]:
            raise UserError(f"{where}: $.schedule.spans[{j}]: end_s is before start_s")
    if "peer" in d["recovery"]["order"] and p["replicas"] < 2:
        raise UserError(f"{where}: $.recovery.order: 'peer' needs placement.replicas >= 2")


def read(path) -> dict:
    return validate(load_json(path, "plan"), str(path))


def write(data: dict, path) -> None:
    validate(data, "plan to write")
    write_json(path, data)  # atomic: a reader sees the old plan or the new one, never half of one


def make(*, machines: int, processes_per_machine: int, placement_strategy: str, holders, schedule: str,
         chunk_bytes: int, buffer_bytes: int, interval_iters: int, persist_interval_iters: int,
         spans=None, span_fill: float | None = None, preset: str = "", config_sha256: str = "",
         trace_sha256: str = "", predicted=None,
         keep: int = 2, replica_groups: int | None = None) -> dict:
    check_ranks(machines, processes_per_machine)
    replicas = len(holders[0])
    persist = max(interval_iters, persist_interval_iters - persist_interval_iters % interval_iters)
    d = {
        "schema_version": SCHEMA_VERSION,
        "cluster": {"machines": machines, "processes_per_machine": processes_per_machine,
                    "rank_to_machine": [r // processes_per_machine for r in range(machines * processes_per_machine)]},
        "placement": {"strategy": placement_strategy, "replicas": replicas, "holders": [list(h) for h in holders]},
        "schedule": {"name": schedule, "chunk_bytes": int(chunk_bytes), "buffer_bytes": int(buffer_bytes),
                     "rule": RULES.get(schedule, "at-start")},
        "checkpoint": {"interval_iters": interval_iters, "persist_interval_iters": persist, "keep": keep},
        "recovery": {"order": list(TIERS) if replicas > 1 else [t for t in TIERS if t != "peer"]},
        "provenance": {"tool": "gemini-sim", "version": tool_version(),
                       "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    }
    if replica_groups is not None:
        d["placement"]["replica_groups"] = replica_groups
    if preset:
        d["cluster"]["preset"] = preset
    if span_fill is not None:
        d["schedule"]["span_fill"] = span_fill
    if spans is not None:
        d["schedule"]["spans"] = [{"start_s": sp[0], "end_s": sp[1], "bytes": sp[2]}
                                  | ({"after_collectives": sp[3]} if len(sp) > 3 else {}) for sp in spans]
    for key, value in (("config_sha256", config_sha256), ("trace_sha256", trace_sha256)):
        if value:
            d["provenance"][key] = value
    if predicted:
        d["provenance"]["predicted"] = predicted
    return d


DEFAULT_PERSIST = 100  # iterations between durable checkpoints in a plan made without a simulation
MAX_RANKS = 1 << 20  # a plan lists every rank: 2^20 ranks make a plan of some 10 MB, checked in seconds


def check_ranks(machines: int, processes_per_machine: int) -> None:
    """Refuse, before any work, a plan of more ranks than :data:`MAX_RANKS` (its size grows with them)."""
    ranks = machines * processes_per_machine
    if ranks > MAX_RANKS:
        raise UserError(f"a plan for {machines:,} machines x {processes_per_machine:,} processes lists {ranks:,} "
                        f"ranks (some {ranks * 7 / 1e6:,.0f} MB of JSON); at most {MAX_RANKS:,}")


def default(machines: int, processes_per_machine: int, replicas: int = 2, interval: int = 1,
            persist: int = DEFAULT_PERSIST,
            schedule: str = "naive", chunk_bytes: int = 1 << 20, hsdp: int | None = None) -> dict:
    """A plan without a simulation: GEMINI's placement (``auto``), a checkpoint every ``interval`` iterations and a
    durable one every ``persist``, chunks of ``chunk_bytes`` through a two-chunk staging buffer. ``hsdp=R``: an HSDP
    job of R replica groups of consecutive machines, its copies where the replicas are (placement ``hsdp``)."""
    from gemini_sim.placement import layouts as placement

    check_ranks(machines, processes_per_machine)  # before the placement is built for them
    if hsdp is not None:
        pl = placement.hsdp(machines, replicas, hsdp)
        placement.check(pl)
        strategy = pl.strategy
    else:
        strategy = placement.resolve(placement.AUTO, machines, replicas)
        pl = placement.build(strategy, machines, replicas)
    return make(machines=machines, processes_per_machine=processes_per_machine, placement_strategy=strategy,
                holders=pl.holders, schedule=schedule, chunk_bytes=chunk_bytes, buffer_bytes=2 * chunk_bytes,
                interval_iters=interval, persist_interval_iters=persist, replica_groups=hsdp)


def show(d: dict) -> str:
    c, p, s, k = d["cluster"], d["placement"], d["schedule"], d["checkpoint"]
    pred = d["provenance"].get("predicted", {})
    lines = [
        f"gemini-sim plan, schema v{d['schema_version']}, made by {d['provenance']['tool']} "
        f"{d['provenance']['version']} on {d['provenance']['created']}",
        f"cluster:    {c['machines']} machines x {c['processes_per_machine']} processes"
        + (f" (preset {c['preset']})" if c.get("preset") else ""),
        f"placement:  {p['strategy']}, {p['replicas']} copies of every machine's checkpoint in CPU memory"
        + (f" ({p['replica_groups']} HSDP replica groups: the copies on other machines are their replicas, sent and "
           f"stored as each rank's own part only)" if p.get("replica_groups") else ""),
    ]
    groups = ", ".join("{" + ",".join(map(str, h)) + "}" for h in p["holders"][:6])
    lines.append(f"            holders: {groups}{' ...' if len(p['holders']) > 6 else ''}")
    lines.append(f"schedule:   {s['name']} (rule {s['rule']}), chunks of {s['chunk_bytes'] / 2**20:.0f} MiB through a "
                 f"{s['buffer_bytes'] / 2**20:.0f} MiB staging buffer"
                 + (f", {len(s['spans'])} idle spans" if s.get("spans") else ""))
    lines.append(f"checkpoint: every {k['interval_iters']} iteration(s) to CPU memory, every "
                 f"{k['persist_interval_iters']} to durable storage, keep {k['keep']}")
    lines.append(f"recovery:   {' -> '.join(d['recovery']['order'])}")
    if pred:
        lines.append("predicted:  " + ", ".join(f"{key} {val:.4g}" if isinstance(val, float) else f"{key} {val}"
                                               for key, val in pred.items() if not isinstance(val, dict)))
    return "\n".join(lines)
