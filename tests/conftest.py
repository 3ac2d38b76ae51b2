import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "traces"


def load_example(example: str, module: str):
    """A module of an example (examples/EXAMPLE/MODULE.py), imported under a name of its own; its folder is on the
    path, as when the example runs as a script."""
    name = f"example_{example}_{module}"
    if name in sys.modules:
        return sys.modules[name]
    folder = ROOT / "examples" / example
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


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
