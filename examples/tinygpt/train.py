"""A small GPT trained with FSDP2, checkpointed every iteration by runtime.Checkpointer as a Plan says.

Run it with plain torchrun (one machine of 2 processes, plan made by ``gemini-sim plan`` or the agent's default):

    torchrun --nproc-per-node 2 examples/tinygpt/train.py --plan plan.json --iters 20

or on N emulated machines, with machine replacement, under the project's agent:

    python -m runtime.agent --machines 4 --procs 2 -- examples/tinygpt/train.py --iters 20

``--replicate R`` makes it HSDP (R replica groups of consecutive ranks); run it under a plan that knows them
(``python -m runtime plan --machines 4 --procs 1 --hsdp 2``), and each copy lies on a replica, sent only the rank's
own part. The lines marked ``# gemini`` are all that checkpointing adds to the training script. The other options
serve the calibration (examples/tinygpt/calibrate.py): an emulated accelerator, schedules run in turn, a bandwidth
probe (after the first iteration), pinning training and the checkpoint's threads to separate cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from model import ModelConfig, TinyGPT, batch  # beside this script
from runtime import Checkpointer, init_process_group  # gemini
from runtime.profiler import probe
from runtime.state import write_shard
from runtime.transport import pin_thread


def cores(spec: str) -> list[int] | None:
    return [int(c) for c in spec.split(",")] if spec else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", help="plan.json (default: $GEMINI_PLAN, set by the agent)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank per iteration")
    ap.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--replicate", type=int, default=1, help="HSDP: R replica groups of consecutive ranks, each "
                    "sharding the model over its ranks (default 1: FSDP over every rank)")
    ap.add_argument("--out-dir", help="final parameters, profile and timings (default: $GEMINI_OUT_DIR)")
    ap.add_argument("--accel-ms", type=float, default=0.0, help="emulated accelerator: each block's forward waits "
                    "this many ms more, its backward twice as many, with the CPU free (default 0: off)")
    ap.add_argument("--backend", default=None, help="auto (default, or $GEMINI_BACKEND), nccl, gloo, cpu")
    ap.add_argument("--no-checkpoint", action="store_true", help="train without checkpoints (a baseline)")
    ap.add_argument("--profile-iters", type=int, default=20, help="iterations recorded in profile.json")
    ap.add_argument("--probe", action="store_true", help="measure network and copy bandwidth (probe.json)")
    ap.add_argument("--rotate", default="", help="comma-separated plans (or 'none') run in turn, in blocks")
    ap.add_argument("--block", type=int, default=4, help="iterations per block with --rotate (default 4)")
    ap.add_argument("--compute-cores", default="", help="cores of training's own thread (default: not pinned)")
    ap.add_argument("--host-cores", default="", help="cores of every other thread (default: not pinned)")
    ap.add_argument("--deterministic", action="store_true", help="bit for bit the same from run to run on a GPU "
                    "too (deterministic algorithms, attention by plain matrix products): the fault tests compare "
                    "a recovered run's parameters with an uninterrupted run's")
    args = ap.parse_args()
    if args.replicate < 1:
        ap.error(f"--replicate must be at least 1, got {args.replicate}")
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts: its fixed workspace
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(1)
    pin_thread(cores(args.host_cores))  # threads started from here on (gloo's, the checkpoint's): host cores

    # gemini: NCCL, or gloo on the GPU when ranks share one, or gloo on the CPU; started again by torchrun's restarts
    device = init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ModelConfig(dim=args.dim, layers=args.layers, batch=args.batch, seq=args.seq, accel_ms=args.accel_ms,
                      exact_attention=args.deterministic)
    torch.manual_seed(args.seed)
    model = TinyGPT(cfg).to(device)
    if world % args.replicate:
        print(f"train.py: error: --replicate {args.replicate} does not divide the job's {world} ranks", file=sys.stderr)
        sys.exit(2)
    # FSDP over every rank, or HSDP: sharded within each replica group, replicated across them
    groups = (args.replicate, world // args.replicate)
    mesh = init_device_mesh(device.type, (world,)) if args.replicate == 1 else \
        init_device_mesh(device.type, groups, mesh_dim_names=("replicate", "shard"))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    ckpt = Checkpointer(args.plan, model, opt, out_dir=args.out_dir,  # gemini
                        profile_iters=args.profile_iters, checkpoint=not args.no_checkpoint,
                        host_cores=cores(args.host_cores))
    start = ckpt.recover()  # gemini: 0, or the iteration it resumed from
    rotation = [None if p == "none" else json.loads(Path(p).read_text())["schedule"]
                for p in filter(None, args.rotate.split(","))]
    pin_thread(cores(args.compute_cores))  # training's own thread: the cores standing in for the accelerator

    for it in range(start + 1, args.iters + 1):
        if rotation and (it - 1) % args.block == 0:  # the next schedule's block begins
            ckpt.set_schedule(rotation[(it - 1) // args.block % len(rotation)])
        if rotation:
            ckpt.annotate(block_pos=(it - 1) % args.block)
        x, y = (t.to(device) for t in batch(cfg, args.seed, it, rank))
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, cfg.vocab), y.reshape(-1))
        loss.backward()
        ckpt.after_backward()  # gemini
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":  # as a loop that logs its loss does: the iteration's time is the device's, the
            torch.cuda.current_stream(device).synchronize()  # host not running ahead into the next iterations
        ckpt.after_step(it)  # gemini
        if args.probe and it == start + 1:  # once the optimizer has its state: the checkpoints it takes are whole
            pin_thread(cores(args.host_cores))  # the host's cores, not those standing in for the accelerator
            probe(ckpt, compute_cores=cores(args.compute_cores))
            pin_thread(cores(args.compute_cores))
    ckpt.close()  # gemini

    out = Path(args.out_dir or os.environ.get("GEMINI_OUT_DIR", "out/tinygpt"))
    write_shard(out / f"final-rank-{rank:05d}", *ckpt.capture())  # the whole state, to compare runs bit for bit
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
