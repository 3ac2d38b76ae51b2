"""Loading a checkpoint into the live training state: whatever its source (runtime/sources.py says where its bytes
come from), a rank's tensors under their flat keys and its skeleton go into the model's parameters and buffers, the
optimizer's state and hyperparameters, and every extra object (``load_state_dict``).

Every tensor is copied into a live tensor (on a GPU through page-locked staging, runtime/device.py: ``copy_in``) or
into one of its own, so nothing handed on views the store's memory, which later checkpoints reuse. A fresh optimizer
first gets room for the checkpoint's state, so that ``get_state_dict`` does not make it with a throwaway optimizer
step; where every tensor went into live storage, only the optimizer's hyperparameters are left to set, instead of
``set_state_dict`` loading every tensor again.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import set_state_dict
from torch.distributed.tensor import DTensor

from . import device
from .capture import StateCapture
from .state import TENSOR, StateError, flatten, local, unflatten


def allocate_optimizer_state(capture: StateCapture, tensors: dict[str, torch.Tensor], skeleton) -> None:
    """Give a fresh optimizer room for the checkpoint's per-parameter state (empty tensors of its shapes, where
    the parameters live, sharded like them), so that ``get_state_dict`` does not create that state with a
    throwaway optimizer step, which cost most of a recovery on CPU. Nothing is done where the checkpoint's state
    is not all tensors keyed by parameter name (``get_state_dict`` then creates it as before)."""
    saved = (skeleton.get("optim", {}) if isinstance(skeleton, dict) else {}).get("state")
    if capture.optimizer.state or not isinstance(saved, dict):
        return
    params = dict(capture.model.named_parameters())
    group_of = {id(p): g for g in capture.optimizer.param_groups for p in g["params"]}
    fits = all(fqn in params and id(params[fqn]) in group_of and isinstance(st, dict)
               and all(isinstance(v, dict) and TENSOR in v for v in st.values()) for fqn, st in saved.items())
    if not fits:  # checked before anything is made: a half-made state would stop get_state_dict making the rest
        return
    for fqn, st in saved.items():
        p = params[fqn]
        shard = local(p)
        on_device = group_of[id(p)].get("capturable") or group_of[id(p)].get("fused")
        room = {}
        for name, ref in st.items():
            src = tensors[ref[TENSOR]]
            where = shard.device if src.dim() or on_device else torch.device("cpu")
            t = torch.empty(src.shape, dtype=src.dtype, device=where)
            if isinstance(p, DTensor) and src.shape == shard.shape and src.dim():
                t = DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                       stride=p.stride())
            room[name] = t
        capture.optimizer.state[p] = room

def restore(capture: StateCapture, tensors: dict[str, torch.Tensor], skeleton, ready=None) -> None:
    """Load a checkpoint's tensors and skeleton into the model, the optimizer and the extra state. ``tensors``
    may view the store's memory, whose file a later checkpoint reuses: every one is copied into a live tensor or
    into one of its own, so nothing handed on views it. ``ready(name)``, for tensors still arriving: returns
    once ``name``'s bytes are there; called before each is read (their shapes are known before)."""
    ready = ready or (lambda name: None)
    capture.forget()  # no capture made before this restore is followed after it
    allocate_optimizer_state(capture, tensors, skeleton)
    live, _ = flatten(capture.state())  # optimizer state is created here if there is none yet
    missing = sorted(k for k in live if k not in tensors and not k.startswith("extra/"))
    if missing:
        raise StateError(f"the checkpoint does not match the model: it lacks {missing[0]!r}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    # to_device: (destination on a GPU, source in CPU memory), copied in together; their names
    merged, to_device, names = {}, [], []
    with torch.no_grad():
        for k, src in tensors.items():
            cur = live.get(k)
            if cur is None:
                if not k.startswith("extra/"):
                    raise StateError(f"the checkpoint holds {k!r}, which the model and optimizer do not have")
                ready(k)
                merged[k] = src.clone()  # the user's object may keep it
                continue
            dst, loc = local(cur), local(src)
            if loc.data_ptr() == dst.data_ptr() and loc.shape == dst.shape:  # loaded in place (DCP)
                merged[k] = cur
            elif dst.shape == loc.shape and dst.dtype == loc.dtype:
                if dst.device.type == "cuda" and loc.device.type == "cpu" and dst.is_contiguous():
                    to_device.append((dst, loc))
                    names.append(k)
                else:
                    ready(k)
                    dst.copy_(loc)
                merged[k] = cur
            elif k.startswith("extra/"):
                ready(k)
                merged[k] = src.to(dst.device, copy=True)
            else:
                raise StateError(f"{k!r}: the checkpoint's {loc.dtype} {list(loc.shape)} does not fit this rank's "
                                 f"{dst.dtype} {list(dst.shape)}")
        if to_device:  # through page-locked staging at the PCIe rate, not from pageable memory
            device.copy_in(to_device, to_device[0][0].device, ready=lambda i: ready(names[i]))
    state = unflatten(skeleton, merged)
    if not _restored_in_place(capture, live, state):
        set_state_dict(capture.model, capture.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
    for name, obj in capture.extra.items():
        if name not in state.get("extra", {}):
            raise StateError(f"the checkpoint has no extra state {name!r}")
        obj.load_state_dict(state["extra"][name])

def _restored_in_place(capture: StateCapture, live: dict, state: dict) -> bool:
    """Finish a restore whose tensors were all copied into the live parameters, buffers and optimizer state
    (what ``get_state_dict`` returns for FSDP2 modules and torch's optimizers): only the optimizer's
    hyperparameters are left to set, which is all ``set_state_dict`` would add, at the cost of loading every
    tensor again. False (nothing changed) where that does not hold: ``set_state_dict`` does it instead."""
    storages = capture.live_storages() | {b.untyped_storage().data_ptr() for b in capture.model.buffers()}
    if any(local(t).untyped_storage().data_ptr() not in storages
           for k, t in live.items() if not k.startswith("extra/")):
        return False
    groups = state["optim"].get("param_groups", [])
    opt_state = state["optim"].get("state", {})
    if len(groups) != len(capture.optimizer.param_groups) or any(
            not isinstance(v, torch.Tensor) for st in opt_state.values() for v in st.values()):
        return False  # a non-tensor value in the optimizer's state: its owner is set by set_state_dict
    for mine, saved in zip(capture.optimizer.param_groups, groups):
        if len(mine["params"]) != len(saved.get("params", ())):
            return False
    for mine, saved in zip(capture.optimizer.param_groups, groups):
        mine.update({k: v for k, v in saved.items() if k != "params"})
    return True
