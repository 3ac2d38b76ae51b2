"""The in-memory shard store: shards written in place through slots, committed atomically, files recycled."""

import errno
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
import xxhash

from runtime import state
from runtime.state import checksum, pack, unpack, verify
from runtime.store import ShardStore, StoreError


def shard(seed: int, n: int = 1000):
    g = torch.Generator().manual_seed(seed)
    return pack({"w": torch.randn(n, generator=g), "step": torch.tensor([seed], dtype=torch.int64)})


def write(store: ShardStore, iteration: int, rank: int, data: bytes, manifest: dict, commit: bool = True):
    slot = store.slot(iteration, rank, len(data))
    slot.tensor.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    assert checksum(slot.view()) == {"xxh3_blocks": manifest["xxh3_blocks"]}
    if commit:
        slot.commit(manifest)
    return slot


def test_a_slot_counts_only_once_committed(tmp_path):
    store = ShardStore(tmp_path, 0)
    data, manifest = shard(1)
    slot = write(store, 5, 3, data, manifest, commit=False)
    assert store.get(5, 3) is None and store.inventory() == []  # written, not committed: a crash here loses it
    slot.commit(manifest)
    got, meta = store.get(5, 3)
    assert got == data and meta["iteration"] == 5 and meta["rank"] == 3
    assert torch.equal(unpack(got, meta)["w"], unpack(data, manifest)["w"])
    assert store.inventory() == [(5, 3)]


def test_a_read_shard_is_a_private_mapping_that_tensors_view_without_a_copy(tmp_path):
    """get() maps the stored file copy-on-write: unpack(own=True) views it, and writing through those tensors never
    changes the stored copy."""
    store = ShardStore(tmp_path, 0)
    data, manifest = shard(5)
    write(store, 3, 0, data, manifest)
    got, meta = store.get(3, 0)
    tensors = unpack(got, meta, own=True)
    first = next(iter(tensors))
    addr = tensors[first].untyped_storage().data_ptr()
    assert addr == torch.frombuffer(got, dtype=torch.uint8).data_ptr() + meta["entries"][0]["offset"]
    tensors[first].fill_(7)  # the mapping is private: the store's file is unchanged
    again, _ = store.get(3, 0)
    assert again == data and bytes(got) != data
    try:
        unpack(b"abc", {"entries": []}, own=True)
        raise AssertionError("read-only bytes taken as one's own")
    except ValueError:
        pass


def test_a_corrupted_shard_is_listed_but_never_read_and_can_be_dropped(tmp_path):
    """The inventory does not read shards (recovery would pay a pass over every one); the checksum is checked when
    a shard is read, and recovery drops a copy that fails it."""
    store = ShardStore(tmp_path, 0)
    data, manifest = shard(4)
    write(store, 7, 1, data, manifest)
    bin_path, json_path = store.paths(7, 1)
    with open(bin_path, "r+b") as f:
        f.seek(3)
        byte = f.read(1)
        f.seek(3)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert store.inventory() == [(7, 1)] and store.get(7, 1) is None
    store.discard(7, 1)
    assert store.inventory() == [] and not bin_path.exists() and not json_path.exists()
    with open(store.paths(7, 1)[0].parent / "rank-00002.json", "w") as f:  # a manifest whose bytes are short
        f.write(json.dumps({"size": 10}))
    assert store.inventory() == []


def test_the_checksum_hashes_blocks_in_parallel_and_catches_any_flipped_byte(monkeypatch):
    """XXH3-128 over the XXH3-128 of each block (blocks hashed by a thread pool); older manifests' SHA-256 trees and
    plain sha256 still verify."""
    monkeypatch.setattr(state, "HASH_BLOCK", 1000)
    data = bytes(range(256)) * 20  # 5120 bytes: 6 blocks, the last one short
    blocks = [data[i:i + 1000] for i in range(0, len(data), 1000)]
    tree = xxhash.xxh3_128(b"".join(xxhash.xxh3_128(b).digest() for b in blocks))
    assert checksum(data) == {"xxh3_blocks": tree.hexdigest()}
    manifest = {"size": len(data), **checksum(data)}
    assert verify(data, manifest) and verify(bytearray(data), manifest)
    for at in (0, 999, 1000, 5119):
        bad = bytearray(data)
        bad[at] ^= 1
        assert not verify(bad, manifest)
    assert not verify(data[:-1], manifest)
    old_tree = hashlib.sha256(b"".join(hashlib.sha256(b).digest() for b in blocks)).hexdigest()
    assert verify(data, {"size": len(data), "sha256_blocks": old_tree})
    assert not verify(data[1:] + b"x", {"size": len(data), "sha256_blocks": old_tree})
    assert verify(data, {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    assert not verify(data, {"size": len(data)})  # no checksum at all: not trusted
    assert checksum(b"") == {"xxh3_blocks": xxhash.xxh3_128(xxhash.xxh3_128(b"").digest()).hexdigest()}


def test_an_uncommitted_slot_is_cleaned_after_a_crash(tmp_path):
    store = ShardStore(tmp_path, 0)
    data, manifest = shard(2)
    write(store, 5, 0, data, manifest)
    write(store, 6, 0, *shard(3), commit=False)  # the writer dies here
    again = ShardStore(tmp_path, 0)
    again.clean_partial()
    assert again.inventory() == [(5, 0)] and not list(tmp_path.glob("**/*.tmp"))


def test_dropped_files_are_recycled_and_kept_shards_stay_intact(tmp_path):
    store = ShardStore(tmp_path, 0)
    shards = {it: shard(it) for it in range(1, 6)}
    inodes, slots = {}, {}
    for it, (data, manifest) in shards.items():
        slots[it] = write(store, it, 0, data, manifest)
        inodes[it] = os.stat(store.paths(it, 0)[0]).st_ino
        store.keep_newest(2, ranks=[0])
        kept = store.iterations()
        assert kept == list(range(max(1, it - 1), it + 1))
        for k in kept:  # writing the newest never touched the one before it
            assert store.get(k, 0)[0] == shards[k][0]
        assert len(list(store.spare_dir.glob("*.bin"))) == (1 if it >= 3 else 0)
    # from the fourth checkpoint on, each one is written into the file of the one dropped just before: three files
    # in all for two kept checkpoints
    assert inodes[4] == inodes[1] and inodes[5] == inodes[2] and len(set(inodes.values())) == 3
    assert slots[4] is slots[1] and slots[5] is slots[2]  # and through the mapping this process already had


def test_a_checkpoint_still_arriving_does_not_push_out_the_newest_complete_one(tmp_path):
    """keep counts complete iterations, those with every shard the machine holds committed: a peer that started its
    next checkpoint ahead of this machine (its slot open, nothing committed) must not cost the only complete copy
    here, and is not dropped itself; nor is an older one still arriving from a peer behind."""
    store = ShardStore(tmp_path, 0)
    for it in (1, 2, 3):
        write(store, it, 0, *shard(it))
        if it != 2:
            write(store, it, 1, *shard(10 + it))  # the peer's shard this machine keeps
    size = len(shard(0)[0])
    late = store.slot(2, 1, size)  # a slow peer's shard of iteration 2, still arriving
    ahead = store.slot(4, 1, size)  # a fast peer's of iteration 4, started
    store.keep_newest(1, ranks=[0, 1])
    assert store.iterations() == [2, 3, 4] and store.inventory() == [(2, 0), (3, 0), (3, 1)]
    assert store.get(3, 0)[0] == shard(3)[0]
    for slot, it in ((late, 2), (ahead, 4)):
        data, manifest = shard(10 + it)
        slot.tensor.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        slot.commit(manifest)
        assert store.get(it, 1)[0] == data
    store.keep_newest(1, ranks=[0, 1])
    assert store.iterations() == [3, 4]  # 4 lacks this machine's own shard: 3 is still the newest complete one


def test_the_processes_of_one_machine_keep_each_others_newest_complete_checkpoint(tmp_path):
    """Two ranks of one machine share its store: the one done first with a checkpoint must not drop the other's
    last complete one (keep=1), and each rank writes every checkpoint from the third on into the file and through the
    mapping of one of its own earlier ones, whichever process dropped it."""
    stores = {0: ShardStore(tmp_path, 0), 1: ShardStore(tmp_path, 0)}
    slots = {0: {}, 1: {}}
    for it in range(1, 7):
        order = (0, 1) if it % 2 else (1, 0)  # either may finish first
        first, last = order
        for rank in order:
            slots[rank][it] = write(stores[rank], it, rank, *shard(10 * rank + it))
            if rank == first:
                stores[first].keep_newest(1, ranks=[0, 1])
                assert it - 1 in stores[first].iterations() or it == 1  # the last complete one, for both ranks
        stores[last].keep_newest(1, ranks=[0, 1])
        assert stores[0].iterations() == [it]
    for rank in (0, 1):
        for it in range(3, 7):
            assert slots[rank][it] is slots[rank][it - 2]
        assert stores[rank].get(6, rank)[0] == shard(10 * rank + 6)[0]


def test_recovery_drops_the_iterations_of_an_abandoned_run(tmp_path):
    store = ShardStore(tmp_path, 0)
    slots = {it: write(store, it, 0, *shard(it)) for it in (4, 5, 6, 7)}
    store.slot(8, 1, 10)  # a peer's, half received when the job died
    assert store.drop_after(5) == [6, 7, 8]
    assert store.iterations() == [4, 5] and store.inventory() == [(4, 0), (5, 0)]
    assert slots[6].fd == -1 and slots[7].fd == -1 and slots[5].fd >= 0  # their mappings let go
    assert store.drop_after(5) == []


def test_a_restarted_process_recycles_its_abandoned_shard_for_its_next_checkpoint(tmp_path):
    """After a restart, the first checkpoint reuses a file of the abandoned run (its memory reserved already) rather
    than reserving new memory; the file is never listed as a shard again."""
    data, manifest = shard(6)
    write(ShardStore(tmp_path, 0), 6, 0, data, manifest)
    abandoned = ShardStore(tmp_path, 0).paths(6, 0)[0].stat().st_ino
    store = ShardStore(tmp_path, 0)  # the new process's
    assert store.drop_after(5, ranks=[0]) == [6]
    assert store.inventory() == [] and store.iterations() == []
    slot = store.slot(6, 0, len(data))  # iteration 6 trained again
    assert os.fstat(slot.fd).st_ino == abandoned


def test_a_file_replaced_behind_a_mapping_is_not_written_through_it(tmp_path):
    """Recovery puts a shard back with plain file writes (a new file): the old mapping must not be recycled."""
    store = ShardStore(tmp_path, 0)
    write(store, 1, 0, *shard(1))
    store.put(1, 0, *shard(2))
    store.keep_newest(0, ranks=[0])
    data, manifest = shard(3)
    write(store, 2, 0, data, manifest)
    assert store.get(2, 0)[0] == data


def test_mappings_of_iterations_dropped_by_another_process_are_let_go(tmp_path):
    store, other = ShardStore(tmp_path, 0), ShardStore(tmp_path, 0)
    slot = write(store, 1, 0, *shard(1))
    write(store, 2, 0, *shard(2))
    other.keep_newest(1)  # a process of the same machine that does not recycle rank 0 drops iteration 1
    store.keep_newest(1, ranks=[0])
    assert slot.fd == -1 and (1, 0) not in store._held and not list(store.spare_dir.glob("*.bin"))


def test_an_iteration_dropped_by_another_process_while_it_is_listed_is_skipped(tmp_path, monkeypatch):
    """Two ranks of one machine share its store, and either may drop an iteration: one whose directory vanishes
    between the check that it exists and the listing of its files (CI saw FileNotFoundError there) counts as gone."""
    store = ShardStore(tmp_path, 0)
    for it in (1, 2, 3):
        write(store, it, 0, *shard(it))
    listing, victim = os.scandir, store.iteration_dir(2)

    def scandir(path="."):
        if not isinstance(path, int) and os.fspath(path) == os.fspath(victim):  # the other process wins the race
            shutil.rmtree(victim, ignore_errors=True)
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert store.inventory() == [(1, 0), (3, 0)]
    write(store, 2, 0, *shard(2))
    store.keep_newest(1, ranks=[0])
    store.clean_partial()
    monkeypatch.undo()
    assert store.iterations() == [3] and store.get(3, 0)[0] == shard(3)[0]


def test_a_spare_of_another_size_is_not_reused(tmp_path):
    store = ShardStore(tmp_path, 0)
    write(store, 1, 0, *shard(1, 1000))
    store.keep_newest(0, ranks=[0])
    spare = next(store.spare_dir.glob("*.bin"))
    data, manifest = shard(2, 3000)
    write(store, 2, 0, data, manifest)
    assert not spare.exists() and os.stat(store.paths(2, 0)[0]).st_size == len(data)
    assert store.get(2, 0)[0] == data


def test_only_the_recycled_ranks_files_become_spares(tmp_path):
    store = ShardStore(tmp_path, 0)
    for rank in (0, 1):
        write(store, 1, rank, *shard(rank))
    store.keep_newest(0, ranks=[1])
    assert [p.name for p in store.spare_dir.glob("*.bin")] == ["rank-00001-00000001.bin"]
    assert store.iterations() == []


def test_an_empty_shard(tmp_path):
    store = ShardStore(tmp_path, 0)
    data, manifest = pack({})
    slot = store.slot(1, 0, 0)
    assert slot.tensor.numel() == 0
    slot.commit(manifest)
    got, meta = store.get(1, 0)
    assert got == b"" and meta["size"] == 0


def test_a_slot_reserved_range_by_range_refuses_a_range_with_no_room(tmp_path, monkeypatch):
    """reserve=False (a shard received in recovery): nothing is reserved until asked, each range is reserved before
    it is written, and a range that finds the file system full is a StoreError that lets the slot go (a write
    there would have killed the process with SIGBUS)."""
    import errno

    import pytest

    from runtime.store import StoreError

    calls = []

    def fallocate(fd, offset, length):
        calls.append((offset, length))
        if offset >= 2 << 20:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    store = ShardStore(tmp_path, 0)
    slot = store.slot(1, 0, 3 << 20, reserve=False)
    assert calls == []
    slot.reserve(0, 1 << 20)
    slot.reserve(1 << 20, 2 << 20)
    slot.tensor[: 2 << 20] = 7  # reserved: written in place
    assert calls == [(0, 1 << 20), (1 << 20, 1 << 20)]
    with pytest.raises(StoreError, match="no room for a 3.0 MiB shard"):
        slot.reserve(2 << 20, 3 << 20)
    assert not list(tmp_path.rglob("*.tmp")) and slot.fd == -1


def test_an_empty_slot_reserved_range_by_range(tmp_path):
    slot = ShardStore(tmp_path, 0).slot(1, 0, 0, reserve=False)
    slot.reserve(0, 0)  # the one empty chunk of an empty shard
    slot.commit({"size": 0})
    assert ShardStore(tmp_path, 0).inventory() == [(1, 0)]


def _send_a_shard(rank: int, folder: str, size: int) -> None:
    import torch.distributed as dist

    from runtime import transport

    transport.RECOVERY_CHUNK = 1 << 20  # several chunks, the last one short
    dist.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank, world_size=2)
    try:
        store = ShardStore(os.path.join(folder, f"machine{rank}"), rank)
        if rank == 0:
            data, manifest = pack({"w": torch.arange(size // 4, dtype=torch.float32)})
            store.put(7, 1, data, manifest)
            held, meta = store.get(7, 1)
            for w in transport.send_shard(held, meta, 1, None, 1):
                w.wait()
        else:
            got, meta = transport.recv_shard(0, None, 1, store, 7, 1)
            again, meta_again = store.get(7, 1)  # committed on arrival, checksum intact
            assert bytes(got) == bytes(again) and meta == meta_again and meta["size"] == len(got)
            assert len(transport._shard_chunks(len(got))) == 3
            assert torch.equal(unpack(again, meta)["w"], torch.arange(size // 4, dtype=torch.float32))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_shard_sent_in_recovery_arrives_whole_in_chunks_reserved_as_they_come(tmp_path):
    """transport.send_shard / recv_shard between two processes: a shard of a few chunks lands in the receiver's
    store, committed and intact, with its memory reserved chunk by chunk beside the receive."""
    import torch.multiprocessing as mp

    mp.spawn(_send_a_shard, args=(str(tmp_path), (2 << 20) + (1 << 19) + 12), nprocs=2, join=True)


def _send_slowly(rank: int, folder: str, size: int, quit_after: int | None) -> None:
    """Rank 0 sends a shard as send_shard does, a chunk every 0.2 s (or, with ``quit_after``, exits after that many
    chunks); rank 1 takes it with transport.Incoming, using each part as soon as it is there."""
    import json
    import time

    import torch.distributed as dist

    from runtime import transport

    transport.RECOVERY_CHUNK = 1 << 20
    dist.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank, world_size=2)
    data, manifest = pack({"w": torch.arange(1, size // 4 + 1, dtype=torch.float32)})  # no zero byte-aligned word
    chunks = transport._shard_chunks(len(data))
    if rank == 0:
        blob = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        for w in transport.isend_bytes(json.dumps(manifest).encode(), 1, None, (1, 1001)):
            w.wait()
        dist.send(torch.tensor([blob.numel()], dtype=torch.int64), 1, tag=2001)
        for k, (a, b) in enumerate(chunks):
            if k == quit_after:
                os._exit(0)  # a source machine lost mid-transfer
            time.sleep(0.2)
            dist.send(blob[a:b], 1, tag=3001 + k)
        dist.destroy_process_group()
        return
    store = ShardStore(os.path.join(folder, "machine1"), 1)
    incoming = transport.Incoming(0, None, 1, store, 7, 1)
    assert incoming.manifest == manifest and len(incoming.data) == len(data)
    assert bytes(incoming.data[-4:]) != data[-4:]  # made before the bytes came: usable as they arrive
    if quit_after is not None:
        with pytest.raises(RuntimeError):
            incoming.wait(len(data))
        with pytest.raises(RuntimeError):
            incoming.join()
        assert store.get(7, 1) is None and incoming.done_at is None  # never committed
        os._exit(0)  # the sender is gone: no orderly teardown of the group
    for a, b in chunks:
        incoming.wait(b)
        assert bytes(incoming.data[:b]) == data[:b]
    incoming.join()
    got = store.get(7, 1)
    assert bytes(got[0]) == data and {k: got[1][k] for k in manifest} == manifest and incoming.done_at is not None
    dist.destroy_process_group()


@pytest.mark.parametrize("quit_after", [None, 1])
def test_a_shard_received_in_recovery_can_be_used_as_it_arrives(tmp_path, quit_after):
    """transport.Incoming: the shard's mapping and manifest come first, each part can be used once wait() says it is
    there, and join() returns with it committed; a sender lost mid-transfer makes the waits raise (a waiter is never
    left hanging) and nothing is committed."""
    import torch.multiprocessing as mp

    mp.spawn(_send_slowly, args=(str(tmp_path), (3 << 20) + 12, quit_after), nprocs=2, join=True)


def inodes_of(store: ShardStore, rank: int) -> set[int]:
    """The inodes of every file of ``rank`` in the store: shards, shards being written, spares."""
    paths = [*store.dir.glob(f"iter-*/rank-{rank:05d}.bin*"), *store.spare_dir.glob(f"rank-{rank:05d}-*")]
    return {p.stat().st_ino for p in paths}


def test_memory_made_ready_ahead_leaves_only_the_first_checkpoint_to_reserve_its_own(tmp_path):
    """keep 2: without preparing, checkpoints 1-3 each reserve new memory; with it, the second and third take
    spares made ready in the background while the first was written, through mappings this process holds, and
    the store still has three files for the rank."""
    store = ShardStore(tmp_path, 0)
    data, manifest = shard(1)
    first = store.slot(1, 0, len(data))
    locked = []
    thread = store.prepare(0, len(data), files=3, lock=locked.append)
    first.tensor.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    first.commit(manifest)
    thread.join()
    assert len(locked) == 2 and inodes_of(store, 0) == {first.ino} | {s.ino for s in locked}
    memory = ["new"]
    for it in range(2, 8):
        slot = write(store, it, 0, *shard(it))
        memory.append(slot.memory)
        store.keep_newest(2, ranks=[0])
        assert store.get(it, 0)[0] == shard(it)[0] and store.get(it - 1, 0)[0] == shard(it - 1)[0]
    assert memory == ["new"] + ["held"] * 6
    assert len(inodes_of(store, 0)) == 3
    assert store.prepare(0, len(data), files=3) is None  # nothing left to do


def test_a_restarted_process_maps_the_files_an_earlier_one_left_ahead_of_its_checkpoints(tmp_path):
    """After a restart the store holds the rank's kept shards and a spare, written by the process that died: the new
    process maps (and on a GPU page-locks) them in the background, so only its first checkpoint maps memory anew."""
    before = ShardStore(tmp_path, 0)
    for it in range(1, 5):
        write(before, it, 0, *shard(it))
        before.keep_newest(2, ranks=[0])
    files = inodes_of(before, 0)
    assert len(files) == 3
    store = ShardStore(tmp_path, 0)  # the new process's
    store.drop_after(4, ranks=[0])
    size = len(shard(0)[0])
    first = store.slot(5, 0, size)
    assert first.memory == "spare"
    locked = []
    store.prepare(0, size, files=3, lock=locked.append).join()
    assert {s.ino for s in locked} == files - {first.ino}  # the two kept shards, mapped: nothing new
    first.tensor.copy_(torch.frombuffer(bytearray(shard(5)[0]), dtype=torch.uint8))
    first.commit(shard(5)[1])
    store.keep_newest(2, ranks=[0])
    memory = []
    for it in range(6, 10):
        memory.append(write(store, it, 0, *shard(it)).memory)
        store.keep_newest(2, ranks=[0])
    assert memory == ["held"] * 4 and inodes_of(store, 0) == files
    assert [store.get(it, 0)[0] for it in (8, 9)] == [shard(8)[0], shard(9)[0]]


def test_a_checkpoint_waits_for_the_memory_being_made_ready_rather_than_reserving_more(tmp_path):
    store = ShardStore(tmp_path, 0)
    size = len(shard(0)[0])
    write(store, 1, 0, *shard(1))
    go, started = threading.Event(), threading.Event()

    def lock(slot):
        started.set()
        go.wait(10)

    thread = store.prepare(0, size, files=2, lock=lock)
    started.wait(10)
    got = []
    taker = threading.Thread(target=lambda: got.append(store.slot(2, 0, size)))
    taker.start()
    taker.join(0.3)
    assert taker.is_alive() and not got  # waiting for the spare being made ready
    go.set()
    taker.join(10)
    thread.join(10)
    assert got[0].memory == "held" and len(inodes_of(store, 0)) == 2


def test_memory_that_cannot_be_made_ready_ahead_leaves_the_checkpoint_to_say_so(tmp_path, monkeypatch):
    store = ShardStore(tmp_path, 0)
    size = len(shard(0)[0])
    write(store, 1, 0, *shard(1))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    store.prepare(0, size, files=3).join(10)
    assert not list(store.spare_dir.glob("*"))  # nothing half made left behind
    with pytest.raises(StoreError, match="no room"):
        store.slot(2, 0, size)  # not waiting for ever: it reserves its own, and says why it cannot


def test_a_spare_left_half_made_by_a_crash_is_cleaned(tmp_path):
    store = ShardStore(tmp_path, 0)
    store.spare_dir.mkdir()
    (store.spare_dir / "rank-00000-ready-99-0.tmp").write_bytes(b"x" * 100)
    store.clean_partial()
    assert not list(store.spare_dir.glob("*"))


def test_nothing_is_made_ready_for_a_store_asked_for_no_files(tmp_path):
    write(ShardStore(tmp_path, 0), 1, 0, *shard(1))
    store = ShardStore(tmp_path, 0)  # another process's, which maps nothing of what the first left
    assert store.prepare(0, len(shard(1)[0]), files=0) is None and not store._held


def test_a_shard_dropped_while_it_is_being_made_ready_is_mapped_as_the_spare_it_became(tmp_path):
    """A restarted process maps the shards an earlier one left; one of them dropped (made a spare) between the listing
    and its turn is mapped where it went, so the checkpoint that reuses it still finds it held."""
    before = ShardStore(tmp_path, 0)
    for it in (1, 2, 3):
        write(before, it, 0, *shard(it))
        before.keep_newest(2, ranks=[0])  # 2 and 3 kept, 1's file the spare
    size = len(shard(0)[0])
    two = os.stat(before.paths(2, 0)[0]).st_ino
    store, other = ShardStore(tmp_path, 0), ShardStore(tmp_path, 0)
    go, locked = threading.Event(), []

    def lock(slot):
        locked.append(slot.ino)
        go.wait(10)  # held up on the first file, the spare

    thread = store.prepare(0, size, files=3, lock=lock)
    while not locked:
        thread.join(0.01)
    other.slot(4, 0, size)  # another process takes the spare meanwhile
    store.keep_newest(1, ranks=[0])  # and 2 is dropped: its file is the spare now
    assert os.stat(store._spare_path(0, 2)).st_ino == two
    go.set()
    thread.join(10)
    slot = store.slot(5, 0, size)
    assert slot.memory == "held" and slot.ino == two and two in locked


def test_making_a_slots_memory_ready_lets_the_training_thread_run(tmp_path):
    """Reserving and mapping in a slot's memory (a new checkpoint's, or prepare()'s beside training) is done in
    calls that let go of the GIL: a thread running Python meanwhile, as the training loop does, never waits for
    more than a fraction of it (MAP_POPULATE, as mmap.mmap makes it, held the GIL throughout: 0.4 s per 0.6 GiB)."""
    root = Path(tempfile.mkdtemp(dir="/dev/shm")) if os.path.isdir("/dev/shm") else tmp_path
    try:
        store = ShardStore(root, 0)
        gaps, done = [0.0], threading.Event()

        def loop():
            last = time.perf_counter()
            while not done.is_set():
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        thread = threading.Thread(target=loop)
        thread.start()
        time.sleep(0.02)
        t0 = time.perf_counter()
        slot = store.slot(1, 0, 512 << 20)
        took = time.perf_counter() - t0
        done.set()
        thread.join()
        assert max(gaps) < took / 5, (max(gaps), took)
        slot.tensor[::4096].fill_(7)  # the memory is there
        slot.close()
    finally:
        if root != tmp_path:
            shutil.rmtree(root, ignore_errors=True)


def test_a_kernel_that_cannot_map_memory_in_ahead_still_gets_a_mapped_slot(tmp_path, monkeypatch):
    """Before Linux 5.14 (no MADV_POPULATE_WRITE) a slot's pages are mapped in as the mapping is made instead."""
    import runtime.store as module

    monkeypatch.setattr(module, "populate", lambda mem, start, length: False)
    data, manifest = shard(3)
    write(ShardStore(tmp_path, 0), 2, 0, data, manifest)
    assert ShardStore(tmp_path, 0).get(2, 0)[0] == data


def test_a_shard_committed_while_another_thread_drops_stays_mapped(tmp_path, monkeypatch):
    """A receiver's thread drops what keep no longer needs (Checkpointer._make_room) while the copier takes a slot
    for the next checkpoint and commits it: the drop must never let go of that just-committed mapping, which the
    sender still sends from. Under make test's load it once did: the dropping thread listed the iterations, was
    descheduled while the copier took its slot and committed it, then let go of every mapping not in its listing.
    Here the dropping thread is held up for 5 ms after each listing of the iterations."""
    store = ShardStore(tmp_path, 0)
    data, manifest = shard(1, 64)
    stop, errors = threading.Event(), []
    listing = store.iterations

    def slow_listing():
        its = listing()
        if threading.current_thread().name == "dropper":
            time.sleep(0.005)
        return its

    monkeypatch.setattr(store, "iterations", slow_listing)

    def drop():
        while not stop.is_set():
            store.keep_newest(1, ranks=[0])

    dropper = threading.Thread(target=drop, name="dropper")
    dropper.start()
    try:
        for it in range(1, 101):
            slot = write(store, it, 0, data, manifest)
            time.sleep(0.002)  # the dropper's turn: the newest complete shard is the one keep 1 keeps
            if slot.tensor is None:  # let go (closed) all the same
                errors.append(it)
    finally:
        stop.set()
        dropper.join()
    assert errors == []
    assert store.get(100, 0)[0] == data
