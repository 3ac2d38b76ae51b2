import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "traces"


def run_cli(*args, check_rc: int | None = 0):
    """Run the real ``gemini-sim`` entry point in a subprocess; return (rc, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "gemini_sim.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def cli():
    return run_cli
