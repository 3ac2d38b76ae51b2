"""Thin copies of an HSDP twin's shard (runtime/replicas.py) in a machine's store: built whole from the twin's
shard and the own part, checked against the sender's checksum, listed only while the twin's shard is there; the
digest that decides whether a holder may keep one."""

import threading

import pytest
import torch

from runtime import replicas
from runtime.state import CHUNKS, pack, verify
from runtime.store import ShardStore


def shard(seed: int, own_value: float, shape=(64,), positions: int = 3) -> tuple[bytes, dict]:
    """A rank's shard: two DTensor pieces (the same for the same ``seed``), buffers and step counters of its own."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"optim/state/w/step": torch.tensor(own_value), "model/w": torch.randn(shape, generator=g),
               "extra/loader/pos": torch.tensor([int(own_value)] * positions),
               "optim/state/w/exp_avg": torch.randn(shape, generator=g)}
    data, manifest = pack(tensors)
    manifest["skeleton"] = {CHUNKS: {"model/w": [[128], [0]], "optim/state/w/exp_avg": [[128], [0]]}}
    return data, manifest


def digest_of(data, manifest) -> str:
    return replicas.digest(memoryview(data), manifest["entries"], replicas.shared(manifest))


def test_the_digest_covers_the_dtensor_pieces_and_their_layout_only():
    a, b = shard(1, 3.0), shard(1, 7.0)  # the same pieces, other own parts
    assert digest_of(*a) == digest_of(*b)
    assert digest_of(*a) != digest_of(*shard(2, 3.0))  # other pieces
    assert digest_of(*a) != digest_of(*shard(1, 3.0, shape=(32, 2)))  # the same bytes in another shape


@pytest.fixture
def store(tmp_path):
    return ShardStore(tmp_path / "store", 1)


def put_thin(store, it, rank, twin, data, manifest):
    own = replicas.own_part(torch.frombuffer(bytearray(data), dtype=torch.uint8), manifest["entries"],
                            replicas.shared(manifest))
    store.put(it, rank, own.numpy().tobytes(), replicas.thin(manifest, twin, own.numel()))
    return own.numel()


@pytest.mark.parametrize("positions", [3, 5])
def test_a_thin_copy_is_rebuilt_whole_from_its_twins_shard(store, positions):
    """Over a private mapping of the twin's shard where both are laid out alike, else in new memory (a twin whose
    own part is longer: its DTensor pieces lie elsewhere)."""
    mine, twin = shard(1, 3.0), shard(1, 9.0, positions=positions)
    store.put(5, 2, *twin)
    own = put_thin(store, 5, 0, 2, *mine)
    assert own == 4 + 3 * 8  # the step counter and the loader's position: the DTensor pieces were not stored
    assert sorted(store.inventory()) == [(5, 0), (5, 2)]
    data, manifest = store.get(5, 0)
    assert bytes(data) == mine[0] and replicas.REPLICA not in manifest and verify(data, manifest)
    assert isinstance(data.obj, bytearray) == (positions != 3)
    assert store.get(5, 2)[0].tobytes() == twin[0]  # the twin's own shard is untouched


def test_a_thin_copy_is_gone_with_its_twins_shard_or_a_damaged_byte(store):
    mine, twin = shard(1, 3.0), shard(1, 9.0)
    store.put(5, 2, *twin)
    put_thin(store, 5, 0, 2, *mine)
    bin_path = store.paths(5, 2)[0]
    raw = bytearray(bin_path.read_bytes())
    raw[next(e["offset"] for e in twin[1]["entries"] if e["name"] == "model/w")] ^= 1  # of its DTensor pieces
    bin_path.write_bytes(raw)
    assert store.get(5, 0) is None  # the rebuilt shard fails the sender's checksum
    assert store.get(5, 0, check=False) is not None  # read unchecked, as recovery reads it (and checks it after)
    store.discard(5, 2)
    assert store.inventory() == []  # not listed without its twin
    assert store.get(5, 0, check=False) is None


def test_a_holder_keeps_a_thin_copy_only_of_its_own_pieces(store):
    mine, twin = shard(1, 3.0), shard(1, 9.0)
    manifest = dict(mine[1], **{replicas.DIGEST: digest_of(*mine)})
    own = 4 + 3 * 8
    with pytest.raises(replicas.Mismatch, match="was not committed within 0.1 s"):
        replicas.accept(store, 5, 2, 0, manifest, own, 0.1)
    later = threading.Timer(0.2, store.put, (5, 2, twin[0], dict(twin[1], **{replicas.DIGEST: digest_of(*twin)})))
    later.start()  # this rank's own checkpoint, committed while the holder waits for it
    out = replicas.accept(store, 5, 2, 0, manifest, own, 30)
    later.join()
    assert out[replicas.REPLICA] == {"rank": 2, "bytes": own, "own": {"optim/state/w/step": 0, "extra/loader/pos": 4}}
    other = shard(2, 3.0)
    with pytest.raises(replicas.Mismatch, match="rank 2's checkpoint of iteration 5 holds other DTensor pieces"):
        replicas.accept(store, 5, 2, 0, dict(other[1], **{replicas.DIGEST: digest_of(*other)}), own, 30)
    with pytest.raises(replicas.Mismatch, match="sent 9 bytes"):
        replicas.accept(store, 5, 2, 0, manifest, 9, 30)


def test_the_plan_names_the_ranks_that_hold_the_same_pieces():
    """Twins: the same local rank on machines at the same position of two replica groups."""
    from runtime.plan import default

    four = default(4, 1, hsdp=2)  # groups {0, 1} and {2, 3}
    assert [r for r in range(4) if four.replica(0, r)] == [2] and [r for r in range(4) if four.replica(1, r)] == [3]
    two = default(2, 2, hsdp=2)  # machine 0 (ranks 0, 1) and machine 1 (ranks 2, 3), one group each
    assert two.replica(0, 2) and two.replica(3, 1) and not two.replica(0, 3) and not two.replica(0, 1)
    assert not any(default(4, 1).replica(a, b) for a in range(4) for b in range(4))  # no replica groups
    assert four.data["placement"]["replica_groups"] == 2 and "replica_groups" not in default(4, 1).data["placement"]
