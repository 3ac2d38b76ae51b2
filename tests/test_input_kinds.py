"""Inputs by kind (README, "Errors: the rules"), generated, on the real commands of gemini-sim and of the runtime,
each case in a process of its own with a time and an address-space limit:

- special files: a FIFO, a device, a folder, a socket, a link to any of them or to nothing, as every input file and
  every output a command takes: refused in one line (exit 2) before any work, nothing hangs, and nothing special
  is replaced (a link is followed, never replaced);
- names that become paths (job and machine names): accepted only as one plain path component;
- malformed formats: nesting, and values of the wrong type where a table goes.

Each generated case runs in a subprocess; the closing note of the issue counts them per kind.
"""

import os
import resource
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import ROOT, run_cli
from runtime.config import ConfigError, check_name

LIMIT = 4 << 30
SPECIALS = ("fifo", "folder", "socket", "dev-zero", "dev-null", "dev-full", "link-to-fifo", "dangling-link",
            "link-to-dev-zero")
MLP = str(ROOT / "examples" / "mlp" / "train.py")


def special(kind: str, where: Path) -> Path:
    """A special file of ``kind`` under ``where`` (made once)."""
    p = where / kind
    if kind.startswith("dev-"):
        return Path("/dev/" + kind[4:])
    if p.exists() or p.is_symlink():
        return p
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "folder":
        p.mkdir()
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()
    elif kind == "link-to-fifo":
        p.symlink_to(special("fifo", where))
    elif kind == "dangling-link":
        p.symlink_to(where / "nothing-here")
    elif kind == "link-to-dev-zero":
        p.symlink_to("/dev/zero")
    return p


def fingerprint(p: Path):
    """What must not change: the kind of the file (and of what a link points to)."""
    st_ = os.lstat(p)
    target = os.readlink(p) if stat.S_ISLNK(st_.st_mode) else None
    return stat.S_IFMT(st_.st_mode), target


def one_line_refusal(rc: int, err: str, context) -> None:
    assert rc == 2, (context, rc, err[-1500:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, (context, err[-1500:])


def limited():
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def runtime_command(argv, cwd) -> tuple[int, str]:
    """``python -m runtime ...`` or the agent, in a process of its own with 60 s and 4 GiB."""
    r = subprocess.run([sys.executable, "-m", *argv], cwd=cwd, capture_output=True, text=True, timeout=60,
                       preexec_fn=limited, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return r.returncode, r.stderr


# every input file a command takes, X standing for it
GEMINI_INPUTS = [
    ["replay", "--trace", "X", "--preset", "gemini-paper"],
    ["fit", "--trace", "X"],
    ["replay", "--synthetic", "poisson", "--days", "1", "--config", "X"],
    ["interleave", "--preset", "gemini-paper", "--schedule", "gemini", "--profile", "X"],
    ["plan", "validate", "X"],
    ["plan", "show", "X"],
    ["sweep", "X", "--out", "OUT"],
]
RUNTIME_INPUTS = [
    ["runtime", "plan", "--like", "X", "--machines", "2", "-o", "OUT/p.json"],
    ["runtime.agent", "--plan", "X", "--workdir", "OUT/w", "--", MLP],
]
# every output file or folder, X standing for it
GEMINI_OUTPUTS = [
    ["synth", "--synthetic", "burst", "--days", "2", "-o", "X"],
    ["replay", "--synthetic", "poisson", "--days", "1", "--out", "X"],
    ["placement", "--machines", "8", "--replicas", "2", "--strategy", "group", "--failures", "2", "--plot", "X"],
]
RUNTIME_OUTPUTS = [["runtime", "plan", "--machines", "2", "--procs", "1", "-o", "X"]]


def _run_on_special(tmp_path_factory, folder: str, kind: str, argv):
    """Run ``argv`` with a special file of ``kind`` for X: (exit code, stderr, the file, its fingerprint before)."""
    where = tmp_path_factory.getbasetemp() / folder
    where.mkdir(exist_ok=True)
    x = special(kind, where)
    before = fingerprint(x)
    out = tmp_path_factory.mktemp("out")
    full = [str(x) if a == "X" else a.replace("OUT", str(out)) for a in argv]
    if argv[0].startswith("runtime"):
        rc, err = runtime_command(full, out)
    else:
        rc, _, err = run_cli(*full, check_rc=None, timeout=60, address_space=LIMIT)
    return rc, err, x, before


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(SPECIALS), argv=st.sampled_from(GEMINI_INPUTS + RUNTIME_INPUTS))
def test_a_special_file_as_an_input_is_refused_in_one_line(tmp_path_factory, kind, argv):
    rc, err, x, before = _run_on_special(tmp_path_factory, "specials", kind, argv)
    one_line_refusal(rc, err, (kind, argv))
    assert fingerprint(x) == before


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from([k for k in SPECIALS if k != "dangling-link"]),
       argv=st.sampled_from(GEMINI_OUTPUTS + RUNTIME_OUTPUTS))
def test_a_special_file_as_an_output_is_refused_and_left_as_it_was(tmp_path_factory, kind, argv):
    rc, err, x, before = _run_on_special(tmp_path_factory, "specials-out", kind, argv)
    if kind == "folder" and "--out" in argv:  # a folder is what --out asks for
        assert rc == 0, err
    else:
        one_line_refusal(rc, err, (kind, argv))
    assert fingerprint(x) == before


def test_a_link_to_a_file_is_followed_and_kept(tmp_path):
    target = tmp_path / "real.csv"
    target.write_text("old")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    run_cli("synth", "--synthetic", "burst", "--days", "2", "-o", str(link))
    assert link.is_symlink() and target.read_text().startswith("#")  # the file it points to was written
    plan_link = tmp_path / "plan.json"
    plan_link.symlink_to(tmp_path / "plan-target.json")  # a link to a file not there yet: it is made
    rc, err = runtime_command(["runtime", "plan", "--machines", "2", "--procs", "1", "-o", str(plan_link)], tmp_path)
    assert rc == 0, err
    assert plan_link.is_symlink() and (tmp_path / "plan-target.json").is_file()


NAME_TEXT = st.one_of(st.text(max_size=80), st.sampled_from(["..", ".", "a/b", "../../x", "x" * 64, "x" * 65, "-x",
                                                             "ok.name_1-2", "\x00", "a b", "é"]))


@settings(max_examples=400, deadline=None)
@given(name=NAME_TEXT)
def test_a_name_is_one_plain_path_component_or_refused(name):
    try:
        ok = check_name(name, "job name")
    except ConfigError as e:
        assert "\n" not in str(e) and "is not a name" in str(e)
        return
    assert ok == name and Path(name).name == name and name not in (".", "..") and "/" not in name
    assert len(name) <= 64 and name.isascii() and not name.startswith(("-", ".", "_"))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=NAME_TEXT.filter(lambda n: "\x00" not in n))
def test_names_on_the_command_line_are_checked_before_they_touch_a_path(tmp_path_factory, name):
    out = tmp_path_factory.mktemp("names")
    rc, err = runtime_command(["runtime", "free", "--store-root", str(out / "store"), "--", name], out)
    one_line_refusal(rc, err, name)  # not a name, or no such job: never a path outside the store root
    assert "is not a name" in err or "holds memory in" in err, err
    rc, err = runtime_command(["runtime.agent", "--job", name, "--machines", "1", "--procs", "1", "--workdir",
                               str(out / "w"), "--fault", "zap", "--", MLP], out)
    one_line_refusal(rc, err, name)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(depth=st.integers(65, 30_000), opener=st.sampled_from(["[", "{"]),
       where=st.sampled_from(["sweep", "config"]))
def test_nesting_beyond_the_limit_is_one_line_in_toml_as_in_json(tmp_path_factory, depth, opener, where):
    spec = tmp_path_factory.mktemp("deep") / "deep.toml"
    closer = "]" if opener == "[" else "}"
    value = opener * depth + closer * depth if opener == "[" else ("{a = " * depth + "1" + " }" * depth)
    spec.write_text(f"x = {value}\n")
    argv = ["sweep", str(spec), "--out", str(spec.parent / "o")] if where == "sweep" else \
        ["replay", "--synthetic", "poisson", "--days", "1", "--config", str(spec)]
    rc, _, err = run_cli(*argv, check_rc=None, timeout=60, address_space=LIMIT)
    one_line_refusal(rc, err, (depth, opener, where))
    assert "nested more than 64 levels" in err


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.sampled_from(['"x"', "[1, 2]", "3", "true", "[[options]]"]))
def test_a_sweep_table_of_the_wrong_type_is_one_line(tmp_path_factory, value):
    spec = tmp_path_factory.mktemp("sweep") / "s.toml"
    grid = '[grid]\nmachines = [8]\nreplicas = [2]\nfailures = [2]\nstrategy = ["group"]\n'
    head = 'kind = "placement"\n' + (f"options = {value}\n" if not value.startswith("[[") else "")
    spec.write_text(head + grid + ("[[options]]\nx = 1\n" if value.startswith("[[") else ""))
    rc, _, err = run_cli("sweep", str(spec), "--out", str(spec.parent / "o"), check_rc=None, timeout=60,
                         address_space=LIMIT)
    one_line_refusal(rc, err, value)


@pytest.mark.parametrize("garbage", [b"\xff\xfe\x00garbage", b"a,b\n1,2\n", b'"unclosed\n', b""])
def test_a_sweep_folder_with_a_results_file_not_its_own_is_refused_not_overwritten(tmp_path, garbage):
    spec = tmp_path / "s.toml"
    spec.write_text('kind = "placement"\n[grid]\nmachines = [8]\nreplicas = [2]\nfailures = [2]\n'
                    'strategy = ["group"]\n')
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "results.csv").write_bytes(garbage)
    rc, _, err = run_cli("sweep", str(spec), "--out", str(tmp_path / "o"), check_rc=None, timeout=120,
                         address_space=LIMIT)
    if garbage:
        one_line_refusal(rc, err, garbage)
        assert (tmp_path / "o" / "results.csv").read_bytes() == garbage
    else:  # an empty file holds no rows: the sweep runs and writes it
        assert rc == 0, err


# values each within its range whose work together is not: refused in one line, from an estimate, before the work
# (or done within the limits)
@settings(max_examples=10, deadline=None)
@given(machines=st.sampled_from([1000, 1_000_000]), replicas=st.sampled_from([2, 20, 1000]),
       share=st.floats(0.01, 0.5), strategy=st.sampled_from(["group", "ring", "mixed"]))
def test_a_huge_placement_is_answered_or_refused_within_the_limits(machines, replicas, share, strategy):
    from conftest import gives_a_result_or_one_line

    replicas = min(replicas, machines)
    gives_a_result_or_one_line(["placement", "--machines", str(machines), "--replicas", str(replicas), "--strategy",
                                strategy, "--failures", str(max(replicas, int(machines * share)))], "huge")


@settings(max_examples=6, deadline=None)
@given(interval=st.sampled_from([1, 2_000, 10_000]), preset=st.sampled_from(["gemini-paper", "llama3-405b"]))
def test_a_long_interval_is_simulated_or_refused_within_the_limits(interval, preset):
    from conftest import gives_a_result_or_one_line

    gives_a_result_or_one_line(["interleave", "--preset", preset, "--schedule", "gemini", "--interval",
                                str(interval)], "interval")


def test_a_coupled_million_machine_cluster_and_a_plan_of_a_hundred_million_ranks_are_refused(tmp_path):
    text = (ROOT / "gemini_sim" / "cluster" / "presets" / "gemini-paper.toml").read_text()
    (tmp_path / "big.toml").write_text(text.replace("machines = 16", "machines = 1000000"))
    rc, _, err = run_cli("interleave", "--config", str(tmp_path / "big.toml"), "--schedule", "gemini", "--slow-nic",
                         "0.5", check_rc=None, timeout=60, address_space=LIMIT)
    one_line_refusal(rc, err, "slow nic")
    assert "simulate every machine" in err
    rc, err = runtime_command(["runtime", "plan", "--machines", "100000", "--procs", "1024", "-o",
                               str(tmp_path / "p.json")], tmp_path)
    one_line_refusal(rc, err, "ranks")
    assert "at most 1,048,576" in err and not (tmp_path / "p.json").exists()


def test_standard_output_as_an_output_file_is_refused_where_it_is_a_pipe(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gemini_sim.cli", "synth", "--synthetic", "burst", "--days", "2", "-o",
                        "/dev/stdout"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    one_line_refusal(r.returncode, r.stderr, "/dev/stdout")
    assert "is a pipe or a terminal" in r.stderr and Path("/dev/stdout").is_symlink()
