"""The Checkpointer's settings: one frozen :class:`Settings`, built in one place (:func:`resolve`) from the arguments
a script passes and the environment, and the rules a name must follow.

Every environment variable the runtime reads (docs/runtime.md, "Environment", lists them for users):

- ``GEMINI_PLAN``: the plan, where the script passes none.
- ``GEMINI_JOB``: the job's name (see "The job" in docs/runtime.md); else torchrun's ``--rdzv-id``; else the launch's
  own (torchrun ``--standalone``'s run id, or a name rank 0 makes), which no later launch resumes.
- ``GEMINI_STORE_ROOT``: where machines keep checkpoints in memory (default ``/dev/shm/gemini-UID``), a folder per
  job inside; ``GEMINI_MACHINE_ID``: the name of this node's store folder there (default ``node``: one node per
  host; give each node its own when several share a host).
- ``GEMINI_DURABLE_DIR``: where durable DCP checkpoints go (default ``./gemini-durable``), a folder per job inside.
- ``GEMINI_OUT_DIR``: profile and timings (default: not written).
- ``GEMINI_PREEMPT_GRACE_S``: on SIGTERM or SIGINT, write the newest checkpoint in memory durably within this many
  seconds, then let the signal go on (runtime/preempt.py; default: off).
- ``GEMINI_EVENTS``: ``1`` prints every event as a ``GEMINI {json}`` line on stdout (the agent reads them).
- ``GEMINI_BACKEND``: :func:`runtime.distributed.init`'s backend; ``GEMINI_HOST_RANKS``, ``GEMINI_HOST_RANK_BASE``:
  set by the agent where several machines share a host's GPUs.
- ``GEMINI_FAULT``: the project's fault tests only (runtime/testing/faults.py).
- From torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``, ``TORCHELASTIC_RUN_ID``, ``TORCHELASTIC_RESTART_COUNT``, ``TORCHELASTIC_MAX_RESTARTS``,
  ``TORCHELASTIC_USE_AGENT_STORE``.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .plan import Plan

# a job's or machine's name: it becomes a folder's name, so it is a name and nothing more
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class ConfigError(ValueError):
    """The Checkpointer cannot start as asked (one line)."""


def check_name(name: str, what: str) -> str:
    """``name`` if it is a name (letters, digits, '.', '_', '-'; 64 at most; not starting with '.', '_' or '-'),
    else a one-line :class:`ConfigError` saying so."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        shown = repr(name) if len(str(name)) <= 80 else repr(str(name)[:77]) + "..."
        raise ConfigError(f"{what} {shown} is not a name: use 1 to 64 letters, digits, '.', '_' or '-', starting with "
                          "a letter or digit")
    return name


def default_store_root() -> Path:
    """``/dev/shm/gemini-UID`` (under $TMPDIR or /tmp where there is no /dev/shm); jobs have folders inside."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))
    return base / f"gemini-{os.geteuid()}"


def resolve_store_root(value=None, env: Mapping[str, str] | None = None) -> Path:
    """The store root: ``value``, else ``$GEMINI_STORE_ROOT``, else :func:`default_store_root`."""
    env = os.environ if env is None else env
    return _path(value, env, "GEMINI_STORE_ROOT") or default_store_root()


class OneLineParser(argparse.ArgumentParser):
    """The runtime's commands' parser: a mistake is a :class:`ConfigError` of one line, ``PROG: error: ...``, not a
    usage block."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: error: {message}")


def job_from(env: Mapping[str, str]) -> tuple[str | None, bool]:
    """(the job's name, whether a user named it) from the environment: ``GEMINI_JOB``, else torchrun's
    ``--rdzv-id``; torchrun's ``--standalone`` run id (a UUID made per launch, kept across its restarts) names a job
    of that launch alone; None: no name at all (rank 0 makes one)."""
    if env.get("GEMINI_JOB"):
        return env["GEMINI_JOB"], True
    rid = env.get("TORCHELASTIC_RUN_ID", "")
    if rid in ("", "none"):
        return None, False
    return rid, not UUID.fullmatch(rid)


@dataclass(frozen=True)
class Settings:
    """Everything the Checkpointer was told, by its arguments or the environment, checked."""

    plan: Plan
    job: str | None  # None: not named; the Checkpointer has rank 0 make a name
    named: bool  # a user named the job (GEMINI_JOB, job=, --rdzv-id): a later launch of that name resumes it
    store_root: Path  # ROOT: the job's memory is in ROOT/JOB/machine-NAME
    durable_root: Path  # the job's durable checkpoints are in DURABLE/JOB
    out_dir: Path | None
    machine_id: str  # this node's store folder's name
    profile_iters: int
    checkpoint: bool
    host_cores: tuple[int, ...] | None
    timeout_s: float
    preempt_grace_s: float | None = None  # SIGTERM/SIGINT write memory's newest checkpoint durably (None: off)

    def store_dir(self, job: str) -> Path:
        return self.store_root / job

    def durable(self, job: str) -> Path:
        return self.durable_root / job


def _path(value, env: Mapping[str, str], name: str) -> Path | None:
    v = value if value is not None else env.get(name)
    return Path(v) if v else None


def resolve(plan=None, *, job: str | None = None, store_root=None, durable_dir=None, out_dir=None,
            profile_iters: int = 20, checkpoint: bool = True, host_cores=None, timeout_s: float = 120.0,
            preempt_grace_s: float | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """The settings from the arguments, and the environment for what they leave out; a mistake is a one-line
    :class:`ConfigError` (or :class:`~runtime.plan.PlanError`)."""
    env = os.environ if env is None else env
    if plan is None:
        plan = env.get("GEMINI_PLAN")
        if not plan:
            raise ConfigError("no plan: pass one (a path, a dict or a Plan) or set GEMINI_PLAN")
    if isinstance(profile_iters, bool) or not isinstance(profile_iters, int) or not 0 <= profile_iters <= 10**6:
        raise ConfigError(f"profile_iters must be a whole number from 0 to 1000000, got {profile_iters!r}")
    if isinstance(timeout_s, bool) or not (isinstance(timeout_s, (int, float)) and 0 < timeout_s < 1e6):
        raise ConfigError(f"timeout_s must be a positive number of seconds below 1e6, got {timeout_s!r}")
    if host_cores is not None:
        cores = list(host_cores)
        if not cores or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < 4096 for c in cores):
            raise ConfigError(f"host_cores must be core numbers from 0 to 4095, got {host_cores!r}")
        host_cores = tuple(sorted(set(cores)))
    if preempt_grace_s is None and env.get("GEMINI_PREEMPT_GRACE_S"):
        try:
            preempt_grace_s = float(env["GEMINI_PREEMPT_GRACE_S"])
        except ValueError:
            raise ConfigError(f"GEMINI_PREEMPT_GRACE_S must be a number of seconds, got "
                              f"{env['GEMINI_PREEMPT_GRACE_S']!r}") from None
    if preempt_grace_s is not None and (isinstance(preempt_grace_s, bool) or not isinstance(
            preempt_grace_s, (int, float)) or not 0 < preempt_grace_s <= 86400):
        raise ConfigError(f"preempt_grace_s must be a number of seconds above 0, up to 86400, got {preempt_grace_s!r}")
    named = True
    if job is None:
        job, named = job_from(env)
    if job is not None:
        check_name(job, "job name")
    machine_id = check_name(env.get("GEMINI_MACHINE_ID") or "node", "GEMINI_MACHINE_ID")
    return Settings(plan=Plan.coerce(plan), job=job, named=named,
                    store_root=resolve_store_root(store_root, env),
                    durable_root=_path(durable_dir, env, "GEMINI_DURABLE_DIR") or Path("gemini-durable"),
                    out_dir=_path(out_dir, env, "GEMINI_OUT_DIR"), machine_id=machine_id,
                    profile_iters=profile_iters, checkpoint=bool(checkpoint), host_cores=host_cores,
                    timeout_s=float(timeout_s),
                    preempt_grace_s=None if preempt_grace_s is None else float(preempt_grace_s))
