"""TorchTitan's Llama 3 trained with TorchTitan's own FSDP2 parallelisation, checkpointed by runtime.Checkpointer.

The model is ``torchtitan.models.llama3``'s Transformer in its smallest flavour (``debugmodel``: dim 256, 6 layers,
vocabulary 2048), built on the meta device, sharded by TorchTitan's ``apply_fsdp`` (its embedding, each block, its
norm and output together, then the root) and initialised by its ``init_weights``. As in TorchTitan's trainer, FSDP
does not divide the gradient and the loss is divided by the batch's tokens instead; on gloo, which lacks the
PREMUL_SUM that FSDP then reduces with, FSDP is asked for a plain SUM, the same gradients. AdamW and a warm-up
schedule with TorchTitan's default settings, gradients clipped to norm 1. ``--replicate R`` makes it HSDP: R replica
groups of consecutive ranks, each sharding the model. The tokens are synthetic (a seeded draw per rank and
iteration), so nothing is downloaded. Install TorchTitan with ``pip install -e '.[titan]'`` (``make test-titan``
does, in a venv of its own).

    torchrun --nproc-per-node 2 examples/titan/train.py --plan plan.json --iters 20
    python -m runtime.agent --machines 4 --procs 1 -- examples/titan/train.py --iters 20

The lines marked ``# gemini`` are all that checkpointing adds. The whole final state is written out (``--out-dir``)
for the fault tests to compare runs bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torchtitan.models.llama3 import llama3_args
from torchtitan.models.llama3.infra.parallelize import apply_fsdp
from torchtitan.models.llama3.model.model import Transformer

from runtime import Checkpointer, init_process_group  # gemini
from runtime.state import write_shard


def tokens(seed: int, it: int, rank: int, batch: int, seq: int, vocab: int) -> torch.Tensor:
    """This rank's synthetic batch of iteration ``it``: ``batch`` sequences of ``seq + 1`` tokens."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + it * 1009 + rank)
    return torch.randint(0, vocab, (batch, seq + 1), generator=g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", help="plan.json (default: $GEMINI_PLAN, set by the agent)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flavor", default="debugmodel", choices=sorted(llama3_args), help="TorchTitan's model flavour")
    ap.add_argument("--layers", type=int, default=None, help="fewer blocks than the flavour's (default: its own)")
    ap.add_argument("--replicate", type=int, default=1, help="HSDP: replica groups, each sharding the model over "
                    "world / REPLICATE ranks (default 1: FSDP over every rank)")
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank per iteration")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--warmup", type=int, default=2, help="iterations of linear warm-up")
    ap.add_argument("--out-dir", help="the final state (default: $GEMINI_OUT_DIR)")
    ap.add_argument("--backend", default=None, help="auto (default, or $GEMINI_BACKEND), nccl, gloo, cpu")
    ap.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit for bit on a GPU)")
    args = ap.parse_args()
    if args.replicate < 1:
        ap.error(f"--replicate must be at least 1, got {args.replicate}")
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(1)

    device = init_process_group(args.backend)  # gemini: NCCL, or gloo; started again by torchrun's restarts
    rank, world = dist.get_rank(), dist.get_world_size()
    margs = dataclasses.replace(llama3_args[args.flavor], max_seq_len=args.seq)
    if args.layers:
        margs = dataclasses.replace(margs, n_layers=args.layers)
    with torch.device("meta"):
        model = Transformer(margs)
    if world % args.replicate:
        print(f"train.py: error: --replicate {args.replicate} does not divide the job's {world} ranks", file=sys.stderr)
        sys.exit(2)
    if args.replicate == 1:  # FSDP over every rank
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp_shard",))
    else:  # HSDP: each parameter sharded within a group of ranks and replicated across the groups
        mesh = init_device_mesh(device.type, (args.replicate, world // args.replicate),
                                mesh_dim_names=("dp_replicate", "dp_shard"))
    apply_fsdp(model, mesh, param_dtype=torch.float32, reduce_dtype=torch.float32, pp_enabled=False)
    if dist.get_backend() == "gloo":  # gloo lacks the PREMUL_SUM that FSDP reduces with for a divide factor of 1:
        for m in model.modules():     # the same sum, reduced as a plain SUM
            if isinstance(m, FSDPModule):
                m.set_force_sum_reduction_for_comms(True)
    model.to_empty(device=device)
    torch.manual_seed(args.seed)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / (args.warmup + 1)))

    ckpt = Checkpointer(args.plan, model, opt, extra={"sched": sched}, out_dir=args.out_dir)  # gemini
    start = ckpt.recover()  # gemini: 0, or the iteration it resumed from

    for it in range(start + 1, args.iters + 1):
        batch = tokens(args.seed, it, rank, args.batch, args.seq, margs.vocab_size).to(device)
        inputs, labels = batch[:, :-1], batch[:, 1:]
        logits = model(inputs)
        # FSDP does not divide the gradient (apply_fsdp turns that off): the loss is per token of the whole batch
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1),
                                                 reduction="sum") / (labels.numel() * world)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        ckpt.after_backward()  # gemini
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ckpt.after_step(it)  # gemini
        if rank == 0 and (it % 5 == 0 or it == args.iters):
            print(f"iteration {it}: loss {loss.item() * world:.4f}", flush=True)
    ckpt.close()  # gemini

    out = Path(args.out_dir or os.environ.get("GEMINI_OUT_DIR", "out/titan"))
    write_shard(out / f"final-rank-{rank:05d}", *ckpt.capture())  # the whole state, to compare runs bit for bit
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
