"""The runtime's view of a Plan (the JSON contract written by ``gemini-sim plan``; schema and checks in
``gemini_sim/plan.py``): who holds whose checkpoint, the schedule, the intervals, the recovery order.

The runtime reads ``gemini_sim`` only through the Plan and its vocabulary, nothing else of the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gemini_sim.files import load_json
from gemini_sim import plan as contract

from . import schedules


class PlanError(ValueError):
    """The plan cannot be run here (one line)."""


def _one_line(fn, *args, prefix: str = ""):
    """``fn(*args)``, its ValueError (the contract's UserError among them) turned into a :class:`PlanError`."""
    try:
        return fn(*args)
    except ValueError as e:
        raise PlanError(f"{prefix}{e}") from None


@dataclass(frozen=True)
class Plan:
    data: dict
    source: str = "plan"

    @classmethod
    def load(cls, path) -> "Plan":
        """Read and validate a plan file; a bad one is a one-line :class:`PlanError`."""
        return cls.of(_one_line(load_json, path, "plan"), str(path))

    @classmethod
    def of(cls, data: dict, source: str = "plan") -> "Plan":
        """A plan from parsed JSON, validated against the contract and what the runtime runs."""
        _one_line(contract.validate, data, source)
        _one_line(schedules.get, data["schedule"]["name"], prefix=f"{source}: ")
        return cls(data, source)

    @classmethod
    def coerce(cls, plan) -> "Plan":
        """A :class:`Plan` from a Plan, a path or a parsed dict."""
        if isinstance(plan, Plan):
            return plan
        if isinstance(plan, dict):
            return cls.of(plan)
        if isinstance(plan, (str, Path)):
            return cls.load(plan)
        raise PlanError(f"plan must be a Plan, a path or a dict, not {type(plan).__name__}")

    # -- what the runtime reads ----------------------------------------------------------------------------------
    @property
    def machines(self) -> int:
        return self.data["cluster"]["machines"]

    @property
    def processes_per_machine(self) -> int:
        return self.data["cluster"]["processes_per_machine"]

    @property
    def holders(self) -> list[list[int]]:
        return [list(h) for h in self.data["placement"]["holders"]]

    @property
    def replica_groups(self) -> int | None:
        """An HSDP job's replica groups (``placement.replica_groups``), None for another job."""
        return self.data["placement"].get("replica_groups")

    def replica(self, a: int, b: int) -> bool:
        """Do ranks ``a`` and ``b`` hold the same DTensor pieces: the same position in two HSDP replica groups (the
        same local rank on machines at the same position of their groups)?"""
        groups, ppm = self.replica_groups, self.processes_per_machine
        if not groups or a == b or a % ppm != b % ppm:
            return False
        per = self.machines // groups
        return (a // ppm) % per == (b // ppm) % per

    @property
    def schedule(self) -> dict:
        return self.data["schedule"]

    @property
    def interval(self) -> int:
        return self.data["checkpoint"]["interval_iters"]

    @property
    def persist_interval(self) -> int:
        return self.data["checkpoint"]["persist_interval_iters"]

    @property
    def keep(self) -> int:
        return self.data["checkpoint"]["keep"]

    def peers(self, rank: int) -> tuple[list[int], list[int]]:
        """Ranks ``rank`` sends its shard to, and ranks whose shards it keeps: the same local rank on the machines
        the placement names."""
        ppm = self.processes_per_machine
        me, local = divmod(rank, ppm)
        holders = self.holders
        send = holders[me][1:]
        recv = [j for j, hs in enumerate(holders) if j != me and me in hs]
        return [m * ppm + local for m in send], [m * ppm + local for m in recv]

    def held_on(self, machine: int) -> list[int]:
        """Ranks whose shards ``machine``'s store holds: each of its ranks' own, and those they receive."""
        ppm = self.processes_per_machine
        mine = range(machine * ppm, (machine + 1) * ppm)
        return sorted({r for rank in mine for r in [rank] + self.peers(rank)[1]})

    def retrieval_order(self, owner_machine: int) -> list[int]:
        """Machines to fetch ``owner_machine``'s shards from: itself and its holders first, then any other."""
        first = self.holders[owner_machine]
        return first + [m for m in range(self.machines) if m not in first]

    def with_schedule(self, schedule: dict) -> "Plan":
        """The same plan with another schedule (runs side by side: calibration)."""
        return Plan.of(dict(self.data, schedule=schedule), self.source)


def default(machines: int, processes_per_machine: int, replicas: int = 2, interval: int = 1,
            persist: int = contract.DEFAULT_PERSIST, schedule: str = "naive", hsdp: int | None = None) -> Plan:
    """GEMINI's placement (group when ``replicas`` divides ``machines``, else mixed), a checkpoint every
    ``interval`` iterations, a durable one every ``persist``; ``hsdp=R``: an HSDP job's R replica groups, its copies
    where the replicas are (gemini_sim/placement/layouts.py: ``hsdp``)."""
    return Plan.of(contract.default(machines, processes_per_machine, replicas=replicas, interval=interval,
                                    persist=persist, schedule=schedule, hsdp=hsdp), "default plan")


def resized(plan: Plan, machines: int) -> Plan:
    """A plan like ``plan`` for ``machines`` machines: GEMINI's placement for them, as many copies (at most one a
    machine), the same processes per machine, schedule, chunks and intervals (a job that goes on after losing
    machines, or grows)."""
    replicas = min(len(plan.holders[0]), machines)
    return Plan.of(contract.default(machines, plan.processes_per_machine, replicas=replicas, interval=plan.interval,
                                    persist=plan.persist_interval, schedule=plan.schedule["name"],
                                    chunk_bytes=plan.schedule["chunk_bytes"]), f"{plan.source} for {machines} machines")
