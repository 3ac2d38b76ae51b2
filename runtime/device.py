"""The accelerator's side of a checkpoint: CUDA tensors copied into the store's host memory at the PCIe limit.

The store keeps each shard in a mapping of a /dev/shm file, so the copy outlives a crashed worker. A device-to-host
copy into an ordinary mapping runs at pageable speed (about 12 GB/s on an H100 host, ../shared/GPU.md), so the
mapping is page-locked once with ``cudaHostRegister`` (68 ms/GiB there, paid once per slot: slots are reused), after
which copies into it run as fast as into pinned memory (about 54 GB/s). The copies run on a side stream of their
own, after an event that marks the state as of the optimizer step; the training stream waits on the event of the
last chunk only where the next update would overwrite the state (:meth:`runtime.pipeline.InFlight.wait_copied`),
so the host never blocks on the copy and compute overlaps it.

Everything here is a no-op for CPU tensors: the CPU path copies with ``Tensor.copy_`` on the copier thread.
"""

from __future__ import annotations

import threading

import torch

_streams: dict = {}
_lock = threading.Lock()


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
    cannot be done (no CUDA, or the driver refused): copies then still work, at pageable speed."""
    if not torch.cuda.is_available() or tensor.numel() == 0:
        return False
    rc = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(), 0)
    return int(rc) == 0


def page_unlock(tensor: torch.Tensor) -> None:
    if torch.cuda.is_available() and tensor is not None and tensor.numel():
        torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())


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
