"""Placement of checkpoint replicas: for every machine, the set of machines whose CPU memory holds its checkpoint.

Strategies live in a registry (:data:`STRATEGIES`); each is a pure function ``(machines, replicas, **options)`` that
returns a :class:`Placement`. Definitions follow the GEMINI paper (SOSP 2023, section on placement).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import UserError, unknown_name


@dataclass(frozen=True)
class Placement:
    strategy: str
    machines: int
    replicas: int
    holders: tuple[tuple[int, ...], ...]  # holders[i]: machines storing machine i's checkpoint, i first

    def stored_on(self) -> list[list[int]]:
        """For every machine, the machines whose checkpoints it stores (its own included)."""
        out: list[list[int]] = [[] for _ in range(self.machines)]
        for owner, hs in enumerate(self.holders):
            for h in hs:
                out[h].append(owner)
        return out

    def survives(self, failed) -> bool:
        """True when every machine's checkpoint still has a copy on a machine not in ``failed``.

        Every machine holds its own checkpoint, so only the failed machines' checkpoints can be gone.
        """
        failed = set(failed)
        return all(any(h not in failed for h in self.holders[i]) for i in failed)


def _check(machines: int, replicas: int) -> None:
    if replicas < 1:
        raise UserError(f"replicas must be >= 1, got {replicas}")
    if machines < replicas:
        raise UserError(f"replicas ({replicas}) must not exceed machines ({machines})")


def group(machines: int, replicas: int) -> Placement:
    """N/m groups of m consecutive machines; every member stores the checkpoints of all members."""
    _check(machines, replicas)
    if machines % replicas:
        raise UserError(f"group placement needs machines ({machines}) to be a multiple of replicas ({replicas}); "
                        f"use 'mixed'")
    holders = []
    for i in range(machines):
        g = i - i % replicas
        holders.append((i,) + tuple(j for j in range(g, g + replicas) if j != i))
    return Placement("group", machines, replicas, tuple(holders))


def _ring_over(members: list[int], replicas: int) -> dict[int, tuple[int, ...]]:
    n = len(members)
    return {members[a]: tuple(members[(a + d) % n] for d in range(replicas)) for a in range(n)}


def ring(machines: int, replicas: int) -> Placement:
    """Machine i's checkpoint on machines i, i+1, ..., i+m-1 (mod N)."""
    _check(machines, replicas)
    r = _ring_over(list(range(machines)), replicas)
    return Placement("ring", machines, replicas, tuple(r[i] for i in range(machines)))


def mixed(machines: int, replicas: int) -> Placement:
    """GEMINI's mixed placement: floor(N/m)-1 groups of m, then ring placement over the last m + (N mod m)."""
    _check(machines, replicas)
    m = replicas
    if machines % m == 0:
        return Placement("mixed", machines, m, group(machines, m).holders)
    n_groups = machines // m - 1
    holders = list(group(n_groups * m, m).holders) if n_groups else []
    tail = _ring_over(list(range(n_groups * m, machines)), m)
    holders += [tail[i] for i in range(n_groups * m, machines)]
    return Placement("mixed", machines, m, tuple(holders))


STRATEGIES: dict[str, Callable[..., Placement]] = {"group": group, "mixed": mixed, "ring": ring}


def build(strategy: str, machines: int, replicas: int, **options) -> Placement:
    if strategy not in STRATEGIES:
        raise unknown_name("placement strategy", strategy, STRATEGIES)
    return STRATEGIES[strategy](machines, replicas, **options)
