import dataclasses
import itertools
import json
import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemini_sim.placement import linkload as comm, layouts as placement, survival as recovery
from gemini_sim.cluster import config, topology
from gemini_sim.errors import UserError

STRATS = list(placement.PLACEMENTS)


def build_any(name, n, m, seed=0, domains=None):
    return placement.build(name, n, m, seed=seed, domains=domains or m)


def valid_cases(max_n=12):
    for n in range(1, max_n + 1):
        for m in range(1, min(n, 4) + 1):
            for name in STRATS:
                if name == "group" and n % m:
                    continue
                yield name, n, m


def test_definitions_small():
    assert placement.group(4, 2).holders == ((0, 1), (1, 0), (2, 3), (3, 2))
    assert placement.ring(4, 3).holders[3] == (3, 0, 1)
    # N=7, m=2: floor(7/2)-1 = 2 groups, then a ring over the last 2 + 1 = 3 machines.
    mixed = placement.mixed(7, 2)
    assert mixed.holders[:4] == ((0, 1), (1, 0), (2, 3), (3, 2))
    assert mixed.holders[4:] == ((4, 5), (5, 6), (6, 4))
    assert placement.mixed(8, 2).holders == placement.group(8, 2).holders


@pytest.mark.parametrize("name, n, m", list(valid_cases()))
def test_every_placement_is_valid_and_balanced(name, n, m):
    p = build_any(name, n, m)
    placement.check(p)
    assert all(hs[0] == i and len(set(hs)) == m for i, hs in enumerate(p.holders))
    assert sorted(len(x) for x in p.stored_on()) == [m] * n


@pytest.mark.parametrize("name, n, m", [c for c in valid_cases(11) if c[1] <= 11])
def test_exact_matches_brute_force(name, n, m):
    p = build_any(name, n, m, seed=n * 7 + m)
    for k in range(n + 1):
        exact = recovery.probability(p, k)
        brute = Fraction(recovery.brute_force_safe(p, k), math.comb(n, k))
        assert exact.method == "exact"
        assert abs(exact.probability - float(brute)) <= 1e-12
        assert exact.exact == brute


def test_random_m2_uses_the_graph_count_on_large_clusters():
    p = placement.build("random", 300, 2, seed=3)
    r = recovery.probability(p, 12)
    assert r.method == "exact" and 0 < r.probability < 1
    mc = recovery.monte_carlo(p, lambda rng: rng.choice(300, 12, replace=False).tolist(), 40000, 1, 12)
    assert mc.ci95[0] - 0.01 <= r.probability <= mc.ci95[1] + 0.01


def test_random_m3_large_falls_back_to_labelled_monte_carlo():
    p = placement.build("random", 200, 3, seed=0)
    r = recovery.probability(p, 30, samples=2000)
    assert r.method == "monte-carlo" and r.ci95[0] <= r.probability <= r.ci95[1]


@pytest.mark.parametrize("n, m", [(n, m) for m in (2, 3, 4) for n in range(m, 41, m)])
def test_paper_lower_bound_for_group(n, m):
    p = placement.group(n, m)
    for k in range(n + 1):
        prob = recovery.probability(p, k).probability
        assert prob >= recovery.paper_lower_bound(n, m, k) - 1e-12
        if k < m:
            assert prob == 1.0


@pytest.mark.parametrize("n, m", [(n, m) for m in (2, 3, 4, 5) for n in range(m + 1, 40) if n % m])
def test_mixed_within_papers_gap_of_optimal(n, m):
    # With k = m failures, any placement fails on at least ceil(N/m) of the C(N, m) failure sets.
    gap = Fraction(2 * m - 3, math.comb(n, m))
    best_possible = 1 - recovery.optimal_failure_lower_bound(n, m)
    mixed = recovery.probability(placement.mixed(n, m), m).exact
    assert best_possible - mixed <= gap
    assert mixed <= best_possible


def test_group_is_optimal_when_m_divides_n():
    for n, m in [(12, 2), (12, 3), (16, 4)]:
        for k in range(n + 1):
            g = recovery.probability(placement.group(n, m), k).probability
            for other in ("ring", "random"):
                assert g >= recovery.probability(build_any(other, n, m), k).probability - 1e-12


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 60), m=st.integers(1, 5), name=st.sampled_from(["mixed", "ring", "domain-aware"]),
       data=st.data())
def test_probability_decreases_with_k_and_a_ring_gains_with_m(n, m, name, data):
    m = min(m, n)
    probs = [recovery.probability(build_any(name, n, m), k).probability for k in range(n + 1)]
    assert all(a >= b - 1e-12 for a, b in zip(probs, probs[1:]))
    assert probs[0] == 1.0 and (probs[-1] == 0.0)
    k = data.draw(st.integers(0, n))
    if m < n:  # a ring of m + 1 holds each shard where a ring of m does, and on one machine more
        assert recovery.probability(placement.ring(n, m + 1), k).probability >= \
            recovery.probability(placement.ring(n, m), k).probability - 1e-12


def test_one_replica_more_in_another_layout_can_recover_less_often():
    """Not so across layouts (hypothesis found it): mixed(15, 5) is three groups of 5, mixed(15, 6) a group of 6 and a
    ring of 9, and with 10 of the 15 machines failed the second recovers less often. Brute force over all C(15, 10)
    failure sets agrees with the exact figures."""
    def brute(p, k):
        sets = list(itertools.combinations(range(p.machines), k))
        return Fraction(sum(all(set(h) - set(f) for h in p.holders) for f in sets), len(sets))

    five, six = placement.mixed(15, 5), placement.mixed(15, 6)
    assert recovery.probability(five, 10).exact == brute(five, 10) == Fraction(750, 1001)
    assert recovery.probability(six, 10).exact == brute(six, 10) == Fraction(747, 1001)


def test_expected_lost_checkpoints_matches_brute_force_and_is_placement_independent():
    n, m, k = 9, 3, 5
    for name in ("mixed", "ring", "random"):
        p = build_any(name, n, m)
        total = sum(p.lost(c) for c in itertools.combinations(range(n), k))
        assert total / math.comb(n, k) == pytest.approx(recovery.expected_lost_checkpoints(n, m, k), rel=1e-12)


def test_domain_aware_spreads_replicas_over_domains():
    n, m, d = 24, 3, 4
    p = placement.build("domain-aware", n, m, domains=d)
    dom = placement.domains_of(n, d)
    assert all(len({dom[h] for h in hs}) == m for hs in p.holders)
    # Under whole-rack bursts it beats mixed placement, whose groups sit inside one rack.
    burst = recovery.burst_sampler(dom, 6)
    aware = recovery.monte_carlo(p, burst, 4000, 0, 6)
    plain = recovery.monte_carlo(placement.mixed(n, m), burst, 4000, 0, 6)
    assert aware.ci95[0] > plain.ci95[1]


def test_wilson_interval_covers_simple_cases():
    lo, hi = recovery.wilson(50, 100)
    assert lo < 0.5 < hi and hi - lo < 0.21
    assert recovery.wilson(0, 10)[0] == 0.0


def test_memory_check():
    p = placement.mixed(16, 4)
    assert placement.check_memory(p, 10e9, 100) == pytest.approx(40)
    with pytest.raises(UserError, match="10.0 GB more"):
        placement.check_memory(p, 10e9, 30)


def test_communication_cost_and_link_loads():
    preset = config.load_preset("gemini-paper")
    g = topology.build(preset.cluster, preset.storage)
    shard = preset.checkpoint_bytes_per_machine
    for name in ("group", "ring", "domain-aware"):
        c = comm.cost(build_any(name, 16, 3 if name != "group" else 2, domains=4), shard, g)
        m = 3 if name != "group" else 2
        assert all(s == pytest.approx((m - 1) * shard) for s in c.sent_bytes)
        assert all(r == pytest.approx((m - 1) * shard) for r in c.received_bytes)
    # Group placement with 4 machines per rack keeps traffic inside racks; domain-aware crosses the spine.
    inside = comm.cost(placement.group(16, 2), shard, g)
    across = comm.cost(placement.build("domain-aware", 16, 2, domains=4), shard, g)
    assert not any("spine" in k for k in inside.link_bytes)
    assert any("spine" in k for k in across.link_bytes)
    assert inside.min_time_s == pytest.approx(shard / (400e9 / 8))


def test_cli_placement(cli, tmp_path):
    rc, out, err = cli("placement", "--machines", 16, "--replicas", 2, "--strategy", "group", "--failures", 3,
                       "--json")
    d = json.loads(out)
    assert d["probability"] == pytest.approx(0.8) and d["method"] == "exact"
    assert {"strategy", "machines", "replicas", "failures", "probability", "method"} <= set(d)
    rc, out, err = cli("placement", "--machines", 16, "--replicas", 2, "--failures", "1-8", "--json",
                       "--plot", tmp_path / "p.png")
    rows = json.loads(out)
    assert [r["failures"] for r in rows] == list(range(1, 9)) and (tmp_path / "p.png").stat().st_size > 0
    rc, out, err = cli("placement", "--machines", 16, "--replicas", 4, "--strategy", "domain-aware", "--domains",
                       4, "--bursts", "--failures", 4, "--json", "--samples", 500)
    d = json.loads(out)
    assert d["method"] == "monte-carlo" and len(d["ci95"]) == 2


@pytest.mark.parametrize("args, needle", [
    (("--machines", 4, "--replicas", 5, "--failures", 1), "--replicas must be between"),
    (("--machines", 4, "--replicas", 2, "--failures", 5), "outside >= 0 and <= 4"),
    (("--machines", 5, "--replicas", 2, "--failures", 2, "--strategy", "group"), "multiple of replicas"),
    (("--machines", 5, "--replicas", 2, "--failures", 2, "--strategy", "hash"), "unknown placement strategy"),
    (("--machines", 5, "--replicas", 2, "--failures", "3-1"), "empty"),
    (("--machines", 5, "--replicas", 2, "--failures", 2, "--bursts"), "--bursts needs --domains"),
])
def test_cli_placement_errors(cli, args, needle):
    rc, out, err = cli("placement", *args, check_rc=2)
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("machines,groups,replicas", [(4, 2, 2), (6, 3, 2), (8, 4, 3), (12, 4, 4), (6, 2, 1)])
def test_hsdp_puts_every_copy_where_a_replica_of_the_shard_is(machines, groups, replicas):
    """HSDP's layout: machine i's copies on machines of its column (the same position in other replica groups, which
    hold the same shard), in distinct groups; so losing whole groups, fewer than the copies, loses no checkpoint, and
    losing the groups of a column's copies does (brute force over every set of groups)."""
    from itertools import combinations

    p = placement.hsdp(machines, replicas, groups)
    placement.check(p)
    per_group = machines // groups
    for i, hs in enumerate(p.holders):
        assert hs[0] == i and all(h % per_group == i % per_group for h in hs)
        assert len({h // per_group for h in hs}) == replicas
    for lost in range(1, groups + 1):
        for gs in combinations(range(groups), lost):
            failed = [m for m in range(machines) if m // per_group in gs]
            gone = any(all(h // per_group in gs for h in hs) for hs in p.holders)  # every copy of one lost
            assert p.survives(failed) == (not gone), (gs, p.holders)
            assert lost >= replicas or not gone  # fewer groups lost than copies: every checkpoint survives
            assert gone or lost < groups  # every group lost: every checkpoint with it
    if groups % replicas == 0:  # GEMINI's groups within each column: a relabelling of its group placement
        grouped = placement.group(machines, replicas)
        for k in range(1, min(machines, 4)):
            assert recovery.probability(p, k).exact == recovery.probability(grouped, k).exact


@pytest.mark.parametrize("machines,replicas,groups,message", [(4, 2, 3, "must divide"), (4, 3, 2, "hold only 2"),
                                                              (4, 2, 0, "must divide")])
def test_hsdp_refuses_groups_it_cannot_place(machines, replicas, groups, message):
    with pytest.raises(UserError, match=message):
        placement.hsdp(machines, replicas, groups)


@pytest.mark.parametrize("machines,groups,replicas", [(4, 2, 2), (8, 4, 3), (12, 4, 4)])
def test_copies_held_as_hsdp_replicas_cost_only_the_own_part(machines, groups, replicas):
    """On the hsdp placement every copy off the machine is a replica's: it sends and holds ``own_bytes``, so a
    machine holds one shard and the own parts of the m-1 machines it keeps copies of; on any other placement the
    same call counts whole shards (brute force over the holders)."""
    shard, own = 1e9, 120.0
    p = placement.hsdp(machines, replicas, groups)
    per = machines // groups
    for i, hs in enumerate(p.holders):
        assert [placement.replica_of(p, i, h) for h in hs] == [False] + [True] * (replicas - 1)
        assert all(h % per == i % per for h in hs)
    assert placement.memory_bytes(p, shard, own) == [shard + (replicas - 1) * own] * machines
    assert placement.check_memory(p, shard, 1.0) == pytest.approx(1.0)  # one shard fits where m would not
    preset = config.load_preset("gemini-paper")
    g = topology.build(dataclasses.replace(preset.cluster, machines=machines), preset.storage)
    c = comm.cost(p, shard, g, own_bytes=own)
    assert c.sent_bytes == c.received_bytes == tuple([(replicas - 1) * own] * machines)
    grouped = placement.build("ring", machines, replicas)
    assert not any(placement.replica_of(grouped, i, h) for i, hs in enumerate(grouped.holders) for h in hs)
    assert placement.memory_bytes(grouped, shard, own) == [replicas * shard] * machines
    assert comm.cost(grouped, shard, g, own_bytes=own).sent_bytes == tuple([(replicas - 1) * shard] * machines)


def test_cli_placement_hsdp(cli):
    rc, out, _ = cli("placement", "--machines", "16", "--replicas", "2", "--hsdp", "4", "--failures", "2",
                     "--preset", "gemini-paper")
    shard = config.load_preset("gemini-paper").checkpoint_bytes_per_machine / 1e9
    exact = recovery.probability(placement.hsdp(16, 2, 4), 2).probability
    assert f"hsdp: N=16 m=2 k=2: P(recover from CPU memory) = {exact:.12g} [exact]" in out
    assert f"CPU memory needed per machine: {shard:.1f} GB (copies held as HSDP replicas" in out
    assert "sent only the ranks' own parts" in out
    rc, _, err = cli("placement", "--machines", "16", "--replicas", "2", "--hsdp", "3", "--failures", "2",
                     check_rc=2)
    assert err.strip() == "gemini-sim: error: HSDP's 3 replica groups must divide the 16 machines"
