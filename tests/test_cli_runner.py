"""The tests' way of running the command line (tests/cli_runner.py) gives what a plain subprocess gives."""

import subprocess
import sys

import pytest

from conftest import ROOT, run_cli


@pytest.mark.parametrize("argv", [
    ["placement", "--machines", "8", "--replicas", "2", "--failures", "2", "--json"],  # a result on stdout
    ["placement", "--machines", "x"],  # a user's mistake: exit 2, one line on stderr
    ["no-such-command"],
])
def test_a_run_gives_what_python_m_gives(argv):
    plain = subprocess.run([sys.executable, "-m", "gemini_sim.cli", *argv], capture_output=True, text=True, cwd=ROOT,
                           timeout=120)
    assert run_cli(*argv, check_rc=None) == (plain.returncode, plain.stdout, plain.stderr)


def test_limits_apply_to_the_run():
    with pytest.raises(subprocess.TimeoutExpired):
        run_cli("interleave", "--preset", "gemini-paper", "--schedule", "gemini", timeout=0.01)
    rc, _, err = run_cli("placement", "--machines", "8", "--replicas", "2", "--failures", "2", check_rc=None,
                         address_space=64 << 20)  # below what numpy alone maps
    assert rc == 1 and "MemoryError" in err
    assert run_cli("placement", "--machines", "8", "--replicas", "2", "--failures", "2")[0] == 0  # the server lives
