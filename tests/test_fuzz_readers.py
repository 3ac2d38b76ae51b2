"""Property-based fuzzing of every reader of user files: traces (CSV), plans, profiles and presets.

For any input, a reader either returns a value that keeps its invariants or raises a one-line UserError; nothing
else (no other exception, no hang, no huge allocation). In-process cases are many and fast; a smaller set runs the
real command line on the generated files, each in a process of its own with a time limit and a 4 GiB address-space
limit.
"""

import copy
import json
from collections import Counter
from importlib import resources
import math

from hypothesis import HealthCheck, example, given, settings, strategies as st

from conftest import ROOT, gives_a_result_or_one_line
from gemini_sim import plan as plan_mod
from gemini_sim.cluster import config, workload
from gemini_sim.errors import UserError
from gemini_sim.failures import traces
from gemini_sim.placement import layouts

# --- values a hostile or careless file holds ------------------------------------------------------------------
WEIRD_NUMBERS = ["nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1", "0", "-0", "1e-320", "99999999999999999999",
                 "1" * 5000, "0x10", "1_000", " 3 ", "", "1e9", "1e10", "3.5", "2"]
WEIRD_TEXT = ["\ufeff", "\x00", '"', '""', ",", "\n", "#", "# machines: -3", "é", "\\", "\r\n"]

FIELD = st.one_of(st.sampled_from(WEIRD_NUMBERS + WEIRD_TEXT + list(traces.KINDS)),
                  st.floats(allow_nan=True, allow_infinity=True).map(repr),
                  st.integers(-10**20, 10**20).map(str), st.text(max_size=6))


@st.composite
def trace_texts(draw):
    lines = []
    for _ in range(draw(st.integers(0, 3))):  # metadata
        key = draw(st.sampled_from([*traces.METADATA, "other", ""]))
        lines.append(f"# {key}: {draw(FIELD)}")
    header = list(traces.COLUMNS)
    if draw(st.booleans()):
        header = draw(st.permutations(header))
    if draw(st.integers(0, 9)) == 0:
        header = header + [draw(st.sampled_from(["note", "rack", ""]))]
    lines.append(",".join(header))
    t = 0.0
    for _ in range(draw(st.integers(0, 8))):
        t += draw(st.floats(0, 100))
        row = {"time_hours": f"{t:.6g}", "kind": draw(st.sampled_from(traces.KINDS)),
               "machines": str(draw(st.integers(1, 8))), "note": "n"}
        if draw(st.integers(0, 3)) == 0:
            row[draw(st.sampled_from(traces.COLUMNS))] = draw(FIELD)
        fields = [row.get(h, "x") for h in header]
        if draw(st.integers(0, 9)) == 0:
            fields.append(draw(FIELD))
        lines.append(",".join(fields))
    text = "\n".join(lines)
    if draw(st.integers(0, 4)) == 0:  # damage a random position
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + draw(st.sampled_from(WEIRD_TEXT + WEIRD_NUMBERS)) + text[pos:]
    return text


OUTCOMES: Counter = Counter()  # (reader, accepted?) over this file's property tests


def _read(reader: str, read):
    """``read()``, or None when it refused the input with a one-line UserError; counts both outcomes."""
    try:
        value = read()
    except UserError as exc:
        assert "\n" not in str(exc) and str(exc)
        OUTCOMES[reader, False] += 1
        return None
    OUTCOMES[reader, True] += 1
    return value


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=trace_texts())
def test_trace_reader_returns_a_sound_trace_or_one_line(text):
    tr = _read("trace", lambda: traces.parse_trace(text, "t.csv"))
    if tr is None:
        return
    times = [e.time_h for e in tr.events]
    assert tr.events and times == sorted(times) and all(math.isfinite(t) and t >= 0 for t in times)
    assert all(1 <= e.machines <= traces.MAX_MACHINES and e.kind in traces.KINDS for e in tr.events)
    assert math.isfinite(tr.duration_h) and times[-1] <= tr.duration_h <= traces.MAX_HOURS
    assert tr.source_machines is None or 1 <= tr.source_machines <= traces.MAX_MACHINES


# --- JSON documents: start from a valid one, then break it ----------------------------------------------------
def valid_plan() -> dict:
    return plan_mod.make(machines=4, processes_per_machine=2, placement_strategy="group",
                         holders=layouts.group(4, 2).holders, schedule="gemini", chunk_bytes=1 << 20,
                         buffer_bytes=1 << 21, interval_iters=1, persist_interval_iters=100,
                         spans=[(0.1, 0.2, 5e5)], predicted={"overhead_pct": 0.0})


def valid_profile() -> dict:
    ops = [{"kind": "compute", "name": "forward", "start_s": 0.0, "end_s": 0.2},
           {"kind": "collective", "name": "all_gather", "start_s": 0.2, "end_s": 0.3, "bytes": 4e6},
           {"kind": "compute", "name": "optimizer", "start_s": 0.3, "end_s": 0.35}]
    return {"format": "gemini-sim-profile", "version": 1, "machines": 2, "processes_per_machine": 1,
            "iterations": [{"iteration": 1, "start_s": 0.0, "end_s": 0.35, "ops": ops}]}


JSON_VALUES = st.one_of(st.sampled_from([None, True, -1, 0, 1, 2**64, -2**70, 1e300, -1e300, 5e-324, "", "x",
                                         [], {}, [[[[]]]], "gemini", "group"]),
                        st.integers(-10**12, 10**12), st.floats(-1e12, 1e12), st.text(max_size=4))
RAW_TOKENS = ["NaN", "Infinity", "-Infinity", "1e400", "[" * 200, "{", "}", ",", '"', "1" * 5000]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@st.composite
def broken_json(draw, base: dict):
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        action = draw(st.integers(0, 4))
        if action == 0 and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            # a copy: the sampled [] / {} / [[[[]]]] are shared objects, and a later mutation inside one would change
            # it for every example after (a list put inside itself made _paths recurse without end, on CI)
            parent[path[-1]] = copy.deepcopy(draw(JSON_VALUES))
    text = json.dumps(doc, indent=1)
    if draw(st.integers(0, 3)) == 0:  # tokens that are not JSON, or a duplicate key
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + draw(st.sampled_from(RAW_TOKENS + [' "machines": 1,'])) + text[pos:]
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=broken_json(valid_plan()))
@example(text=json.dumps(valid_plan()))  # always one accepted: broken variants are rarely still valid
def test_plan_reader_returns_a_valid_plan_or_one_line(tmp_path_factory, text):
    f = tmp_path_factory.mktemp("plan") / "p.json"
    f.write_text(text)
    data = _read("plan", lambda: plan_mod.read(f))
    if data is None:
        return
    n = data["cluster"]["machines"]
    assert 1 <= n <= 1_000_000 and len(data["placement"]["holders"]) == n
    plan_mod.validate(data, "again")  # what was accepted is valid


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=broken_json(valid_profile()))
@example(text=json.dumps(valid_profile()))
def test_profile_reader_gives_a_timeline_or_one_line(tmp_path_factory, text):
    f = tmp_path_factory.mktemp("profile") / "p.json"
    f.write_text(text)
    tl = _read("profile", lambda: workload.from_profile(workload.load_profile(f)))
    if tl is None:
        return
    assert tl.machines >= 1 and tl.ops and all(math.isfinite(op.duration_s) and op.duration_s >= 0 for op in tl.ops)


PRESET_TEXT = resources.files("gemini_sim.cluster.presets").joinpath("gemini-paper.toml").read_text()


@settings(max_examples=200, deadline=None)
@given(line=st.sampled_from([ln for ln in PRESET_TEXT.splitlines() if "=" in ln]),
       value=st.sampled_from(WEIRD_NUMBERS + ["nan", "inf", "-inf", "1e400", '"x"', "[]", "true"]))
def test_preset_reader_returns_a_sound_preset_or_one_line(tmp_path_factory, line, value):
    f = tmp_path_factory.mktemp("cfg") / "c.toml"
    f.write_text(PRESET_TEXT.replace(line, f"{line.split('=')[0]}= {value}"))
    p = _read("preset", lambda: config.load_config(f))
    if p is None:
        return
    s = p.summary()
    assert all(math.isfinite(v) and v > 0 for k, v in s.items() if isinstance(v, float))


# --- the real command line on generated files, each in a limited process of its own (tests/cli_runner.py) ------
COMMANDS = {
    "trace": [["replay", "--trace", "{f}", "--strategies", "gemini,strawman"], ["fit", "--trace", "{f}", "--json"]],
    "plan": [["plan", "show", "{f}"], ["plan", "validate", "{f}"]],
    "profile": [["interleave", "--profile", "{f}", "--config", str(ROOT / "tests" / "data" / "two-machines.toml"),
                 "--schedule", "naive", "--json"]],
}


@st.composite
def files_and_commands(draw):
    kind = draw(st.sampled_from(sorted(COMMANDS)))
    text = {"trace": lambda: draw(trace_texts()), "plan": lambda: draw(broken_json(valid_plan())),
            "profile": lambda: draw(broken_json(valid_profile()))}[kind]()
    return kind, text, draw(st.sampled_from(COMMANDS[kind]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=files_and_commands())
def test_cli_on_generated_files_gives_a_result_or_one_line(tmp_path_factory, case):
    kind, text, argv = case
    f = tmp_path_factory.mktemp("cli") / f"in.{'csv' if kind == 'trace' else 'json'}"
    f.write_text(text)
    argv = [a.replace("{f}", str(f)) for a in argv]
    gives_a_result_or_one_line(argv, text[:300])


def test_the_fuzzers_reach_both_outcomes():
    """Run after the property tests above (same file, same worker): every reader saw inputs it accepted and inputs it
    refused, so none of the properties holds vacuously."""
    for reader in ("trace", "plan", "profile", "preset"):
        assert OUTCOMES[reader, True] and OUTCOMES[reader, False], (reader, dict(OUTCOMES))
