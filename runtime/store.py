"""In-memory checkpoint store: one directory per machine (under /dev/shm by default) that outlives the worker.

Layout::

    ROOT/machine-0003/iter-00000042/rank-00006.bin    raw bytes of every tensor of rank 6's shard, concatenated
    ROOT/machine-0003/iter-00000042/rank-00006.json   manifest: names, dtypes, shapes, offsets, size, checksum

A *thin copy* (runtime/replicas.py: an HSDP replica's copy of a peer's shard) is a shard file of the peer's own
part only, its manifest the whole shard's with a ``replica`` key naming the rank of this machine whose shard of the
same iteration holds the rest: it is listed only while that shard is, and :meth:`ShardStore.get` builds the whole.

A shard is written atomically: bytes to ``*.bin.tmp``, rename, then the manifest to ``*.json.tmp``, rename. A shard
is listed (:meth:`ShardStore.inventory`) only when its manifest exists and the bytes have its size, so a half-written
file from a worker killed mid-write is never listed; its checksum is checked when it is read (:meth:`get`), or, in
recovery, while it is used (runtime/recovery.py), so a corrupted byte never survives (recovery then drops that copy
and looks again). No pickle is involved anywhere: tensors are rebuilt from raw bytes with ``torch.frombuffer``.

Checkpoints are written in place (:meth:`ShardStore.slot`): the ``*.bin.tmp`` file is mapped into the process and
the checkpoint is copied (or received) straight into it, so the store costs no second copy of every checkpoint.
Files of dropped iterations are not freed but kept as spares (``ROOT/machine-0003/spare/``, one per rank) and
become the next checkpoint's file, so their memory is not allocated and zeroed again every iteration. A process
holds its mappings of them (and, on a GPU, keeps them page-locked), so that reusing one costs nothing; and it makes
the memory of its first checkpoints ready ahead, in the background (:meth:`ShardStore.prepare`), so that only its
first checkpoint pays for reserving, mapping and page-locking memory.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import json
import logging
import mmap
import os
import shutil
import threading
from pathlib import Path

import torch

from . import device, replicas
from .files import write_atomic, write_file
from .replicas import REPLICA
from .state import WORLD, verify

PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600

log = logging.getLogger("runtime")


def _entries(d: Path, pattern: str) -> list[Path]:
    """The entries of directory ``d`` that match ``pattern``, sorted; none when ``d`` is not there, even when another
    process of this machine removes it while it is being listed (it dropped that iteration first)."""
    try:
        return sorted(d.glob(pattern))
    except FileNotFoundError:
        return []


MADV_POPULATE_WRITE = 23  # Linux 5.14
POPULATE_PIECE = 64 << 20  # mapped in per call: the longest another thread of the process may wait to map memory


@functools.cache
def _madvise():
    """libc's ``madvise`` through ctypes, which releases the GIL for the call; None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def populate(mem: mmap.mmap, start: int, length: int) -> bool:
    """Map in the pages of bytes [start, start + length) of a shared, writable mapping (``start`` a multiple of the
    page size), reserving their memory, so that writing them does not fault page by page; False where the kernel
    cannot (before Linux 5.14), when they fault in as they are first written. It runs beside training (a slot made
    on the copier thread, :meth:`ShardStore.prepare`'s thread), so it holds neither the GIL (``MAP_POPULATE`` and
    ``mmap.madvise`` hold it throughout: 0.4 s per 0.6 GiB on this host, in which no other thread ran a line of
    Python) nor the process's memory map for long (mapping pages in holds it; every allocation of the training
    thread that maps memory waits for it): it maps in 64 MiB per call, 12 ms at most on this host."""
    advise = _madvise()
    if advise is None:
        return False
    base = ctypes.addressof(ctypes.c_char.from_buffer(mem))  # the export ends with the statement
    for at in range(start, start + length, POPULATE_PIECE):
        if advise(base + at, min(POPULATE_PIECE, start + length - at), MADV_POPULATE_WRITE) != 0:
            return False
    return True


class StoreError(RuntimeError):
    """The store cannot be used where it was asked for (one line)."""


def private_dir(path: Path) -> Path:
    """Make ``path`` (and missing parents) a folder only this user can enter; refuse one that others own or may
    read."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            pass
        except OSError as e:
            raise StoreError(f"cannot create the checkpoint store folder {d}: {e.strerror}") from None
        os.chmod(d, PRIVATE_DIR)  # whatever the umask
    if not path.is_dir():
        raise StoreError(f"checkpoint store {path} is not a folder")
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise StoreError(f"checkpoint store {path} belongs to another user (uid {st.st_uid})")
    if st.st_mode & 0o077:
        os.chmod(path, PRIVATE_DIR)
    if not os.access(path, os.W_OK | os.X_OK):
        raise StoreError(f"checkpoint store {path} is not writable")
    return path


class ShardStore:
    """The shards held in one machine's memory: ``ROOT/machine-NAME`` (NAME: the machine's index, or ``node``)."""

    def __init__(self, root: str | Path, machine: int | str):
        self.root = private_dir(Path(root))
        name = f"{machine:04d}" if isinstance(machine, int) else str(machine)
        self.dir = private_dir(self.root / f"machine-{name}")
        # this process's mappings of the files it wrote through slots (or made ready, see prepare): committed, by
        # (iteration, rank), and spares, by rank (see keep_newest); each holds its file open, so its inode cannot be
        # another file's
        self._held: dict[tuple[int, int], Slot] = {}
        self._spares: dict[int, list[Slot]] = {}
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)  # a spare was made ready, or preparing ended
        self._pending: dict[int, int] = {}  # by rank: spares prepare() is still making ready
        self._made = itertools.count()  # names the files prepare() makes
        self._prepared: dict[int, int] = {}  # by rank: the shard size prepare() was last called for
        self._committed = threading.Condition()  # a shard was committed by this process (wait_committed)
        self._dropping = threading.Lock()  # one drop at a time in this process (training's and the receivers')

    def iteration_dir(self, iteration: int) -> Path:
        return self.dir / f"iter-{iteration:08d}"

    def paths(self, iteration: int, rank: int) -> tuple[Path, Path]:
        d = self.iteration_dir(iteration)
        return d / f"rank-{rank:05d}.bin", d / f"rank-{rank:05d}.json"

    def slot(self, iteration: int, rank: int, size: int, reserve: bool = True) -> "Slot":
        """Room for ``size`` bytes of ``rank``'s shard of ``iteration``, in the store's memory: write the shard into
        ``slot.tensor``, then :meth:`Slot.commit` it. Takes this rank's spare file when there is one of that size,
        and the mapping of it this process still holds, if any (then nothing is mapped or faulted in again).
        ``reserve=False``: the memory is not reserved yet; the caller reserves each range (:meth:`Slot.reserve`)
        before anything is written into it."""
        bin_path, _ = self.paths(iteration, rank)
        private_dir(bin_path.parent)
        tmp = bin_path.with_name(bin_path.name + ".tmp")
        if not self._spares.get(rank):  # another process of this machine may have made a file this one maps a spare
            self._let_go()
        with self._ready:  # one being made ready (prepare) comes sooner than new memory would
            self._ready.wait_for(lambda: self._spares.get(rank) or not self._pending.get(rank))
            held = {s.ino: s for s in self._spares.pop(rank, [])}
        found = []  # (not held, name, inode) of every spare file of the right size: one this process maps first
        for spare in self._spares_of(rank):
            try:
                st = spare.stat()
                if st.st_size == size:
                    found.append((st.st_ino not in held, spare, st.st_ino))
                else:
                    spare.unlink()
            except FileNotFoundError:  # another process of this machine dropped it meanwhile
                continue
        taken = None
        for _, spare, ino in sorted(found):
            try:
                os.replace(spare, tmp)
            except FileNotFoundError:
                continue
            taken = ino
            break
        still = {ino for _, _, ino in found} - {taken}
        with self._lock:  # the other mappings held of spares still there stay held
            self._spares.setdefault(rank, []).extend(s for ino, s in held.items() if ino in still)
        for ino, s in held.items():
            if ino not in still and ino != taken:
                s.close()
        if taken in held:  # the very file we hold mapped
            slot = held[taken]
            slot.reopen(iteration, tmp)
            slot.memory = "held"
            return slot
        if taken is None:
            tmp.unlink(missing_ok=True)
        slot = Slot(self, iteration, rank, tmp, size, reserve)
        slot.memory = "spare" if taken is not None else "new"
        return slot

    def prepare(self, rank: int, size: int, files: int, lock=None) -> threading.Thread | None:
        """Make the memory of ``rank``'s next checkpoints ready now, in the background: the store holds up to
        ``files`` files of each rank (``keep`` complete checkpoints and the one being written); those missing are
        reserved, mapped and (``lock``, called with each Slot: page-locked for a GPU's copies) made ready as spares,
        and this process maps (and locks) the rank's files it does not hold yet (left by an earlier process), so
        that every later checkpoint of ``rank`` finds a mapping held (:meth:`slot`). Called once the first
        checkpoint is in its slot (its size known), so as not to compete with its copy. A :meth:`slot` wanting
        memory while a spare is being made ready waits for it. Returns the thread, or None when there is nothing to
        do (``files`` 0: nothing is made ready), and at once when it was called for this rank and size before, so
        it may be called for every checkpoint. A failure (no room left) only ends the preparing: the checkpoint
        that then needs the memory says so."""
        if files <= 0 or self._prepared.get(rank) == size:
            return None
        self._prepared[rank] = size
        with self._lock:
            held_inos = {s.ino for s in self._held.values()} | {s.ino for s in self._spares.get(rank, [])}
        shards = [(it, self.paths(it, rank)[0]) for it in self.iterations()]
        files_now = sum(p.with_name(p.name + ".tmp").exists() for _, p in shards)  # checkpoints being written
        adopt_shards, adopt_spares = [], []  # files here this process does not map yet
        for it, path in shards + [(None, p) for p in self._spares_of(rank)]:
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            files_now += 1
            if st.st_size == size and st.st_ino not in held_inos:
                if it is None:
                    adopt_spares.append(path)
                else:
                    adopt_shards.append((it, path, st.st_ino))
        new = max(0, files - files_now)
        if not (new or adopt_spares or adopt_shards):
            return None
        with self._lock:
            self._pending[rank] = self._pending.get(rank, 0) + new + len(adopt_spares)
        thread = threading.Thread(target=self._prepare, args=(rank, size, new, adopt_spares, adopt_shards, lock),
                                  daemon=True, name=f"gemini-prepare-{rank}")
        thread.start()
        return thread

    def _prepare(self, rank: int, size: int, new: int, spares: list[Path], shards: list, lock) -> None:
        def locked(slot: "Slot") -> "Slot":
            if lock is not None:
                lock(slot)
            return slot

        def mapped(path: Path, it: int, ino: int | None = None) -> "Slot | None":
            """A file of the store mapped (and locked); None if it is gone, or (``ino``) is another file now."""
            try:
                slot = Slot(self, it, rank, path, size, create=False)
            except FileNotFoundError:
                return None
            if ino is not None and slot.ino != ino:
                slot.close()
                return None
            return locked(slot)

        def add_spare(slot: "Slot | None", counted: bool = True) -> None:
            with self._ready:
                if slot is not None:
                    self._spares.setdefault(rank, []).append(slot)
                if counted:
                    self._pending[rank] -= 1
                self._ready.notify_all()

        try:
            for path in spares:  # files left spare by an earlier process (None: taken or dropped meanwhile)
                add_spare(mapped(path, -1))
            for _ in range(new):
                private_dir(self.spare_dir)
                tmp = self.spare_dir / f"rank-{rank:05d}-ready-{os.getpid()}-{next(self._made)}.tmp"  # not a spare yet
                slot = locked(Slot(self, -1, rank, tmp, size))
                slot.tmp = tmp.with_suffix(".bin")
                os.replace(tmp, slot.tmp)
                add_spare(slot)
            for it, path, ino in shards:  # an earlier process's shards: mapped (and locked) before they are spares
                slot = mapped(path, it, ino)
                if slot is None:  # dropped meanwhile: a spare now, if it is still this file
                    spare = mapped(self._spare_path(rank, it), -1, ino)
                    if spare is not None:
                        add_spare(spare, counted=False)
                    continue
                with self._lock:
                    if (it, rank) not in self._held:
                        self._held[(it, rank)], slot = slot, None
                if slot is not None:
                    slot.close()
        except Exception as e:  # noqa: BLE001 - only an optimisation: the checkpoints make their own memory
            log.info("store memory of rank %d not made ready ahead: %s", rank, e)
        finally:
            with self._ready:
                self._pending[rank] = 0
                self._ready.notify_all()

    @property
    def spare_dir(self) -> Path:
        return self.dir / "spare"

    def _spare_path(self, rank: int, iteration: int) -> Path:
        return self.spare_dir / f"rank-{rank:05d}-{iteration:08d}.bin"

    def _spares_of(self, rank: int) -> list[Path]:
        return _entries(self.spare_dir, f"rank-{rank:05d}-*.bin")

    def put(self, iteration: int, rank: int, data: bytes, manifest: dict) -> None:
        """Write a whole shard from bytes (a plain new file; checkpoints in flight go through :meth:`slot`)."""
        bin_path, _ = self.paths(iteration, rank)
        private_dir(bin_path.parent)
        tmp = bin_path.with_name(bin_path.name + ".tmp")
        write_file(tmp, data, PRIVATE_FILE)
        self._commit(tmp, iteration, rank, manifest)

    def _commit(self, tmp: Path, iteration: int, rank: int, manifest: dict) -> None:
        bin_path, json_path = self.paths(iteration, rank)
        os.replace(tmp, bin_path)
        meta = dict(manifest, iteration=iteration, rank=rank)
        write_atomic(json_path, json.dumps(meta), PRIVATE_FILE)  # the manifest is committed last
        with self._committed:
            self._committed.notify_all()

    def wait_committed(self, iteration: int, rank: int, timeout: float) -> dict | None:
        """The manifest of ``rank``'s shard of ``iteration`` once this process has committed it (None if it has not
        within ``timeout`` seconds): a thin copy is checked against its twin's (runtime/replicas.py)."""
        json_path = self.paths(iteration, rank)[1]
        with self._committed:
            self._committed.wait_for(json_path.exists, timeout)
        try:
            return json.loads(json_path.read_text())
        except (OSError, ValueError):
            return None

    def get(self, iteration: int, rank: int, check: bool = True) -> tuple[memoryview, dict] | None:
        """The shard's bytes and manifest if it is complete and intact (``check``: its checksum verified), else
        None. The bytes are a private (copy-on-write) mapping of the stored file: nothing is copied to read them,
        and writing to them never changes the store; but the file may later be reused for another checkpoint (see
        :meth:`keep_newest`), which shows through every page not written here, so copy out what must outlast it."""
        bin_path, json_path = self.paths(iteration, rank)
        try:
            manifest = json.loads(json_path.read_text())
            with open(bin_path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                data = memoryview(mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE,
                                            prot=mmap.PROT_READ | mmap.PROT_WRITE)) if size else memoryview(b"")
        except (OSError, ValueError):
            return None
        if REPLICA in manifest:  # a thin copy: the whole shard made of it and its twin's (runtime/replicas.py)
            thin = manifest[REPLICA]
            twin = self.get(iteration, thin["rank"], check=False) \
                if len(data) == thin.get("bytes") and thin.get("rank") != rank else None
            data = replicas.rebuild(manifest, data, *twin) if twin is not None else None
            if data is None:
                return None
            manifest = {k: v for k, v in manifest.items() if k != REPLICA}  # the whole shard's, as its sender's
        if len(data) != manifest.get("size") or (check and not verify(data, manifest)):
            return None
        return data, manifest

    def inventory(self) -> list[tuple[int, int]]:
        """(iteration, rank) of every committed shard held here whose bytes have the manifest's size. Cheap: the
        checksum is left to :meth:`get`, when the shard is read (hashing every held shard would cost recovery a pass
        over all of them)."""
        return [(it, rank) for it, rank, _ in self.listing()]

    def listing(self) -> list[tuple[int, int, int]]:
        """:meth:`inventory`, with the world size of the job that wrote each shard (-1 where it does not say)."""
        out = []
        for d in _entries(self.dir, "iter-*"):
            it = int(d.name.split("-")[1])
            found, twins = [], {}
            for j in _entries(d, "rank-*.json"):
                rank = int(j.stem.split("-")[1])
                try:
                    meta = json.loads(j.read_text())
                    thin = meta.get(REPLICA)
                    size = meta.get("size") if thin is None else thin.get("bytes")
                    if self.paths(it, rank)[0].stat().st_size == size:
                        world = meta.get("skeleton", {}).get(WORLD, -1)
                        found.append((it, rank, world if isinstance(world, int) and world > 0 else -1))
                        if thin is not None:
                            twins[rank] = thin.get("rank")
                except (OSError, ValueError, AttributeError):
                    continue
            # a thin copy counts while its twin's shard of the same iteration is here whole
            whole = {rank for _, rank, _ in found if rank not in twins}
            out += [row for row in found if row[1] not in twins or twins[row[1]] in whole]
        return out

    def discard(self, iteration: int, rank: int) -> None:
        """Drop a shard (one whose checksum failed): its manifest first, so it is never listed again."""
        for path in reversed(self.paths(iteration, rank)):
            path.unlink(missing_ok=True)

    def iterations(self) -> list[int]:
        return [int(d.name.split("-")[1]) for d in _entries(self.dir, "iter-*")]

    def keep_newest(self, keep: int, ranks=()) -> None:
        """Drop the iterations older than the newest ``keep`` complete ones this machine holds (0: drop them all).
        ``ranks``: the ranks whose shards this machine holds, its processes' own and those they receive from peers;
        an iteration is complete here once every one of them is committed (none given: once any shard is). Newer
        ones still being written (this machine's slower processes, or a peer that started its next checkpoint ahead)
        do not count, so they never push out a complete one, and are kept; so is an older one still being written (a
        peer's late checkpoint), until a later call. The files of the ``ranks``' shards become spares for
        :meth:`slot`, at most one per rank, whichever process of the machine drops them; the rest are freed."""
        with self._dropping:
            its = self.iterations()
            if keep:
                complete = [it for it in its if self._complete(it, ranks)]
                cutoff = complete[-keep] if len(complete) >= keep else -1
                its = [it for it in its if it < cutoff and not _entries(self.iteration_dir(it), "*.tmp")]
            for it in its:
                self._drop(it, ranks)
            self._let_go()

    def _complete(self, it: int, ranks) -> bool:
        if not ranks:
            return bool(_entries(self.iteration_dir(it), "rank-*.json"))
        return all(self.paths(it, rank)[1].exists() for rank in ranks)

    def _drop(self, it: int, ranks=()) -> None:
        """Drop iteration ``it``; the files of the shards of ``ranks`` become spares, at most one per rank (their
        memory is reserved and mapped already: a new checkpoint written into one skips that)."""
        for rank in ranks:
            bin_path, json_path = self.paths(it, rank)
            json_path.unlink(missing_ok=True)  # no longer a shard before its bytes change hands
            try:
                if not self._spares_of(rank):
                    private_dir(self.spare_dir)
                    os.replace(bin_path, self._spare_path(rank, it))
            except FileNotFoundError:  # not here, or another process of this machine dropped the iteration first
                pass
        shutil.rmtree(self.iteration_dir(it), ignore_errors=True)

    def drop_after(self, iteration: int, ranks=()) -> list[int]:
        """Drop every iteration newer than ``iteration`` and return them: recovery resumed from ``iteration``, so
        they belong to a run that was abandoned, and the iterations trained again will be stored in their place (a
        copy of the old one left on some machine must never be taken for the new). The committed shards of
        ``ranks`` become spares, as in :meth:`keep_newest`, so the first checkpoints after a restart need not
        reserve new memory."""
        with self._dropping:
            gone = [it for it in self.iterations() if it > iteration]
            for it in gone:
                self._drop(it, ranks)
            self._let_go()
        return gone

    def _let_go(self) -> None:
        """Let go of this process's mappings of iterations no longer here (dropped by it or by another process of
        this machine), except that a mapping whose file became its rank's spare is kept as this process's spare (the
        next checkpoint of that rank then maps and page-locks nothing again)."""
        with self._lock:  # looked at under the lock that commits take: a listing made before would miss the folder of
            # a shard another thread of this process took a slot for and committed since (its receiver's, its copier's)
            gone = [k for k in self._held if not self.iteration_dir(k[0]).is_dir()]
            slots = [self._held.pop(k) for k in gone]
        for slot in slots:
            try:
                same = slot.fd >= 0 and self._spare_path(slot.rank, slot.iteration).stat().st_ino == slot.ino
            except FileNotFoundError:
                same = False
            with self._lock:
                mine = self._spares.setdefault(slot.rank, [])
                if same and all(s.ino != slot.ino for s in mine):
                    mine.append(slot)
                    slot = None
            if slot is not None:
                slot.close()

    def clean_partial(self) -> None:
        """Remove what a crashed process left half-written: shards, and spares it was making ready."""
        for d in [*_entries(self.dir, "iter-*"), self.spare_dir]:
            for tmp in _entries(d, "*.tmp"):
                tmp.unlink(missing_ok=True)

    def wipe(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        private_dir(self.dir)

    def release(self) -> None:
        """Let go of every mapping this process holds of the store's files (committed shards and spares), once it
        writes no more: what is freed then returns its memory."""
        with self._ready:
            self._ready.wait_for(lambda: not any(self._pending.values()))  # spares still being made ready
            slots = list(self._held.values()) + [s for spares in self._spares.values() for s in spares]
            self._held.clear()
            self._spares.clear()
        for slot in slots:
            slot.close()


class Slot:
    """One shard being written in place (see :meth:`ShardStore.slot`). Nothing of it counts until :meth:`commit`.
    It keeps its file open and mapped (``tensor`` is the mapping) until :meth:`close`."""

    def __init__(self, store: ShardStore, iteration: int, rank: int, tmp: Path, size: int, reserve: bool = True,
                 create: bool = True):
        """``create=False``: map a whole file of ``size`` bytes already in the store (FileNotFoundError if it is
        gone), its memory already there."""
        self.store, self.iteration, self.rank, self.tmp, self.size = store, iteration, rank, tmp, size
        self.fd = os.open(tmp, os.O_RDWR | (os.O_CREAT if create else 0), PRIVATE_FILE)
        st = os.fstat(self.fd)
        self.ino = st.st_ino
        if create:
            os.fchmod(self.fd, PRIVATE_FILE)
            if st.st_size != size:
                os.ftruncate(self.fd, size)
        elif st.st_size != size:
            os.close(self.fd)
            raise FileNotFoundError(f"{tmp} is no longer a file of {size} bytes")
        if reserve and create:
            self._fallocate(0, size)
        self._mem = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED) if size else None
        # the pages mapped in ahead, not faulted in one by one while the checkpoint is copied (see populate)
        if reserve and size and not populate(self._mem, 0, size):
            self._mem.close()  # a kernel before 5.14: mapped in one go all the same, holding the GIL
            self._mem = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        self.tensor = torch.frombuffer(self._mem, dtype=torch.uint8, count=size) if size else \
            torch.empty(0, dtype=torch.uint8)
        # the CUDA device whose copies this slot's memory was page-locked for (runtime/device.py), once per slot
        self.locked_for = None
        self.lock_refused = False  # the driver refused to page-lock it: not tried again
        # where its memory came from (ShardStore.slot): "held", a mapping this process held already (nothing to map
        # or page-lock); "spare", the file of a dropped shard, mapped anew; "new", memory reserved for it
        self.memory = "new"

    def _fallocate(self, start: int, end: int) -> None:
        """Reserve the memory of bytes [start, end): a write into a mapping of a full tmpfs would kill the process
        (SIGBUS), so nothing is written where this has not succeeded. A failure lets the slot go."""
        if end <= start:
            return
        try:
            os.posix_fallocate(self.fd, start, end - start)
        except OSError as e:
            os.close(self.fd)
            self.fd = -1
            self.tmp.unlink(missing_ok=True)
            raise StoreError(f"no room for a {self.size / 2**20:.1f} MiB shard in {self.tmp.parent} "
                             f"({e.strerror}): free memory in its file system or name another store root") from None

    def reserve(self, start: int, end: int) -> None:
        """For a slot made with ``reserve=False``: reserve bytes [start, end) (``start`` a multiple of the page
        size) and map them in, so that writing them neither faults page by page nor can hit a full file system.
        Reserving one range while another is being written lets the two overlap (a shard received in recovery)."""
        if end <= start:
            return
        self._fallocate(start, end)
        populate(self._mem, start, end - start)  # Linux 5.14+; elsewhere the pages fault in as they are written

    def reopen(self, iteration: int, tmp: Path) -> None:
        """The same file and mapping, now for another iteration's shard (the file was moved to ``tmp``)."""
        self.iteration, self.tmp = iteration, tmp

    def view(self) -> memoryview:
        return memoryview(self.tensor.numpy())

    def commit(self, manifest: dict, before_commit=None) -> None:
        """The shard is complete: make it count (bytes renamed into place, then the manifest)."""
        if before_commit:
            before_commit()  # fault injection: die with the bytes written and the shard not committed
        self.store._commit(self.tmp, self.iteration, self.rank, manifest)
        with self.store._lock:
            old = self.store._held.pop((self.iteration, self.rank), None)
            self.store._held[(self.iteration, self.rank)] = self
        if old is not None and old is not self:
            old.close()

    def close(self) -> None:
        """Let the file go (the mapping is freed with the last tensor that uses it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.locked_for is not None:
            device.page_unlock(self.tensor, self.locked_for)
            self.locked_for = None
        self.tensor = self._mem = None
