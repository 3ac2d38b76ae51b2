"""State flattening (runtime/state.py): any nested state of tensors and JSON scalars comes back exactly, tensors as
the very same objects, with a skeleton that is strict JSON; packing is exact and pickle-free."""

import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from runtime.state import StateError, entries_of, flatten, pack, unflatten, unpack

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.text(max_size=8),
                    st.floats(allow_nan=True, allow_infinity=True))
tensors = st.builds(lambda n, seed, dt: torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dt),
                    st.integers(0, 5), st.integers(0, 100), st.sampled_from([torch.float32, torch.float64,
                                                                             torch.int64, torch.bfloat16]))
keys = st.one_of(st.text(alphabet="abcxyz._-#$19", min_size=1, max_size=6), st.integers(-9, 9),
                st.sampled_from(["$tensor", "$tuple", "$float", "#1", "##1", "#-1", "#", "$"]))
states = st.recursive(st.one_of(scalars, tensors), lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.tuples(inner, inner), st.dictionaries(keys, inner, max_size=3)), max_leaves=12)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a is b
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@settings(max_examples=200, deadline=None)
@given(states)
def test_flatten_then_unflatten_gives_the_state_back(state):
    flat, skeleton = flatten(state)
    text = json.dumps(skeleton, allow_nan=False)  # strict JSON, whatever the floats
    assert same(unflatten(json.loads(text), flat), state)
    assert all(isinstance(t, torch.Tensor) for t in flat.values())


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(alphabet="abc", min_size=1, max_size=4), tensors, max_size=5))
def test_pack_unpack_is_exact(named):
    data, manifest = pack(named)
    got = unpack(data, manifest)
    assert list(got) == list(named)
    for k, t in named.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape
        assert torch.equal(got[k].view(torch.uint8) if t.numel() else got[k], t.view(torch.uint8) if t.numel()
                           else t)


@pytest.mark.parametrize("bad, what", [({"a/b": 1}, "without '/'"), ({"x": object()}, "is a object"),
                                       ({(1, 2): 3}, "keys must be"), ({True: 3}, "keys must be")])
def test_state_that_cannot_be_checkpointed_is_a_one_line_error(bad, what):
    with pytest.raises(StateError, match=what.replace("(", r"\(")):
        flatten(bad)


def test_a_manifest_that_points_outside_the_shard_is_refused():
    data, manifest = pack({"w": torch.ones(4)})
    manifest["entries"][0]["nbytes"] = 64
    with pytest.raises(StateError, match="outside"):
        unpack(data, manifest)


def test_entries_of_reuses_only_what_still_views_the_same_memory():
    live = torch.arange(6, dtype=torch.float32)
    strided = torch.arange(12, dtype=torch.float32).reshape(3, 4)[:, :2]  # not contiguous: entries_of copies it
    memo: dict = {}
    first = entries_of({"a": live, "b": strided}, memo)
    strided.add_(100)  # the live state moves on
    other = torch.zeros(2, dtype=torch.int64)
    entries, views = entries_of({"a": live, "b": strided, "c": other}, memo)
    assert views[0] is first[1][0]  # the same tensor object: what was worked out for it is reused
    assert torch.equal(views[1].view(torch.float32), strided.flatten())  # the copy follows the state, not the memo
    assert [e["offset"] for e in entries] == [0, 24, 48] and entries[2]["dtype"] == "torch.int64"
    assert entries == entries_of({"a": live, "b": strided, "c": other})[0]  # as without a memo
    assert set(memo) == {"a", "c"}  # the copy is never kept
