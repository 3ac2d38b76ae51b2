"""The accelerator's side of a checkpoint: CUDA tensors copied into the store's host memory at the PCIe limit.

The store keeps each shard in a mapping of a /dev/shm file, so the copy outlives a crashed worker. A device-to-host
copy into an ordinary mapping runs at pageable speed (about 12 GB/s on an H100 host, ../shared/GPU.md), so the mapping
is page-locked once with ``cudaHostRegister`` (68 ms/GiB there, paid once per slot: slots are reused), after which
copies into it run as fast as into pinned memory (about 54 GB/s). Where the driver refuses (a sandbox that does not
allow it, say), the copies run at pageable speed: the reason is logged once per process and written into the rank's
timings, and the error the refusal left pending in the CUDA runtime is cleared, as PyTorch would otherwise report it
at the next kernel launch on that thread. The copies run on a side stream of their own, after an event that marks the
state as of the optimizer step; the training stream waits on the event of the last chunk only where the next update
would overwrite the state (:meth:`runtime.pipeline.InFlight.wait_copied`), so the host never blocks on the copy and
compute overlaps it.

Recovery copies the other way (:func:`copy_in`). The store's mapping in a new process is not page-locked, and
registering it would cost more than the copy, so the bytes go through two page-locked staging buffers: CPU threads
fill one from the mapping while the GPU copies the other in (../shared/GPU.md measured 22-33 GB/s for the same
double buffering the other way, against 12 GB/s for a pageable copy).

Everything else here is a no-op for CPU tensors: the CPU path copies with ``Tensor.copy_`` on the copier thread.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial

import torch

from .state import as_bytes

STAGE_BYTES = 128 << 20  # each of copy_in's two staging buffers
FILL_PIECE = 8 << 20  # the part of a staging buffer one filling thread copies at a time

# cudaHostRegisterPortable: page-locked for every device's context, not only the current one's, so that a slot
# registered by one thread is fast for any copier and is unregistered from any thread
HOST_REGISTER_PORTABLE = 1

log = logging.getLogger("runtime")
_streams: dict = {}
_lock = threading.Lock()
_refusal: list[str] = []  # why page-locking host memory first failed in this process (one reason at most)


def side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The checkpoint's own CUDA stream on ``device`` (one per device and process)."""
    with _lock:
        if device not in _streams:
            _streams[device] = torch.cuda.Stream(device)
        return _streams[device]


def mark(device: torch.device) -> "torch.cuda.Event | None":
    """An event after everything queued so far on ``device``'s current stream (None for a CPU device)."""
    if device.type != "cuda":
        return None
    return torch.cuda.current_stream(device).record_event()


def page_lock(tensor: torch.Tensor) -> bool:
    """Page-lock host memory (a store slot's mapping) for fast, asynchronous device copies; False where this
    cannot be done (no CUDA, or the driver refused: the reason is logged once per process and kept, see
    :func:`refused`): copies then still work, at pageable speed."""
    if not torch.cuda.is_available() or tensor.numel() == 0:
        return False
    try:
        cudart = torch.cuda.cudart()
        rc = cudart.cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(),
                                     HOST_REGISTER_PORTABLE)
    except (AttributeError, RuntimeError) as e:  # a torch build without the binding, or a CUDA error raised
        return _refuse(f"cudaHostRegister: {type(e).__name__}: {e}")
    if int(rc) == 0:
        return True
    try:
        why = cudart.cudaGetErrorString(rc)
    except (AttributeError, RuntimeError, TypeError):
        why = f"CUDA error {int(rc)}"
    return _refuse(f"cudaHostRegister: {why}")


def _refuse(why: str) -> bool:
    """Page-locking failed: clear the error it left, say so once per process, keep the reason; False."""
    drain_cuda_error()
    with _lock:
        first = not _refusal
        if first:
            _refusal.append(why)
    if first:
        log.warning("page-locking CPU memory failed (%s): copies between the GPU and the checkpoint store run at "
                    "pageable speed", why)
    return False


def refused() -> str | None:
    """Why page-locking host memory failed in this process (the first reason), None where it never did; written
    into the rank's timings (``page_lock_refused``)."""
    return _refusal[0] if _refusal else None


@cache
def cudart_paths(maps: str = "/proc/self/maps") -> tuple[str, ...]:
    """The CUDA runtime libraries mapped into this process (``libcudart.so.13``, or a wheel's bundled
    ``libcudart-HASH.so.12``): where torch's CUDA calls go."""
    try:
        with open(maps) as f:
            paths = {line.split(maxsplit=5)[5].strip() for line in f
                     if line.count(" ") >= 5 and "libcudart" in line.rsplit("/", 1)[-1]}
    except OSError:
        return ()
    return tuple(sorted(p.removesuffix(" (deleted)") for p in paths if p.startswith("/")))


def drain_cuda_error() -> None:
    """Consume the error a failed CUDA runtime call left pending on this thread. The runtime keeps it until
    ``cudaGetLastError`` is called, and PyTorch checks that after its kernel launches, so an error we recovered from
    would otherwise fail the next, unrelated kernel launch on this thread. Torch's ``cudart()`` binding has no
    ``cudaGetLastError``: it is called in every CUDA runtime library mapped here (loading a mapped library again
    returns the one loaded)."""
    for path in cudart_paths():
        try:
            fn = ctypes.CDLL(path).cudaGetLastError
        except (OSError, AttributeError):
            continue
        fn.restype, fn.argtypes = ctypes.c_int, []
        fn()


def page_lock_slot(slot, device: torch.device) -> None:
    """Page-lock a store slot's mapping (runtime/store.py) for copies with ``device``, once per slot: a slot
    the driver refused is not tried again."""
    if slot.locked_for is not None or slot.lock_refused:
        return
    with torch.cuda.device(device):
        if page_lock(slot.tensor):
            slot.locked_for = device
        else:
            slot.lock_refused = True


def slot_locker(device: torch.device | None):
    """What :meth:`runtime.store.ShardStore.prepare` calls on each slot it makes ready for copies from ``device``
    (None for a CPU device: nothing to lock)."""
    return None if device is None or device.type != "cuda" else partial(page_lock_slot, device=device)


def page_unlock(tensor: torch.Tensor, device: torch.device) -> None:
    """Undo :func:`page_lock`, from any thread: on ``device``, the one it was locked for (a thread's CUDA calls
    otherwise go to device 0, where the first one would open a context on another rank's GPU)."""
    if torch.cuda.is_available() and tensor is not None and tensor.numel():
        with torch.cuda.device(device):
            if int(torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())) != 0:
                drain_cuda_error()  # (the memory is let go all the same)


def copy_out(device: torch.device, pieces, ready) -> list:
    """Queue the copies of ``pieces`` (a list per chunk of ``(destination slice, source view)``) on ``device``'s side
    stream after the event ``ready``; return each chunk's completion event."""
    stream = side_stream(device)
    if ready is not None:
        stream.wait_event(ready)
    events = []
    with torch.cuda.stream(stream):
        for chunk in pieces:
            for dst, src in chunk:
                dst.copy_(src, non_blocking=True)
            events.append(stream.record_event())
    return events


def wait_on(device: torch.device, event) -> tuple:
    """Make ``device``'s current stream wait for ``event`` (the host does not wait); return the timing events
    recorded on that stream just before and after the wait, for :func:`waited_s`."""
    stream = torch.cuda.current_stream(device)
    before = stream.record_event(torch.cuda.Event(enable_timing=True))
    stream.wait_event(event)
    return before, stream.record_event(torch.cuda.Event(enable_timing=True))


def waited_s(marks: tuple, block: bool = True) -> float | None:
    """How long the stream was held up by a :func:`wait_on` (device time, seconds): from when its earlier work was
    done until the awaited event had happened too; 0 where the event came first. None, with ``block`` False, while
    the stream has not got that far yet (with ``block``, the host waits for it)."""
    before, after = marks
    if not block and not after.query():
        return None
    after.synchronize()
    return before.elapsed_time(after) / 1000


def staging(nbytes: int, pinned: bool) -> torch.Tensor:
    """A staging buffer of ``nbytes``: page-locked where asked and CUDA allows, else ordinary memory (the copies
    from it are then synchronous: slower, still correct; the refusal is reported as :func:`page_lock`'s)."""
    if pinned:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError as e:
            _refuse(f"pinned allocation: {e}".splitlines()[0])
    return torch.empty(nbytes, dtype=torch.uint8)


def copy_in(pairs, device: torch.device, stage_bytes: int = STAGE_BYTES, threads: int = 4, ready=None) -> None:
    """Copy CPU tensors into tensors on ``device`` through two staging buffers, page-locked on a GPU: while the
    device copies one buffer in (on the checkpoint's side stream, after what the current stream has queued),
    ``threads`` CPU threads fill the other from the sources, which may be pageable (a store's mapping). ``pairs``:
    (destination on ``device``, source on the CPU), contiguous, with as many bytes each. ``ready(k)``, for sources
    still arriving: returns once pair ``k``'s source is all there; called before it is first read. Returns when
    every byte has arrived. On a CPU ``device`` the same staging runs with plain memory (what the CPU tests
    check)."""
    if not all(d.is_contiguous() for d, _ in pairs):
        raise ValueError("copy_in: a destination is not contiguous")
    pairs = [(as_bytes(d), as_bytes(s)) for d, s in pairs]
    if any(d.numel() != s.numel() for d, s in pairs):
        raise ValueError("copy_in: a destination and its source differ in size")
    total = sum(s.numel() for _, s in pairs)
    if not total:
        return
    cuda = device.type == "cuda"
    size = min(stage_bytes, total)
    stages = [staging(size, pinned=cuda) for _ in range(2)]
    done: list = [None, None]  # per staging buffer: the event after the device's copies out of it
    stream = side_stream(device) if cuda else None
    if cuda:
        stream.wait_stream(torch.cuda.current_stream(device))  # the destinations' earlier work comes first
    flat = iter(enumerate(pairs))
    dst, src, pos = None, None, 0  # the pair being staged, and how far
    with ThreadPoolExecutor(threads, thread_name_prefix="gemini-copy-in") as pool:
        for turn in range((total + size - 1) // size):
            i = turn % 2
            if done[i] is not None:
                done[i].synchronize()  # the device has read this buffer: it may be filled again
            fills, copies, used = [], [], 0  # (staging slice, source slice); (destination slice, staging slice)
            while used < size:
                if dst is None or pos == src.numel():
                    k, nxt = next(flat, (None, None))
                    if nxt is None:
                        break
                    if ready is not None:
                        ready(k)
                    (dst, src), pos = nxt, 0
                    continue
                n = min(size - used, src.numel() - pos)
                stage = stages[i][used:used + n]
                fills += [(stage[a:a + FILL_PIECE], src[pos + a:pos + min(n, a + FILL_PIECE)])
                          for a in range(0, n, FILL_PIECE)]
                copies.append((dst[pos:pos + n], stage))
                used, pos = used + n, pos + n
            list(pool.map(lambda f: f[0].copy_(f[1]), fills))
            if cuda:
                with torch.cuda.stream(stream):
                    for d, st in copies:
                        d.copy_(st, non_blocking=True)
                    done[i] = stream.record_event()
            else:
                for d, st in copies:
                    d.copy_(st)
    for ev in done:
        if ev is not None:
            ev.synchronize()
