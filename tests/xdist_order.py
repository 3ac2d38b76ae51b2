"""Replay how pytest-xdist (--dist loadfile) hands make test's files to its workers, with the test times of a real
run, to compare orders: ``python tests/xdist_order.py LOG...``, each LOG the output of make test's pytest command run
with ``--durations=0``. Prints, per log, when each worker would finish in pytest-xdist's default order (files by
their number of tests) and in conftest.py's (LONGEST first).

The rules replayed are pytest-xdist 3.8's LoadScopeScheduling: each worker is given one file to start with, and
another whenever two or fewer of its tests are left to run; a test's time is its setup, call and teardown.
"""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def collected() -> list[str]:
    """The test ids make test collects, in the order conftest.py gives them."""
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--co", "-m", "not long",
                          "tests", "--nbmake", "notebooks"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [line.strip() for line in out.stdout.splitlines() if "::" in line]


def times_of(log: Path) -> dict[str, float]:
    times: dict[str, float] = {}
    for line in log.read_text().splitlines():
        if m := re.match(r"^([0-9.]+)s (?:call|setup|teardown)\s+(\S.*)$", line.strip()):
            times[m[2].strip()] = times.get(m[2].strip(), 0.0) + float(m[1])
    return times


def replay(ids: list[str], times: dict[str, float], by_count: bool, workers: int = 2) -> list[float]:
    files: dict[str, list[str]] = {}
    for nid in ids:
        files.setdefault(nid.split("::")[0], []).append(nid)
    queue = sorted(files.values(), key=len, reverse=True) if by_count else list(files.values())
    todo: list[list[str]] = [[] for _ in range(workers)]
    clock = [0.0] * workers

    def give(w: int) -> None:
        if queue and len(todo[w]) <= 2:
            todo[w].extend(queue.pop(0))

    for _ in range(2):  # a file each to start with, then another for a worker with two tests or fewer
        for w in range(workers):
            give(w)
    while any(todo):
        w = min((w for w in range(workers) if todo[w]), key=clock.__getitem__)
        clock[w] += times.get(todo[w].pop(0), 0.0)
        give(w)
    return clock


def main(logs: list[str]) -> None:
    ours = collected()
    # pytest's own order, before conftest.py's: tests/ then notebooks/, files by name, each file's tests as written
    theirs = sorted(ours, key=lambda nid: (not nid.startswith("tests/"), nid.split("::")[0]))
    for log in logs:
        times = times_of(Path(log))
        print(f"{log}: {sum(times.values()):.0f} s of tests; the workers end at "
              f"{', '.join(f'{t:.0f}' for t in replay(theirs, times, by_count=True))} s in pytest-xdist's order, "
              f"{', '.join(f'{t:.0f}' for t in replay(ours, times, by_count=False))} s in conftest.py's")


if __name__ == "__main__":
    main(sys.argv[1:])
