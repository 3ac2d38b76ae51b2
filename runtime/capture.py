"""What a checkpoint takes of a rank's state, at every checkpoint, on the training thread.

:class:`StateCapture` gives a checkpoint its ``(tensors, skeleton)`` (runtime/state.py's :func:`flatten` of
``{"model", "optim", "extra"}``): parameters and optimizer state as views of their live storage, which the copy
out reads while the next iteration trains (they change only at the update), and everything else (buffers, the
extra objects' state) copied now.

``get_state_dict`` works the state's names out afresh at every call (11 ms a checkpoint for the 4-block TinyGPT of
``make calibrate``, most of it there, on the training thread, where it adds to the iteration). Between two
checkpoints those names, and the tensors behind the parameters and the optimizer state, normally stay as they were:
so after a full capture, a *recipe* remembers, per leaf, either the live view it took or where the leaf's current
value is read (a buffer by name, an optimizer state's number, a parameter group's settings), and the next capture
follows it (under 1 ms there). It is used only while it holds: the same parameter objects and buffer names, optimizer
state for the same parameters with the same tensors under the same keys, each one's data where it was, and the same
parameter groups, checked before every use; anything else (a restore, a new parameter group or buffer, a parameter's
first optimizer state, an optimizer that replaces its state tensors) takes the full path and makes a new recipe. The
first captures along a new recipe are compared with full ones, leaf by leaf; any difference turns recipes off for
good (state dicts of a kind this does not know).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.tensor import DTensor

from .state import CHUNKS, TENSOR, WORLD, flatten, local

log = logging.getLogger("runtime")
CHECKS = 2  # captures along a new recipe compared with full ones


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Recipe:
    """How to capture the state again without ``get_state_dict`` (see the module's docstring): the full capture's
    keys, live views and skeleton, with the leaves that are read afresh every time marked."""

    def __init__(self, model, optimizer, state: dict, captured: tuple[dict, object], views: dict[int, torch.Tensor]):
        """``captured``: the full capture of ``state``; ``views``: its live views, by ``id`` of the tensor in
        ``state`` each was taken of. Raises ValueError where the state is not of a kind a recipe can follow."""
        tensors, skeleton = captured
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        self.params = tuple(model.parameters())
        self.buffer_names = tuple(buffers)
        self.skeleton = skeleton
        self.views: dict[str, torch.Tensor] = {}  # key -> live view, in the full capture's order
        self.buffers: dict[str, str] = {}  # key -> buffer name (copied every time)
        self.sources: list[tuple[torch.Tensor, int]] = []  # (parameter or optimizer state, where its data was)
        for (name, t), leaf in zip(state["model"].items(), skeleton["model"].values()):
            key = leaf[TENSOR] if isinstance(leaf, dict) and TENSOR in leaf else None
            if key is not None and name in params and id(t) in views:
                self.views[key] = views[id(t)]
                self.sources.append((params[name], views[id(t)].data_ptr()))
            elif key is not None and name in buffers:
                self.views[key] = None  # keeps the order; filled per capture
                self.buffers[key] = name
            else:
                raise ValueError(f"model state {name!r}")
        optim, oskel = state["optim"], skeleton["optim"]
        if list(optim) != ["state", "param_groups"] or len(optim["state"]) != len(optimizer.state):
            raise ValueError("optimizer state dict")
        self.numbers: list[tuple[str, str, torch.Tensor, object]] = []  # (fqn's, key's skeleton names, param, key)
        self.held: list[tuple[torch.Tensor, tuple]] = []  # (param, its optimizer state's items as captured)
        for (fqn, entries), (sfqn, sentries) in zip(optim["state"].items(), oskel["state"].items()):
            live = optimizer.state.get(params.get(fqn)) if fqn in params else None
            if live is None or list(live) != list(entries):
                raise ValueError(f"optimizer state {fqn!r}")
            for (k, v), (sk, leaf) in zip(entries.items(), sentries.items()):
                if isinstance(v, torch.Tensor):
                    if v is not live[k] or id(v) not in views:
                        raise ValueError(f"optimizer state {fqn}/{k}")
                    self.views[leaf[TENSOR]] = views[id(v)]
                    self.sources.append((v, views[id(v)].data_ptr()))
                elif flatten(v)[0]:
                    raise ValueError(f"optimizer state {fqn}/{k} holds tensors inside")
                else:
                    self.numbers.append((sfqn, sk, params[fqn], k))
            self.held.append((params[fqn], tuple((k, v if isinstance(v, torch.Tensor) else None)
                                                 for k, v in live.items())))
        if list(tensors)[:len(self.views)] != list(self.views):
            raise ValueError("the order of the state's tensors")
        groups, saved = optimizer.param_groups, optim["param_groups"]
        if len(saved) != len(groups) or any(list(s) != [k for k in g if k != "params"] + ["params"]
                                            or len(s["params"]) != len(g["params"]) for s, g in zip(saved, groups)):
            raise ValueError("parameter groups")
        self.group_params = [list(g["params"]) for g in groups]
        self.group_names = [list(s["params"]) for s in saved]

    def holds(self, model, optimizer) -> bool:
        """Are the parameters, buffers, optimizer state tensors and parameter groups the ones this recipe was made of,
        their data where it was (not moved by ``.data =``, ``model.to``)?"""
        mine = tuple(model.parameters())
        if len(mine) != len(self.params) or any(a is not b for a, b in zip(mine, self.params)):
            return False
        if any(local(t).data_ptr() != ptr for t, ptr in self.sources):
            return False
        if tuple(name for name, _ in model.named_buffers()) != self.buffer_names:  # one registered since
            return False
        if len(optimizer.state) != len(self.held):  # a parameter's state made since (its first gradient)
            return False
        for p, items in self.held:  # the optimizer's state now (load_state_dict replaces it), as it was
            live = optimizer.state.get(p)
            if live is None or len(live) != len(items) or any(
                    k not in live or (t is not None and live[k] is not t)
                    or (t is None and isinstance(live[k], torch.Tensor)) for k, t in items):
                return False
        groups = optimizer.param_groups
        return len(groups) == len(self.group_params) and all(
            len(g["params"]) == len(ps) and all(a is b for a, b in zip(g["params"], ps))
            for g, ps in zip(groups, self.group_params))

    def capture(self, model, optimizer, extra: dict) -> tuple[dict[str, torch.Tensor], object] | None:
        """What the full capture would give now; None where a leaf read afresh is no longer a plain value."""
        tensors = dict(self.views)
        for key, name in self.buffers.items():
            tensors[key] = local(model.get_buffer(name)).detach().clone()
        skel = self.skeleton
        state_skel = skel["optim"]["state"]
        if self.numbers:
            state_skel = dict(state_skel)
            for sfqn, sk, p, k in self.numbers:
                more, leaf = flatten(optimizer.state[p][k])
                if more:
                    return None
                state_skel[sfqn] = dict(state_skel[sfqn]) if state_skel[sfqn] is skel["optim"]["state"][sfqn] \
                    else state_skel[sfqn]
                state_skel[sfqn][sk] = leaf
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(names)}
                  for g, names in zip(optimizer.param_groups, self.group_names)]
        pg_tensors, pg_skel = flatten(groups, "optim/param_groups")
        ex_tensors, ex_skel = flatten(extra, "extra")
        for k, t in {**pg_tensors, **ex_tensors}.items():
            tensors[k] = local(t).detach().clone()
        return tensors, {"model": skel["model"], "optim": {"state": state_skel, "param_groups": pg_skel},
                         "extra": ex_skel, CHUNKS: skel[CHUNKS], WORLD: skel[WORLD]}


class StateCapture:
    """A rank's training state, for checkpoints (:meth:`__call__`) and for everything else (:meth:`state`)."""

    def __init__(self, model, optimizer, extra: dict):
        self.model, self.optimizer, self.extra = model, optimizer, extra
        self._recipe: _Recipe | None = None
        self._checks = 0  # captures along the current recipe still compared with full ones
        self.recipes = True  # False once a recipe's capture differed from a full one
        self.fast_captures = 0  # captures that followed a recipe
        self.layouts: dict = {}  # the last full capture's DTensor leaves: (mesh, placements, shape, stride) by key

    def forget(self) -> None:
        """The model or optimizer may have changed wholesale (a restore): the next capture takes the full path."""
        self._recipe = None

    def state(self) -> dict:
        """``get_state_dict`` of the model and optimizer, and every extra object's ``state_dict()``."""
        msd, osd = get_state_dict(self.model, self.optimizer)
        return {"model": msd, "optim": osd, "extra": self.extra_state()}

    def extra_state(self) -> dict:
        """Every extra object's ``state_dict()``."""
        return {k: o.state_dict() for k, o in self.extra.items()}

    def live_storages(self) -> set[int]:
        """Storages that change only at the optimizer update: parameters and optimizer state."""
        with torch.no_grad():  # a DTensor's local shard without autograd's bookkeeping
            out = {_storage(local(p)) for p in self.model.parameters()}
            for st in self.optimizer.state.values():
                out |= {_storage(local(v)) for v in st.values() if isinstance(v, torch.Tensor)}
        return out

    def __call__(self) -> tuple[dict[str, torch.Tensor], object]:
        """This rank's state now: tensors (parameters and optimizer state as live views, the rest copied) and the
        JSON skeleton."""
        with torch.no_grad():
            recipe = self._recipe if self.recipes else None
            fast = recipe.capture(self.model, self.optimizer, self.extra_state()) \
                if recipe is not None and recipe.holds(self.model, self.optimizer) else None
            if fast is not None:
                if self._checks:
                    self._checks -= 1
                    full = self._full()[0]
                    if not _same(fast, full):
                        log.warning("capturing the state without get_state_dict gave another state than with it: "
                                    "every checkpoint takes the full path from now on")
                        self.recipes, self._recipe = False, None
                        return full
                self.fast_captures += 1
                return fast
            out, views, state = self._full()
            self._recipe, self._checks = None, CHECKS
            if self.recipes:
                try:
                    self._recipe = _Recipe(self.model, self.optimizer, state, out, views)
                except ValueError as e:  # a state of a kind recipes do not follow: the full path every time
                    log.info("state capture: no recipe (%s): this checkpoint called get_state_dict", e)
            return out

    def _full(self) -> tuple[tuple[dict, object], dict[int, torch.Tensor], dict]:
        """The capture by ``get_state_dict``, its live views by ``id`` of the tensor each was taken of (in the
        state dict, also returned)."""
        state = self.state()
        views: dict[int, torch.Tensor] = {}
        tensors, skeleton = flatten(state)
        skeleton[CHUNKS] = chunks(tensors)
        skeleton[WORLD] = dist.get_world_size()
        # how each DTensor leaf is laid out, to make a DTensor of its stored shard again (runtime/preempt.py)
        self.layouts = {k: (t.device_mesh, t.placements, t.shape, t.stride()) for k, t in tensors.items()
                        if isinstance(t, DTensor)}
        return (_views_and_copies(tensors, self.live_storages(), views), skeleton), views, state


def chunks(tensors: dict[str, torch.Tensor]) -> dict[str, list[list[int]]]:
    """For every DTensor leaf, ``[global shape, this shard's offsets in it]``: where the shard lies in the whole
    tensor (DCP's chunk, from the DTensor's ``__create_chunk_list__``), so that a job of another layout can reshard
    it (runtime/sources.py). A checkpoint's skeleton carries it under :data:`CHUNKS`."""
    out = {}
    for k, t in tensors.items():
        if isinstance(t, DTensor):
            (chunk,) = t.__create_chunk_list__()
            out[k] = [list(t.shape), list(chunk.offsets)]
    return out


def _views_and_copies(tensors: dict[str, torch.Tensor], live: set[int], views: dict | None = None) -> dict:
    """Every tensor as a view of its storage where that is one of ``live``, else as a copy (DTensors as their local
    shard); ``views`` gets the views by ``id`` of the tensor each was taken of."""
    out = {}
    for k, t in tensors.items():
        loc = local(t).detach()
        if _storage(loc) in live:
            out[k] = loc
            if views is not None:
                views[id(t)] = loc
        else:
            out[k] = loc.clone()
    return out


def _same(a: tuple[dict, object], b: tuple[dict, object]) -> bool:
    """Do two captures hold the same state: the same skeleton, the same tensors under the same keys, the live ones
    views of the same memory?"""
    (ta, sa), (tb, sb) = a, b
    if sa != sb or list(ta) != list(tb):
        return False
    for k, x in ta.items():
        y = tb[k]
        if x.dtype != y.dtype or x.shape != y.shape or x.device != y.device:
            return False
        if _storage(x) == _storage(y):
            if x.data_ptr() != y.data_ptr():
                return False
        elif not torch.equal(x, y):
            return False
    return True
