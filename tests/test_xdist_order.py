"""The replay of pytest-xdist's hand-out of files (tests/xdist_order.py), on made-up test times."""

from xdist_order import replay

TIMES = {"a::1": 10.0, "a::2": 10.0, "a::3": 10.0, "b::1": 1.0, "b::2": 1.0, "b::3": 1.0, "c::1": 100.0}
A, B, C = ["a::1", "a::2", "a::3"], ["b::1", "b::2", "b::3"], ["c::1"]


def test_a_worker_gets_its_next_file_when_two_or_fewer_of_its_tests_are_left():
    # a to worker 0, b to worker 1; after a's first test worker 0 has two left and takes c, while worker 1, which
    # would have been free for it at 3 s, ends early
    assert replay(A + B + C, TIMES, by_count=False) == [130.0, 3.0]
    # c first: worker 0, with one test to run, takes b at once; a goes to worker 1
    assert replay(C + A + B, TIMES, by_count=False) == [103.0, 30.0]
    # pytest-xdist's default order: files with more tests first (a, b), then c
    assert replay(C + A + B, TIMES, by_count=True) == [130.0, 3.0]
