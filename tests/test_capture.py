"""What a checkpoint captures of the state (runtime/capture.py): after a full capture, later ones follow a recipe
instead of calling get_state_dict; they must give exactly what a full capture gives, and fall back to it whenever
the state is no longer what the recipe was made of."""

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from conftest import needs_fsdp_on_cpu
from runtime import capture as capture_mod
from runtime.capture import StateCapture
from runtime.state import TENSOR, local

pytestmark = needs_fsdp_on_cpu


class Loader:
    def __init__(self):
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos, "order": torch.arange(4) + self.pos, "name": "#1", 3: (1.5, float("inf"))}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def make(opt_kind: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    mesh = init_device_mesh("cpu", (1,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    if opt_kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    elif opt_kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:  # two parameter groups, one of them with a tensor learning rate
        opt = torch.optim.Adam([{"params": model[0].parameters(), "lr": torch.tensor(0.01)},
                                {"params": model[3].parameters(), "lr": 0.02}])
    return model, opt


def step(model, opt, it: int):
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(it))
    model(x).square().sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def full_capture(model, opt, extra):
    """What the capture must equal: get_state_dict every time (recipes off)."""
    cap = StateCapture(model, opt, extra)
    cap.recipes = False
    return cap()


def assert_same_capture(got, want, live):
    (tg, sg), (tw, sw) = got, want
    assert sg == sw
    assert list(tg) == list(tw)
    for k in tw:
        assert tg[k].dtype == tw[k].dtype and tg[k].shape == tw[k].shape, k
        assert torch.equal(tg[k], tw[k]), k
        # parameters and optimizer state are views of the live memory; everything else is a copy
        shares = tg[k].untyped_storage().data_ptr() in live
        assert shares == (tw[k].untyped_storage().data_ptr() in live), k
        assert shares == (tg[k].data_ptr() == tw[k].data_ptr()), k


@pytest.mark.parametrize("opt_kind", ["adamw", "sgd", "groups"])
def test_captures_along_the_recipe_equal_full_ones(world1, opt_kind):
    model, opt = make(opt_kind)
    loader = Loader()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    extra = {"loader": loader, "sched": sched}
    cap = StateCapture(model, opt, extra)
    copies = {}
    for it in range(1, 8):
        step(model, opt, it)  # changes the batch norm's buffers too
        # what the last capture copied (buffers, extra state) is its own: the training since has not changed it
        assert all(torch.equal(t, was) for t, was in copies.values())
        sched.step()
        loader.pos += 3
        got = cap()
        live = cap.live_storages()
        assert_same_capture(got, full_capture(model, opt, extra), live)
        copies = {k: (t, t.clone()) for k, t in got[0].items() if t.untyped_storage().data_ptr() not in live}
        assert any("running_mean" in k for k in copies)
    # the first capture is full, the next CHECKS are compared with full ones, and every one after follows the recipe
    assert cap.recipes and cap.fast_captures == 6
    _, skeleton = got
    assert skeleton["extra"]["loader"]["pos"] == 21  # read afresh every time, not the first capture's


def test_a_replaced_state_tensor_or_a_new_group_takes_the_full_path(world1):
    model, _ = make("adamw")
    opt = torch.optim.AdamW(model[0].parameters(), lr=0.01)  # the last layer joins later, in a group of its own
    cap = StateCapture(model, opt, {})
    for it in range(1, 5):
        step(model, opt, it)
        cap()
    fast = cap.fast_captures
    p = next(iter(opt.state))
    opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"] * 2  # a new tensor, not updated in place
    got = cap()
    assert cap.fast_captures == fast  # not along the old recipe, which views the old tensor
    assert_same_capture(got, full_capture(model, opt, {}), cap.live_storages())
    new = local(opt.state[p]["exp_avg"]).untyped_storage().data_ptr()
    assert any(t.untyped_storage().data_ptr() == new for t in got[0].values())
    fast = cap.fast_captures
    step_t = opt.state[p]["step"]
    step_t.data = step_t.data.clone()  # the same tensor, its data elsewhere: the recipe's view would be stale
    got = cap()
    assert cap.fast_captures == fast
    assert_same_capture(got, full_capture(model, opt, {}), cap.live_storages())
    moved = step_t.untyped_storage().data_ptr()
    assert any(t.untyped_storage().data_ptr() == moved for t in got[0].values())
    for it in range(5, 8):
        step(model, opt, it)
        cap()
    fast = cap.fast_captures
    for q in list(opt.state):  # a new state dict per parameter, of new tensors, which the next step updates
        opt.state[q] = {k: v.clone() for k, v in opt.state[q].items()}
    step(model, opt, 8)
    got = cap()
    assert cap.fast_captures == fast
    assert_same_capture(got, full_capture(model, opt, {}), cap.live_storages())
    opt.add_param_group({"params": list(model[3].parameters()), "lr": 0.5})
    for it in range(9, 13):
        step(model, opt, it)
        got = cap()
    assert_same_capture(got, full_capture(model, opt, {}), cap.live_storages())
    assert len(got[1]["optim"]["param_groups"]) == 2


def test_a_recipe_that_disagrees_with_the_full_capture_is_dropped_for_good(world1, monkeypatch):
    model, opt = make("sgd")
    cap = StateCapture(model, opt, {})
    step(model, opt, 1)
    cap()
    real = capture_mod._Recipe.capture

    def wrong(self, *a):
        tensors, skeleton = real(self, *a)
        return tensors, dict(skeleton, model={k: {TENSOR: "elsewhere"} for k in skeleton["model"]})

    monkeypatch.setattr(capture_mod._Recipe, "capture", wrong)
    step(model, opt, 2)
    got = cap()
    assert not cap.recipes and cap.fast_captures == 0
    assert_same_capture(got, full_capture(model, opt, {}), cap.live_storages())
    monkeypatch.setattr(capture_mod._Recipe, "capture", real)
    step(model, opt, 3)
    cap()
    assert cap.fast_captures == 0


@pytest.mark.parametrize("schedule", ["naive", "blocking", None])
def test_the_checkpointer_captures_along_the_recipe_and_times_it(world1, tmp_path, schedule):
    """Through the Checkpointer: checkpoints after the first few follow the recipe, and every iteration's record
    says how long the training thread spent capturing and starting checkpoints (none without checkpoints)."""
    from runtime import Checkpointer, plan as plan_mod

    model, opt = make("adamw")
    ckpt = Checkpointer(plan_mod.default(1, 1, replicas=1, persist=100, schedule=schedule or "naive"), model, opt,
                        store_root=tmp_path / "shm", durable_dir=tmp_path / "d", out_dir=tmp_path / "out",
                        profile_iters=0, checkpoint=schedule is not None)
    ckpt.recover()
    for it in range(1, 7):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(it))
        model(x).square().sum().backward()
        ckpt.after_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ckpt.after_step(it)
    ckpt.close()
    records = ckpt.iterations
    assert all(0 <= r["checkpoint_s"] < r["iteration_s"] for r in records)
    if schedule is None:
        assert all(r["checkpoint_s"] == 0 for r in records) and ckpt._capture.fast_captures == 0
    else:
        assert all(r["checkpoint_s"] > 0 for r in records)
        assert ckpt._capture.fast_captures == 6 - 1  # one capture per iteration, the first by get_state_dict


class Late(nn.Module):
    """A layer that joins the computation late: the optimizer has no state for it until its first gradient."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.use_b = False

    def forward(self, x):
        y = self.a(x)
        return self.b(y) if self.use_b else y


def test_state_made_after_the_recipe_is_captured(world1):
    torch.manual_seed(0)
    model = Late()
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    cap = StateCapture(model, opt, {})
    for it in range(1, 13):
        model.use_b = it > 5
        if it == 10:  # past the checks of the recipe made when b's state appeared
            model.a.register_buffer("seen", torch.tensor(float(it)))  # a buffer from now on: in the state too
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(it))
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        got = cap()
        assert_same_capture(got, full_capture(model, opt, {}), cap.live_storages())
    assert any(k.startswith("optim/state/b.weight/") for k in got[0]) and "model/a.seen" in got[0]
