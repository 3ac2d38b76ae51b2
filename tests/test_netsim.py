import pytest
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

import numpy as np

from gemini_sim.network.flows import Network, fill, maxmin, merge_intervals


def run_flows(capacity, flows, priorities=None):
    """flows: list of (start, links, bytes[, cls]); returns completion times."""
    env = simpy.Environment()
    net = Network(env, capacity)
    ends = {}

    def one(i, start, links, size, cls):
        yield env.timeout(start)
        yield net.transfer(links, size, cls)
        ends[i] = env.now

    for i, f in enumerate(flows):
        start, links, size = f[:3]
        env.process(one(i, start, links, size, f[3] if len(f) > 3 else 0))
    env.run()
    return [ends[i] for i in range(len(flows))], net


def test_lone_flow_finishes_in_size_over_bandwidth():
    ends, _ = run_flows({"a": 10.0}, [(0, ["a"], 25.0)])
    assert ends == [pytest.approx(2.5)]


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_n_equal_flows_share_one_link(n):
    ends, _ = run_flows({"a": 8.0}, [(0, ["a"], 4.0)] * n)
    assert ends == [pytest.approx(n * 4.0 / 8.0)] * n


def test_classic_maxmin_example():
    # Links L1 (cap 1) and L2 (cap 2); flow A uses L1+L2, B uses L1, C uses L2.
    # Max-min: A = B = 0.5 (L1 is the bottleneck), C takes the rest of L2: 1.5.
    rates = maxmin({"A": ("L1", "L2"), "B": ("L1",), "C": ("L2",)}, {"L1": 1.0, "L2": 2.0})
    assert rates == {"A": pytest.approx(0.5), "B": pytest.approx(0.5), "C": pytest.approx(1.5)}


def test_textbook_parking_lot():
    # Three links of capacity 1 in a row; one long flow over all of them, one short flow per link: all get 1/2.
    flows = {"long": ("x", "y", "z"), "x": ("x",), "y": ("y",), "z": ("z",)}
    rates = maxmin(flows, {"x": 1.0, "y": 1.0, "z": 1.0})
    assert all(r == pytest.approx(0.5) for r in rates.values())


def test_rates_recomputed_when_a_flow_ends():
    # Two flows on a link of 2: both at 1 until the small one ends at t=1, then the big one runs at 2.
    ends, _ = run_flows({"a": 2.0}, [(0, ["a"], 1.0), (0, ["a"], 3.0)])
    assert ends == [pytest.approx(1.0), pytest.approx(2.0)]


def test_rates_recomputed_when_a_flow_starts():
    ends, _ = run_flows({"a": 1.0}, [(0, ["a"], 2.0), (1, ["a"], 0.5)])
    # 0..1: first alone (1 byte left); then both at 0.5: second needs 1 s, first finishes its last 0.5 then.
    assert ends == [pytest.approx(2.5), pytest.approx(2.0)]


def test_strict_priority_lets_training_go_first():
    ends, _ = run_flows({"a": 1.0}, [(0, ["a"], 1.0, 0), (0, ["a"], 1.0, 1)])
    assert ends == [pytest.approx(1.0), pytest.approx(2.0)]
    # Low priority still uses what high priority cannot: a high flow bottlenecked elsewhere.
    ends, _ = run_flows({"a": 1.0, "b": 0.25}, [(0, ["a", "b"], 1.0, 0), (0, ["a"], 0.75, 1)])
    assert ends == [pytest.approx(4.0), pytest.approx(1.0)]


@settings(max_examples=60, deadline=None)
@given(caps=st.lists(st.floats(0.5, 10), min_size=1, max_size=4),
       flows=st.lists(st.tuples(st.floats(0, 3), st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True),
                                st.floats(0.1, 10)), min_size=1, max_size=8))
def test_conservation_and_capacity(caps, flows):
    capacity = {i: c for i, c in enumerate(caps)}
    flows = [(s, [l % len(caps) for l in links], size) for s, links, size in flows]
    flows = [(s, sorted(set(links)), size) for s, links, size in flows]
    ends, net = run_flows(capacity, flows)
    for (start, links, size), end in zip(flows, ends):
        assert end >= start + size / min(capacity[l] for l in links) - 1e-9  # no faster than alone
    for _, totals in net.link_rate_log:
        for link, total in totals.items():
            assert total <= capacity[link] * (1 + 1e-9)
    # Work conservation: with one link, all bytes leave by (start of first + total bytes / capacity) if no gaps.
    if len(caps) == 1 and all(s == 0 for s, _, _ in flows):
        assert max(ends) == pytest.approx(sum(size for *_, size in flows) / caps[0], rel=1e-9)


@settings(max_examples=150, deadline=None)
@given(caps=st.lists(st.floats(0.1, 100), min_size=1, max_size=6),
       paths=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=4, unique=True), min_size=1, max_size=12))
def test_fill_is_max_min_fair(caps, paths):
    """The definition, checked directly: rates fit the capacities, and every flow crosses a saturated link on which
    no flow gets more than it does (its bottleneck); a flow without links is unbounded."""
    paths = [sorted({link % len(caps) for link in p}) for p in paths]
    flow_of = np.array([f for f, p in enumerate(paths) for _ in p], dtype=np.intp)
    link_of = np.array([link for p in paths for link in p], dtype=np.intp)
    rates = fill(flow_of, link_of, len(paths), np.array(caps))
    load = np.bincount(link_of, weights=rates[flow_of], minlength=len(caps))
    assert np.all(load <= np.array(caps) * (1 + 1e-9))
    for f, p in enumerate(paths):
        if not p:
            assert rates[f] == np.inf
            continue
        assert any(load[link] >= caps[link] * (1 - 1e-9)
                   and all(rates[g] <= rates[f] * (1 + 1e-9) for g, q in enumerate(paths) if link in q)
                   for link in p), (f, rates, load)


@settings(max_examples=60, deadline=None)
@given(caps=st.lists(st.floats(0.5, 10), min_size=1, max_size=4),
       groups=st.lists(st.tuples(st.floats(0, 2), st.lists(st.tuples(st.lists(st.integers(0, 3), min_size=1, max_size=3,
                                                                              unique=True), st.floats(0.1, 5)),
                                                         min_size=1, max_size=4)), min_size=1, max_size=4))
def test_a_group_ends_when_its_flows_would_end_one_by_one(caps, groups):
    """A group of flows behaves exactly like its flows started separately at the same instant: it ends when the
    last of them would."""
    capacity = {i: c for i, c in enumerate(caps)}
    groups = [(s, [(sorted({l % len(caps) for l in links}), size) for links, size in flows]) for s, flows in groups]
    single, _ = run_flows(capacity, [(s, links, size) for s, flows in groups for links, size in flows])
    env = simpy.Environment()
    net = Network(env, capacity)
    ends = {}

    def one(g, start, flows):
        yield env.timeout(start)
        yield net.transfer_group(net.paths([links for links, _ in flows]), [size for _, size in flows])
        ends[g] = env.now

    for g, (s, flows) in enumerate(groups):
        env.process(one(g, s, flows))
    env.run()
    k = 0
    for g, (s, flows) in enumerate(groups):
        assert ends[g] == pytest.approx(max(single[k:k + len(flows)]), rel=1e-9, abs=1e-12)
        k += len(flows)
    t = net.finished()
    assert len(t["end"]) == k and np.all(t["end"] >= t["start"])


def test_merge_intervals_per_group():
    g, a, b = merge_intervals(np.array([1, 0, 1, 1, 0]), np.array([0.0, 5, 1, 4, 0]), np.array([2.0, 6, 3, 5, 1]))
    assert list(zip(g.tolist(), a.tolist(), b.tolist())) == [(0, 0.0, 1.0), (0, 5.0, 6.0), (1, 0.0, 3.0),
                                                              (1, 4.0, 5.0)]


def test_groups_started_at_one_instant_keep_each_flows_size_owner_and_kind():
    """Groups started together join the active flows in one step; each flow keeps its own labels: one size for all
    or one each (an empty flow is done at once and never listed), one owner for all, one each, or its position."""
    env = simpy.Environment()
    net = Network(env, {"a": 1.0, "b": 2.0, "c": 4.0})
    events = {}

    def start():
        yield env.timeout(1.0)
        events["one size, one owner"] = net.transfer_group(net.paths([["a"], ["b"]]), 2.0, kind="x", owners=7)
        events["sizes, owners"] = net.transfer_group(net.paths([["a"], ["c"], ["b"]]), [1.0, 0.0, 4.0], kind="y",
                                                     owners=[3, 4, 5])
        events["positions"] = net.transfer_group(net.paths([["c"], ["c"]]), [0.0, 8.0], cls=1, kind="x")
        events["all empty"] = net.transfer_group(net.paths([["a"]]), 0.0, kind="z")
        assert events["all empty"].triggered and net.finished()["size"].size == 0  # nothing in flight yet

    env.process(start())
    env.run()
    assert all(e.triggered for e in events.values())
    t = net.finished()
    rows = sorted(zip(t["size"].tolist(), t["owner"].tolist(), [net.kinds[k] for k in t["kind"]], t["cls"].tolist(),
                      t["start"].tolist(), [net.links[f] for f in t["first"]]))
    assert rows == [(1.0, 3, "y", 0, 1.0, "a"), (2.0, 7, "x", 0, 1.0, "a"), (2.0, 7, "x", 0, 1.0, "b"),
                    (4.0, 5, "y", 0, 1.0, "b"), (8.0, 1, "x", 1, 1.0, "c")]
    # a: y's 1 and x's 2 share it (y done at 3, x at 4); b: x's 2 and y's 4 (x at 3, y at 4); c: the 8 alone (at 3)
    assert net.last_end == pytest.approx({"x": 4.0, "y": 4.0})
