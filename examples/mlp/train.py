"""A classifier MLP with batch norm and dropout, trained with FSDP2 and SGD with momentum under a step LR schedule,
reading a shuffled data set through a loader whose position is part of the checkpoint: nothing here is AdamW or a GPT.

    torchrun --nproc-per-node 2 examples/mlp/train.py --plan plan.json
    python -m runtime.agent --machines 4 --procs 1 -- examples/mlp/train.py --iters 12

Checkpointed every iteration, beside model and optimizer: the LR scheduler, the loader's position and the RNG
state dropout draws from (``extra``); a resumed run continues bit for bit as if it never stopped. Batch norm's running
statistics are buffers that FSDP2 leaves to each rank, and each rank's differ (each sees its own data): every tier
must bring back every rank's own. The whole final state (parameters, buffers, optimizer, extra) is written out, so
that runs can be compared bit for bit.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from runtime import Checkpointer, init_process_group
from runtime.state import write_shard


class Loader:
    """Batches of a fixed synthetic data set, reshuffled every epoch; its position is checkpointed."""

    def __init__(self, rank: int, seed: int, size: int = 512, batch: int = 16, features: int = 32, classes: int = 10):
        g = torch.Generator().manual_seed(seed + 17 * rank)
        self.x = torch.randn(size, features, generator=g)
        self.y = torch.randint(0, classes, (size,), generator=g)
        self.seed, self.batch, self.epoch, self.pos = seed + 17 * rank, batch, 0, 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.batch > len(self.x):
            self.epoch, self.pos = self.epoch + 1, 0
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        idx = order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return self.x[idx], self.y[idx]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]


class RNG:
    """The random stream dropout draws from."""

    def state_dict(self) -> dict:
        return {"cpu": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", help="plan.json (default: $GEMINI_PLAN)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--out-dir", help="final parameters, profile and timings (default: $GEMINI_OUT_DIR)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    init_process_group("cpu")  # torch.distributed's, in a form that torchrun's restarts can start again
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(32, args.hidden), nn.BatchNorm1d(args.hidden), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(args.hidden, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 10))
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[4]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    loader = Loader(rank, args.seed)
    torch.manual_seed(args.seed * 1000 + rank + 1)  # each rank's own dropout

    ckpt = Checkpointer(args.plan, model, opt, out_dir=args.out_dir,
                        extra={"sched": sched, "loader": loader, "rng": RNG()})
    start = ckpt.recover()
    for it in range(start + 1, args.iters + 1):
        x, y = loader.next()
        nn.functional.cross_entropy(model(x), y).backward()
        ckpt.after_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        ckpt.after_step(it)
    ckpt.close()

    out = Path(args.out_dir or os.environ.get("GEMINI_OUT_DIR", "out/mlp"))
    write_shard(out / f"final-rank-{rank:05d}", *ckpt.capture())  # the whole state, to compare runs bit for bit
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
