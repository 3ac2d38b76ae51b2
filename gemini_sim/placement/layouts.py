"""Placement of checkpoint replicas: for every machine, the set of machines whose CPU memory holds its checkpoint.

Strategies live in a registry (:data:`PLACEMENTS`); each is a pure function ``(machines, replicas, **options)`` that
returns a :class:`Placement`. Definitions follow the GEMINI paper (SOSP 2023, section on placement).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from gemini_sim.errors import UserError, unknown_name


@dataclass(frozen=True)
class Placement:
    strategy: str
    machines: int
    replicas: int
    holders: tuple[tuple[int, ...], ...]  # holders[i]: machines storing machine i's checkpoint, i first
    options: dict = field(default_factory=dict, compare=False)

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
        return self.lost(failed) == 0

    def lost(self, failed) -> int:
        """How many machines' checkpoints have no copy left outside ``failed``."""
        failed = set(failed)
        return sum(all(h in failed for h in self.holders[i]) for i in failed)


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


def structure(p: Placement) -> tuple[int, int]:
    """(groups of m, ring length) when ``p`` is a group/mixed/ring layout up to relabelling; used by exact counts."""
    n, m = p.machines, p.replicas
    if p.strategy == "ring":
        return 0, n
    if p.strategy in ("group", "mixed", "domain-aware"):
        if n % m == 0:
            return n // m, 0
        return n // m - 1, m + n % m
    raise ValueError(f"{p.strategy} has no group/ring structure")


def random(machines: int, replicas: int, seed: int = 0) -> Placement:
    """Every machine's checkpoint on itself and m-1 distinct peers drawn at random (seeded).

    Peers are drawn so that every machine also stores exactly m-1 others' checkpoints (a random m-regular layout:
    machine i's j-th replica goes to perm_j[i] for random derangement-like permutations), so memory stays balanced.
    """
    _check(machines, replicas)
    rng = np.random.default_rng(seed)
    n, m = machines, replicas
    for _ in range(1000):
        cols = [np.arange(n)]
        ok = True
        for _j in range(m - 1):
            for _try in range(200):
                perm = rng.permutation(n)
                if all(len({int(c[i]) for c in cols} | {int(perm[i])}) == len(cols) + 1 for i in range(n)):
                    cols.append(perm)
                    break
            else:
                ok = False
                break
        if ok:
            holders = tuple(tuple(int(c[i]) for c in cols) for i in range(n))
            return Placement("random", n, m, holders, {"seed": seed})
    raise UserError(f"random placement: could not draw {m - 1} distinct peers per machine for {n} machines")


def domains_of(machines: int, domains: int) -> tuple[int, ...]:
    """Failure domain of every machine: ``domains`` blocks of consecutive machines, sizes as equal as possible."""
    if not 1 <= domains <= machines:
        raise UserError(f"domains must be between 1 and machines ({machines}), got {domains}")
    return tuple(i * domains // machines for i in range(machines))


def domain_aware(machines: int, replicas: int, domains: int | None = None,
                 domain_of: tuple[int, ...] | None = None) -> Placement:
    """Replicas of a checkpoint in different failure domains whenever the domains allow it.

    Machines are taken round-robin across domains (first machine of each domain, then the second, ...), and mixed
    placement is applied in that order, so the m members of a group come from m different domains when there are at
    least m domains of similar size. With D domains of equal size and m | N this is the "jump" layout of NVIDIA's
    local checkpointing cliques (members n, n+J, ..., with J = N/D machines per domain apart).
    """
    _check(machines, replicas)
    if domain_of is None:
        domain_of = domains_of(machines, domains or replicas)
    if len(domain_of) != machines:
        raise UserError(f"domain map has {len(domain_of)} entries for {machines} machines")
    by_domain: dict[int, list[int]] = {}
    for i, d in enumerate(domain_of):
        by_domain.setdefault(d, []).append(i)
    queues = [by_domain[d] for d in sorted(by_domain)]
    # Largest domains first in each round, so the tail of the order does not pile up in one domain.
    order: list[int] = []
    depth = 0
    while len(order) < machines:
        for q in sorted(queues, key=len, reverse=True):
            if depth < len(q):
                order.append(q[depth])
        depth += 1
    base = mixed(machines, replicas)
    holders: list[tuple[int, ...]] = [()] * machines
    for pos, hs in enumerate(base.holders):
        holders[order[pos]] = tuple(order[h] for h in hs)
    return Placement("domain-aware", machines, replicas, tuple(holders),
                     {"domain_of": tuple(domain_of), "order": tuple(order)})


def hsdp(machines: int, replicas: int, groups: int) -> Placement:
    """The copies of an HSDP job where the replicas are: its ``groups`` replica groups of ``machines / groups``
    consecutive machines each hold every shard, machine i's shard at position i mod (machines / groups) of every
    group, so that position's machines (a *column*) hold the same shard. Machine i's checkpoint goes to ``replicas``
    machines of its column, placed over the column's machines as GEMINI places them over a cluster's (:func:`mixed`:
    groups of ``replicas`` where they divide ``groups``). Losing fewer whole groups than there are copies then loses
    no checkpoint. Not one of :data:`PLACEMENTS`: it needs the job's groups (``python -m runtime plan --hsdp``)."""
    _check(machines, replicas)
    if not 1 <= groups <= machines or machines % groups:
        raise UserError(f"HSDP's {groups} replica groups must divide the {machines} machines")
    if replicas > groups:
        raise UserError(f"{replicas} copies of every checkpoint, but HSDP's {groups} replica groups hold only {groups} "
                        f"of each shard")
    per_group = machines // groups
    within = mixed(groups, replicas).holders  # over a column's machines, by group
    holders = tuple(tuple(i % per_group + g * per_group for g in within[i // per_group]) for i in range(machines))
    return Placement("hsdp", machines, replicas, holders, {"groups": groups})


PLACEMENTS: dict[str, Callable[..., Placement]] = {
    "group": group, "mixed": mixed, "ring": ring, "random": random, "domain-aware": domain_aware,
}


AUTO = "auto"  # GEMINI's choice: group placement when m divides N, else mixed


def resolve(strategy: str, machines: int, replicas: int) -> str:
    """The strategy ``auto`` stands for (group when ``replicas`` divides ``machines``, else mixed); others as
    they are. The one place this rule lives."""
    if strategy == AUTO:
        return "group" if machines % replicas == 0 else "mixed"
    return strategy


MAX_COPIES = 20_000_000  # machines x replicas a placement lists (some 1 GB of Python lists at the most)


def build(strategy: str, machines: int, replicas: int, **options) -> Placement:
    """Build and validate a placement (``auto`` is resolved first). Options: ``seed`` (random), ``domains`` or
    ``domain_of`` (domain-aware). A placement lists every copy: more than :data:`MAX_COPIES` is refused before."""
    if machines * replicas > MAX_COPIES:
        raise UserError(f"a placement of {machines:,} machines x {replicas:,} copies lists {machines * replicas:,} "
                        f"copies; at most {MAX_COPIES:,}")
    strategy = resolve(strategy, machines, replicas)
    if strategy not in PLACEMENTS:
        raise unknown_name("placement strategy", strategy, PLACEMENTS)
    accepted = {"random": {"seed"}, "domain-aware": {"domains", "domain_of"}}.get(strategy, set())
    p = PLACEMENTS[strategy](machines, replicas, **{k: v for k, v in options.items() if k in accepted})
    check(p)
    return p


def for_preset(preset, replicas: int | None = None, strategy: str | None = None) -> Placement:
    """The placement a preset's cluster gets: ``strategy`` (default the preset's ``recovery.placement``; ``auto``
    resolved) with ``replicas`` copies (default the preset's), failure domains = the cluster's racks."""
    n = preset.cluster.machines
    m = replicas or preset.recovery.replicas
    per_rack = preset.cluster.machines_per_rack
    racks = -(-n // per_rack) if per_rack else preset.recovery.replicas
    return build(resolve(strategy or preset.recovery.placement, n, m), n, m, domains=min(racks, n), seed=0)


def check(p: Placement) -> None:
    """Every machine holds its own checkpoint first, plus exactly m-1 distinct peers; every machine stores m."""
    if len(p.holders) != p.machines:
        raise UserError(f"placement {p.strategy}: {len(p.holders)} holder sets for {p.machines} machines")
    for i, hs in enumerate(p.holders):
        if not hs or hs[0] != i:
            raise UserError(f"placement {p.strategy}: machine {i} does not hold its own checkpoint first")
        if len(set(hs)) != p.replicas or len(hs) != p.replicas:
            raise UserError(f"placement {p.strategy}: machine {i} has {len(set(hs))} distinct holders, "
                            f"expected {p.replicas}")
        if any(not 0 <= h < p.machines for h in hs):
            raise UserError(f"placement {p.strategy}: machine {i} has a holder outside 0..{p.machines - 1}")
    loads = [len(x) for x in p.stored_on()]
    if p.strategy != "random" and set(loads) != {p.replicas}:
        raise UserError(f"placement {p.strategy}: machines store {min(loads)}..{max(loads)} checkpoints, "
                        f"expected {p.replicas} each")


def replica_of(p: Placement, owner: int, holder: int) -> bool:
    """Does ``holder`` hold ``owner``'s checkpoint as an HSDP replica (placement :func:`hsdp`: a machine at the same
    position of another replica group, whose training state holds the same shard)? Such a copy costs only the
    owner's own part (its state that is not sharded: a few KB) in traffic and memory; the runtime builds the rest
    from the holder's own checkpoint (runtime/replicas.py)."""
    groups = p.options.get("groups") if p.strategy == "hsdp" else None
    return bool(groups) and holder != owner and (holder - owner) % (p.machines // groups) == 0


def memory_bytes(p: Placement, checkpoint_bytes: float, own_bytes: float = 0.0) -> list[float]:
    """For every machine, the bytes one checkpoint of every machine takes in its CPU memory: its own, and every
    copy it holds (``own_bytes`` of a copy it holds as an HSDP replica, :func:`replica_of`)."""
    out = [0.0] * p.machines
    for owner, hs in enumerate(p.holders):
        for h in hs:
            out[h] += own_bytes if replica_of(p, owner, h) else checkpoint_bytes
    return out


def check_memory(p: Placement, checkpoint_bytes_per_machine: float, cpu_memory_gb: float) -> float:
    """Raise if the busiest machine's checkpoints do not fit its CPU memory; return the GB it needs."""
    need = max(memory_bytes(p, checkpoint_bytes_per_machine)) / 1e9
    if need > cpu_memory_gb:
        raise UserError(f"placement {p.strategy} with {p.replicas} replicas needs {need:.1f} GB of CPU memory per "
                        f"machine, {need - cpu_memory_gb:.1f} GB more than the {cpu_memory_gb:g} GB configured")
    return need
