import atexit
import gc
import importlib.util
import os
import sys
from pathlib import Path

import pytest

from cli_runner import Runner

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "traces"
# every Python process the tests start (the runtime's jobs: 8 processes that import torch in a 4-machine job) exits
# without walking its objects in a last garbage collection (quick_exit/sitecustomize.py); this one too
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent / "quick_exit"),
                                                         os.environ.get("PYTHONPATH")]))
atexit.register(gc.freeze)


def _fsdp_trains() -> tuple[bool, bool, str]:
    """(FSDP2 trains on this torch's CPU, a GPU is here, torch's version)."""
    try:
        import torch
        from runtime.distributed import fsdp_trains_on_cpu
    except ImportError:  # the simulator's tests need no torch
        return False, False, "not installed"
    return fsdp_trains_on_cpu(), torch.cuda.is_available(), torch.__version__


_FSDP_CPU, _GPU, _TORCH = _fsdp_trains()
# tests that train an FSDP2 model on the CPU; the examples train on a GPU where there is one
needs_fsdp_on_cpu = pytest.mark.skipif(not _FSDP_CPU, reason=f"FSDP2 trains on the CPU from torch 2.7 (torch {_TORCH})")
needs_fsdp = pytest.mark.skipif(not (_FSDP_CPU or _GPU), reason=f"FSDP2 trains on the CPU from torch 2.7 (torch "
                                                                f"{_TORCH}) and there is no GPU")


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


# make test's longest files and their summed test time in seconds (pytest --durations=0 on the 2-core CI host,
# 2026-12-03), run longest first; the others follow in their own order. pytest-xdist hands whole files to the two
# workers in this order (the Makefile's --no-loadscope-reorder: by default it orders files by their number of tests,
# which left test_torchrun, two tests of a minute each, running alone at the end). Replaying pytest-xdist's
# hand-out (tests/xdist_order.py) with the per-test times of three runs: the slower worker ends at 533, 567 and 611 s
# this way, at 575, 611 and 648 s in the default order (the replay came within 10-25 s of the runs it replayed).
LONGEST = {"tests/test_faults_mlp.py": 385, "tests/test_calibrate.py": 193, "tests/test_faults_shared_machine.py": 149,
           "tests/test_torchrun.py": 119, "tests/test_agent.py": 110, "tests/test_hsdp.py": 60,
           "notebooks/interleaving.ipynb": 41,
           "tests/test_faults_tinygpt.py": 34, "tests/test_fuzz_readers.py": 28, "notebooks/plan.ipynb": 23,
           "tests/test_inputs.py": 22}


@pytest.hookimpl(tryfirst=True)  # before -m selects by marks
def pytest_collection_modifyitems(items):
    """A test module names in LONG the tests it shares with another module (the fault matrix on each example) that
    `make test` runs only there: they are marked ``long``, and `make test-long` runs them too. The files of LONGEST
    go first, longest first."""
    if missing := [name for name in LONGEST if not (ROOT / name).is_file()]:
        raise pytest.UsageError(f"conftest.LONGEST names no file: {missing}")
    items.sort(key=lambda item: -LONGEST.get(item.nodeid.split("::")[0], 0))
    for item in items:
        long = getattr(getattr(item, "module", None), "LONG", ())  # a notebook has no module
        if not long:
            continue
        if unknown := [name for name in long if not callable(getattr(item.module, name, None))]:
            raise pytest.UsageError(f"{item.module.__name__}.LONG names no test: {unknown}")
        if item.originalname in long:
            item.add_marker(pytest.mark.long)


CLI = Runner()
atexit.register(CLI.close)


def run_cli(*args, check_rc: int | None = 0, timeout: float = 300, address_space: int | None = None):
    """Run the real ``gemini-sim`` command line in a process of its own (tests/cli_runner.py), within ``timeout``
    seconds and, if given, ``address_space`` bytes; return (rc, stdout, stderr)."""
    proc = CLI.run(args, ROOT, timeout, address_space)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc.returncode, proc.stdout, proc.stderr


def gives_a_result_or_one_line(argv, *context) -> None:
    """What every command promises for any input: exit 0, or exit 2 with one line ``gemini-sim: error: ...``; and
    within 120 s and 4 GiB of address space. ``context`` goes into the failure message."""
    rc, _, err = run_cli(*argv, check_rc=None, timeout=120, address_space=4 << 30)
    assert rc in (0, 2), (argv, *context, rc, err[-800:])
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gemini-sim: error:"), (argv, *context, err[-800:])


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def world1():
    """A one-rank gloo process group in this process (the Checkpointer's own tests)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
