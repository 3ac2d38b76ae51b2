"""Probability of recovering from CPU memory after failures, exactly where failures are uniform.

k machines fail at once, uniformly at random among N. Recovery from CPU memory works when every machine's
checkpoint still has a copy on a surviving machine, i.e. no holder set lies inside the failed set. We count the
k-subsets of machines that contain no holder set, exactly, in integers:

- group (N/m disjoint groups): inclusion-exclusion over fully failed groups;
- ring (N machines on a cycle, holder sets are windows of m): k-subsets of a cycle with no run of m;
- mixed: groups and a ring of m + (N mod m), convolved over how many failures hit the ring;
- domain-aware: a mixed layout over relabelled machines; uniform failures do not see labels, same count;
- random, m = 2: holder sets are the edges of a graph, so the count is the number of independent k-sets,
  computed by a tree DP over a spanning forest with the few extra edges conditioned on;
- anything else: enumeration when C(N, k) is small, else Monte Carlo (stated in the result's ``method``).

Exact counts become probabilities as ``fractions.Fraction`` and are rounded to float once, at the end.
Correlated failures (domain bursts, replayed traces) use Monte Carlo with a 95% Wilson interval.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import networkx as nx
import numpy as np

from gemini_sim.errors import UserError
from gemini_sim.placement.layouts import Placement, structure

BRUTE_FORCE_LIMIT = 200_000  # largest C(N, k) enumerated for placements with no counting method
# Work bounded before it is done. The exact counts add up big integers of some N bits, one term per group (or
# ring gap) that may fail whole: measured on the 2-core host, 0.25-0.3 ns per term x N^1.585 (Karatsuba's
# multiplication), so this budget is about a minute. Monte Carlo draws k of N machines per sample.
EXACT_BUDGET = 2e11
SAMPLE_BUDGET = 2e9  # samples x machines


@dataclass(frozen=True)
class Recovery:
    strategy: str
    machines: int
    replicas: int
    failures: int
    probability: float
    method: str  # "exact" or "monte-carlo"
    ci95: tuple[float, float] | None = None
    samples: int = 0
    exact: Fraction | None = None
    expected_lost_checkpoints: float = 0.0  # E[number of machines whose every copy is gone]

    def as_dict(self) -> dict:
        d = {"strategy": self.strategy, "machines": self.machines, "replicas": self.replicas,
             "failures": self.failures, "probability": self.probability, "method": self.method,
             "expected_lost_checkpoints": self.expected_lost_checkpoints}
        if self.ci95 is not None:
            d["ci95"] = list(self.ci95)
            d["samples"] = self.samples
        return d


# -- counting ----------------------------------------------------------------------------------------------------
def _bounded_compositions(total: int, parts: int, cap: int) -> int:
    """Ways to write ``total`` as an ordered sum of ``parts`` integers in [0, cap]."""
    if parts == 0:
        return int(total == 0)
    if total < 0 or total > parts * cap:
        return 0
    out = 0
    for j in range(min(parts, total // (cap + 1)) + 1):
        out += (-1) ** j * math.comb(parts, j) * math.comb(total - j * (cap + 1) + parts - 1, parts - 1)
    return out


@lru_cache(maxsize=None)
def ring_safe(n: int, k: int, m: int) -> int:
    """k-subsets of a cycle of n machines with no m cyclically consecutive machines all chosen."""
    if k < 0 or k > n:
        return 0
    if k == n:
        return int(n < m)
    z = n - k  # survivors split the cycle into z gaps of failed machines, each at most m-1 long
    # (subset, marked survivor) pairs = n * compositions (rotate so the marked survivor is first)
    pairs = n * _bounded_compositions(k, z, m - 1)
    assert pairs % z == 0
    return pairs // z


def groups_safe(groups: int, m: int, k: int) -> int:
    """k-subsets of ``groups`` disjoint groups of m machines with no group entirely chosen."""
    n = groups * m
    if k < 0 or k > n:
        return 0
    return sum((-1) ** j * math.comb(groups, j) * math.comb(n - j * m, k - j * m)
               for j in range(min(groups, k // m) + 1))


def structured_safe(groups: int, ring: int, m: int, k: int) -> int:
    if ring == 0:
        return groups_safe(groups, m, k)
    if groups == 0:
        return ring_safe(ring, k, m)
    return sum(ring_safe(ring, f, m) * groups_safe(groups, m, k - f)
               for f in range(max(0, k - groups * m), min(ring, k) + 1))


def _independent_sets_by_size(graph: nx.Graph, kmax: int) -> list[int]:
    """Number of independent sets of each size 0..kmax (the truncated independence polynomial)."""
    total = [1] + [0] * kmax
    for comp in nx.connected_components(graph):
        sub = graph.subgraph(comp)
        tree = nx.minimum_spanning_tree(sub) if sub.number_of_edges() else sub
        extra = [e for e in sub.edges() if not tree.has_edge(*e)]
        # Condition on the endpoints of the extra (non-tree) edges: at most one per component for m=2 random.
        pinned = sorted({v for e in extra for v in e})
        comp_poly = [0] * (kmax + 1)
        for states in itertools.product((0, 1), repeat=len(pinned)):
            forced = dict(zip(pinned, states))
            if any(forced[u] and forced[v] for u, v in extra):
                continue
            poly = _tree_poly(tree, next(iter(comp)), forced, kmax)
            comp_poly = [a + b for a, b in zip(comp_poly, poly)]
        total = _mul(total, comp_poly, kmax)
    return total


def _mul(a: list[int], b: list[int], kmax: int) -> list[int]:
    out = [0] * (kmax + 1)
    for i, x in enumerate(a):
        if x:
            for j, y in enumerate(b[: kmax + 1 - i]):
                out[i + j] += x * y
    return out


def _tree_poly(tree: nx.Graph, root, forced: dict, kmax: int) -> list[int]:
    """Independence polynomial of a tree with some vertices forced in (1) or out (0)."""
    order = list(nx.dfs_preorder_nodes(tree, root))
    parent = {root: None}
    for u in order:
        for v in tree.neighbors(u):
            if v not in parent:
                parent[v] = u
    out_poly: dict = {}
    in_poly: dict = {}
    for u in reversed(order):
        p_out, p_in = [1] + [0] * kmax, [0, 1] + [0] * (kmax - 1) if kmax >= 1 else [0]
        for v in tree.neighbors(u):
            if parent.get(v) == u:
                p_out = _mul(p_out, [a + b for a, b in zip(out_poly[v], in_poly[v])], kmax)
                p_in = _mul(p_in, out_poly[v], kmax)
        if forced.get(u) == 1:
            p_out = [0] * (kmax + 1)
        elif forced.get(u) == 0:
            p_in = [0] * (kmax + 1)
        out_poly[u], in_poly[u] = p_out, p_in
    return [a + b for a, b in zip(out_poly[root], in_poly[root])]


def _pairs_graph(p: Placement) -> nx.Graph:
    g = nx.Graph()
    g.add_nodes_from(range(p.machines))
    g.add_edges_from(tuple(hs) for hs in p.holders)
    return g


def safe_count(p: Placement, k: int) -> int | None:
    """Exact number of k-subsets whose failure keeps a copy of every checkpoint, or None if no method applies."""
    n, m = p.machines, p.replicas
    if k < m:
        return math.comb(n, k)
    if k > n:
        return 0
    method = safe_count_method(p, k)
    if method == "closed form":
        groups, ring = structure(p)
        return structured_safe(groups, ring, m, k)
    if method == "graph":
        return int(k == 0) if m == 1 else _independent_sets_by_size(_pairs_graph(p), k)[k]
    return brute_force_safe(p, k) if method == "enumeration" else None


def _is_structured(p: Placement) -> bool:
    """Domain-aware placements are mixed layouts in another order; check rather than trust the label."""
    if p.strategy != "domain-aware":
        return True
    from gemini_sim.placement.layouts import mixed

    order = p.options.get("order")
    if order is None:
        return False
    base = mixed(p.machines, p.replicas)
    return all(tuple(order[h] for h in hs) == p.holders[order[pos]] for pos, hs in enumerate(base.holders))


def brute_force_safe(p: Placement, k: int) -> int:
    """Enumerate every k-subset (tests and small cases)."""
    masks = [sum(1 << h for h in hs) for hs in p.holders]
    count = 0
    for combo in itertools.combinations(range(p.machines), k):
        f = sum(1 << c for c in combo)
        count += all(mask & ~f for mask in masks)
    return count


# -- probabilities -----------------------------------------------------------------------------------------------
def expected_lost_checkpoints(n: int, m: int, k: int) -> float:
    """E[machines whose m copies all failed] = N * C(N-m, k-m) / C(N, k); the same for every placement."""
    if k < m:
        return 0.0
    return float(Fraction(n * math.comb(n - m, k - m), math.comb(n, k)))


def wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    phat = successes / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def monte_carlo(p: Placement, sample_failed, samples: int = 20_000, seed: int = 0, failures: int = -1) -> Recovery:
    """Estimate the recovery probability from ``sample_failed(rng) -> set of failed machines``."""
    rng = np.random.default_rng(seed)
    lost = np.array([p.lost(sample_failed(rng)) for _ in range(samples)])
    ok = int((lost == 0).sum())
    return Recovery(p.strategy, p.machines, p.replicas, failures, ok / samples, "monte-carlo",
                    wilson(ok, samples), samples, expected_lost_checkpoints=float(lost.mean()))


def exact_work(p: Placement, k: int) -> float:
    """The work of the exact count for k failures, in :data:`EXACT_BUDGET`'s units (0: little or none)."""
    n, m = p.machines, p.replicas
    if k < m or k > n or p.strategy not in ("group", "mixed", "ring", "domain-aware"):
        return 0.0
    groups, ring = structure(p)
    ring_terms = k // max(1, m - 1) + 1
    terms = (ring_terms if groups == 0 else min(groups, k // m) + 1 if ring == 0
             else (min(ring, k) + 1) * (min(groups, k // m) + 1 + ring_terms))
    return terms * float(n) ** 1.585


def check_work(p: Placement, k: int, samples: int) -> None:
    """Refuse, in one line and before any of it, work beyond the budgets (see :data:`EXACT_BUDGET`)."""
    work = exact_work(p, k)
    if work > EXACT_BUDGET:
        raise UserError(f"the exact P(recover) of {p.machines:,} machines, {p.replicas} copies and {k:,} failures adds "
                        f"big integers of {p.machines:,} bits some {work / EXACT_BUDGET:,.0f} times longer than the "
                        f"budget (about a minute): ask fewer machines or failures")
    if samples * p.machines > SAMPLE_BUDGET and safe_count_method(p, k) is None:
        raise UserError(f"{samples:,} Monte Carlo samples of {p.machines:,} machines exceed the budget of "
                        f"{SAMPLE_BUDGET:,.0f} machine draws: ask fewer samples or machines")


def safe_count_method(p: Placement, k: int) -> str | None:
    """How :func:`safe_count` counts (None: it cannot, Monte Carlo then)."""
    n, m = p.machines, p.replicas
    if k < m or k > n or (p.strategy in ("group", "mixed", "ring", "domain-aware") and _is_structured(p)):
        return "closed form"
    if m in (1, 2):
        return "graph"
    return "enumeration" if math.comb(n, k) <= BRUTE_FORCE_LIMIT else None


def probability(p: Placement, k: int, samples: int = 20_000, seed: int = 0) -> Recovery:
    """P(every checkpoint survives) when k machines fail uniformly at random: exact whenever a method exists."""
    if not 0 <= k <= p.machines:
        raise UserError(f"failures ({k}) must be between 0 and machines ({p.machines})")
    check_work(p, k, samples)
    count = safe_count(p, k)
    if count is None:
        return monte_carlo(p, lambda rng: rng.choice(p.machines, k, replace=False).tolist(), samples, seed, k)
    exact = Fraction(count, math.comb(p.machines, k))
    return Recovery(p.strategy, p.machines, p.replicas, k, float(exact), "exact", exact=exact,
                    expected_lost_checkpoints=expected_lost_checkpoints(p.machines, p.replicas, k))


def burst_sampler(domain_of: tuple[int, ...], k: int):
    """Failures in domain bursts: whole domains fail, in random order, until k machines are down."""
    members: dict[int, list[int]] = {}
    for i, d in enumerate(domain_of):
        members.setdefault(d, []).append(i)
    doms = list(members)

    def sample(rng):
        failed: list[int] = []
        for d in rng.permutation(len(doms)):
            for machine in members[doms[d]]:
                if len(failed) == k:
                    return failed
                failed.append(machine)
        return failed

    return sample


def paper_lower_bound(n: int, m: int, k: int) -> float:
    """GEMINI's lower bound for group placement (m | N): max(0, 1 - N C(N-m, k-m) / (m C(N, k)))."""
    if k < m:
        return 1.0
    return max(0.0, 1 - n * math.comb(n - m, k - m) / (m * math.comb(n, k)))


def optimal_failure_lower_bound(n: int, m: int) -> Fraction:
    """With k = m failures any placement fails on at least ceil(N/m) of the C(N, m) subsets."""
    return Fraction(-(-n // m), math.comb(n, m))
