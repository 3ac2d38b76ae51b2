"""A job: what a relaunch resumes, its record, its end, and the memory jobs hold on a host.

A job is known by its name (runtime/config.py: ``GEMINI_JOB``, ``job=``, torchrun's ``--rdzv-id``, else the launch's
own). The name keys everything the job keeps: its memory (``STORE_ROOT/JOB/machine-NAME``) and its durable
checkpoints (``DURABLE/JOB/step-N``), so two jobs never read each other's state, whatever folders they share. Its
record, ``DURABLE/JOB/job.json``, says how it was laid out and whether it finished:

- a launch under a name that has no record starts afresh;
- a launch under the name of a job that did not finish resumes it, from the newest complete copy;
- a launch under the name of a finished job says so and resumes from its final checkpoint, which the finish wrote
  durably (it trains on only where its loop goes further);
- a launch with another layout (machines x processes) than the record's resumes it all the same, resharded from
  memory or durable storage (runtime/sources.py), and the record notes the change.

A clean finish (:meth:`runtime.Checkpointer.close`) writes the final iteration durably, marks the record finished and
frees the job's memory on every machine. What a crashed job leaves in memory stays, for a relaunch to resume;
``python -m runtime jobs`` lists what every job holds in a store root and ``python -m runtime free JOB`` frees it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .files import write_atomic

RECORD = "job.json"


def _write(durable: Path, rec: dict) -> None:
    write_atomic(Path(durable) / RECORD, json.dumps(rec, indent=1))


def read_record(durable: Path) -> dict | None:
    """The job's record, or None where there is none (or it cannot be read: a new record replaces it)."""
    try:
        rec = json.loads((Path(durable) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())


def begin(durable: Path, job: str, machines: int, ppm: int) -> dict:
    """Rank 0, at start: the job's record, written if new; a launch of another layout than the record's is recorded
    (``resized``): the job goes on, resharded (runtime/sources.py)."""
    rec = read_record(durable)
    if rec is None:
        rec = {"job": job, "machines": machines, "processes_per_machine": ppm, "created": _now(), "finished": None}
        _write(durable, rec)
    elif (rec.get("machines"), rec.get("processes_per_machine")) != (machines, ppm):
        change = {"at": _now(), "from": [rec.get("machines"), rec.get("processes_per_machine")], "to": [machines, ppm]}
        rec = dict(rec, machines=machines, processes_per_machine=ppm, resized=rec.get("resized", []) + [change])
        _write(durable, rec)
    return rec


def finish(durable: Path, rec: dict, iteration: int) -> dict:
    """Rank 0, at a clean finish: the record says the job finished at ``iteration``."""
    rec = dict(rec, finished={"iteration": iteration, "at": _now()})
    _write(durable, rec)
    return rec


def reopen(durable: Path, rec: dict) -> dict:
    """A finished job trains on: its record is open again until its next finish."""
    rec = dict(rec, finished=None)
    _write(durable, rec)
    return rec


# -- memory on a host ----------------------------------------------------------------------------------------------
def held_bytes(folder: Path) -> int:
    """Bytes of memory the files under ``folder`` take (their allocated blocks)."""
    total = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                continue
    return total


@dataclass(frozen=True)
class Held:
    """What one job holds in a store root."""

    job: str
    machines: tuple[str, ...]  # its machines' store folders here
    bytes: int
    newest: int | None  # its newest iteration held here
    modified: float  # when its memory last changed (seconds since the epoch)


def jobs(store_root: Path) -> list[Held]:
    """Every job with memory in ``store_root``, the largest first."""
    out = []
    root = Path(store_root)
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.is_symlink():
            continue
        machines = tuple(sorted(m.name for m in d.glob("machine-*") if m.is_dir()))
        its = [int(p.name.split("-")[1]) for p in d.glob("machine-*/iter-*") if p.name.split("-")[1].isdigit()]
        try:
            modified = max([p.stat().st_mtime for p in d.glob("machine-*/*")] + [d.stat().st_mtime])
        except OSError:
            continue
        out.append(Held(d.name, machines, held_bytes(d), max(its) if its else None, modified))
    return sorted(out, key=lambda h: -h.bytes)


def users(folder: Path) -> list[int]:
    """Processes (of this user) that have a file under ``folder`` open or mapped."""
    folder = str(Path(folder).resolve())
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            paths = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
            paths += [line.split(maxsplit=5)[5] for line in (proc / "maps").read_text().splitlines()
                      if len(line.split(maxsplit=5)) == 6]
        except OSError:
            continue
        if any(p == folder or p.startswith(folder + "/") for p in paths):
            found.append(int(proc.name))
    return found


def free(folder: Path) -> None:
    """Remove a job's (or one machine's) memory."""
    shutil.rmtree(folder, ignore_errors=True)
