"""The command line's numbers (gemini_sim/cli/inputs.py): finite, in range and bounded before any work; any value
gives either a result or exit code 2 with one line, within bounded time and memory."""

import argparse
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from conftest import ROOT, gives_a_result_or_one_line
from gemini_sim.cli import inputs


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e309", "abc", "", "0x10"])
def test_numbers_must_be_finite(text):
    with pytest.raises(argparse.ArgumentTypeError):
        inputs.number(0, 10)(text)


def test_number_and_whole_ranges():
    assert inputs.number(0, 1)("0.5") == 0.5 and inputs.number(0, 1)("1") == 1.0
    with pytest.raises(argparse.ArgumentTypeError, match="> 0"):
        inputs.number(0, lo_open=True)("0")
    assert inputs.whole(1, 3)("3") == 3
    for bad in ("0", "4", "1.5", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            inputs.whole(1, 3)(bad)


def test_int_range_is_bounded_before_it_is_built():
    assert inputs.int_range(0, 8)("2-4") == [2, 3, 4] and inputs.int_range(0, 8)("5") == [5]
    with pytest.raises(argparse.ArgumentTypeError, match="at most 10,000"):
        inputs.int_range(0, None)("0-1000000000")  # refused without building a billion-element list
    for bad in ("4-2", "-1", "1-9", "a-b", "1-2-3"):
        with pytest.raises(argparse.ArgumentTypeError):
            inputs.int_range(0, 8)(bad)


# Verbs whose valid runs are quick, with the numeric flag under test; the value comes from hypothesis.
CASES = [
    ["synth", "--synthetic", "poisson", "--days"],
    ["synth", "--synthetic", "burst", "--mtbf-hours"],
    ["synth", "--synthetic", "burst", "--burst-probability"],
    ["synth", "--synthetic", "weibull", "--weibull-shape"],
    ["placement", "--machines", "8", "--replicas", "2", "--failures"],
    ["placement", "--machines", "8", "--replicas", "2", "--failures", "2", "--samples"],
    ["placement", "--replicas", "2", "--failures", "1", "--machines"],
    ["interleave", "--preset", "gemini-paper", "--schedule", "naive", "--jitter"],
    ["interleave", "--preset", "gemini-paper", "--schedule", "gemini", "--span-fill"],
    ["interleave", "--preset", "gemini-paper", "--schedule", "blocking", "--slow-nic"],
    # the output's folder is a file: refused once the flags are read, so no valid value starts an optimisation
    ["plan", "--synthetic", "poisson", "-o", "{file}/p.json", "--max-overhead"],
    ["validate", "/nonexistent-run", "--warmup"],
]
values = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.integers(-10**15, 10**15).map(str),
                   st.sampled_from(["nan", "inf", "-0", "1e-300", "1e300", "0-1000000000", "3-1", "", "x"]),
                   st.text(alphabet="0123456789.-e", max_size=8))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(CASES), value=values)
@example(case=["synth", "--synthetic", "weibull", "--weibull-shape"], value="1e-300")  # once an OverflowError
def test_any_numeric_flag_value_gives_a_result_or_one_line(tmp_path_factory, case, value):
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "file").touch()
    argv = [a.replace("{file}", str(tmp / "file")) for a in case] + [value]
    argv += ["-o", str(tmp / "out.csv")] if case[0] == "synth" else []
    gives_a_result_or_one_line(argv)


@pytest.mark.parametrize("argv, needle", [
    (["replay", "--synthetic", "poisson", "--strategies", ","], "empty strategy name in ','"),
    (["replay", "--synthetic", "poisson", "--strategies", ""], "empty strategy name"),
    (["replay", "--synthetic", "poisson", "--strategies", "gemini,gemini"], "'gemini' is named twice"),
    (["replay", "--synthetic", "poisson", "--strategies", "gemni"], "unknown strategy 'gemni'"),
    (["plan", "--synthetic", "poisson", "-o", "/tmp/never.json", "--schedules", "gemini,"], "empty schedule name"),
])
def test_name_lists_refuse_empty_and_repeated_names(cli, argv, needle):
    rc, _, err = cli(*argv, check_rc=2)
    assert needle in err and len(err.strip().splitlines()) == 1


def test_the_command_line_loads_plotting_and_statistics_only_when_a_command_needs_them():
    """Every command (and every fuzz case above) pays for what `gemini-sim` imports before it parses a flag:
    matplotlib and scipy.stats took 1.2 of its 1.5 s, for the few commands that plot or fit."""
    code = ("import sys, gemini_sim.cli\n"
            "print(sorted(m for m in ('matplotlib', 'scipy.stats') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
