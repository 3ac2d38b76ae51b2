import pytest
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

from gemini_sim.network.flows import Network, maxmin


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
