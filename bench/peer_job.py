"""One FSDP2 job checkpointed by one of four approaches, written as a user writes it and launched as one launches it
(torchrun, one node a machine); bench/peers.py drives it (the "peers" section of make bench).

    torchrun --nnodes 2 --nproc-per-node 1 ... bench/peer_job.py --approach runtime --work DIR --dim 512 --layers 2

Approaches (each with the settings its documentation gives for a job like this, on a host without a GPU):

- ``runtime``: this project's Checkpointer, the default plan for 2 machines (one copy on the peer, ``naive``
  schedule), ``after_backward``/``after_step`` in the loop;
- ``lm-resiliency``: lm-resiliency 0.2.0's ``InMemoryCheckpointManager`` as its FSDP2 integration uses it
  (``save_tensors`` of the local shards of the parameters and the optimizer's tensors after every optimizer step,
  ``replication_jump=1``: the other machine; ``pin_memory=False``: no GPU; its node-local disk tier at its default
  interval of 100 steps; ``load_tensors`` copied back in place);
- ``dcp-async``: ``dcp.async_save`` with ``DefaultStager`` (staging in a thread, into shared memory, not pinned: no
  GPU) over a gloo group of its own (its collectives run in a thread beside training's), a checkpoint in flight at most (the next waits for the one before), the update waiting until the state is
  staged, to local disk; ``dcp.load`` of the newest complete one;
- ``dcp``: ``dcp.save`` every iteration, to local disk.

Both DCP approaches delete the checkpoints older than one just completed in a thread (as TorchTitan's
``keep_latest_k`` does), so the disk holds the newest complete one and the one being written.

The job trains ``--rounds`` rounds of ``--block`` iterations without and ``--block`` with a checkpoint every
iteration (its overhead, paired per round), then ``--latency`` iterations whose checkpoint is waited for at once
(until in local memory, until on the peer or on disk: nothing else running). At start it recovers (timed, to the
state in the model and optimizer). ``--kill worker@K``: rank 1 SIGKILLs itself in iteration K + 1 (after its
backward), the first attempt only; ``--kill job@K``: rank 0 writes ``killed-at`` there and waits for the driver to
SIGKILL every process (the job launched again does not). Each rank writes ``result-rank-R.json``: its timings (CPU
time too: every thread of the process), the iteration it recovered, and a digest of its whole state (parameters,
optimizer, step) at the end of every round, for the bitwise check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "tinygpt"))
from model import ModelConfig, TinyGPT, batch  # noqa: E402  (the TinyGPT example's model and data)

from runtime import init_process_group  # noqa: E402  (a process group that torchrun's restarts can start again)
from runtime.files import write_atomic  # noqa: E402
from runtime.state import local  # noqa: E402

APPROACHES = ("runtime", "lm-resiliency", "dcp-async", "dcp")


def live_tensors(model, opt) -> list[torch.Tensor]:
    """Parameters, then each parameter's optimizer tensors by name (step too: Adam's bias correction needs it)."""
    out = list(model.parameters())
    for p in model.parameters():
        st = opt.state.get(p, {})
        out += [st[k] for k in sorted(st) if isinstance(st[k], torch.Tensor)]
    return out


def digest(model, opt) -> str:
    """xxh3 of every byte of this rank's state: its shards of the parameters and of the optimizer's state."""
    h = xxhash.xxh3_128()
    for t in live_tensors(model, opt):
        h.update(local(t).detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def materialize(model, opt) -> None:
    """AdamW's state before its first step (it makes it lazily), so a restore has tensors to copy into."""
    for p in model.parameters():
        st = opt.state[p]
        if "exp_avg" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)


# -- the approaches: recover() -> iteration; set_on(bool); before_update(); checkpoint(it); quiet(it); close() -------
class Approach:
    """What the loop calls; ``checkpoint`` saves (``save``) when checkpoints are on."""

    on = True

    def on_disk(self) -> list[int]:
        """The iterations whose checkpoints are left on disk (DCP's; none for the in-memory approaches)."""
        return []

    def set_on(self, on: bool) -> None:
        self.on = on

    def before_update(self) -> None:
        pass

    def checkpoint(self, it: int) -> None:
        if self.on:
            self.save(it)

    def save(self, it: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Runtime(Approach):
    name = "runtime"

    def __init__(self, model, opt, work: Path):
        from runtime import Checkpointer

        self.ck = Checkpointer(work / "plan.json", model, opt, profile_iters=0)
        self.on = True

    def recover(self) -> int:
        return self.ck.recover()

    def set_on(self, on: bool) -> None:
        if on != self.on:
            self.ck.set_schedule(self.ck.plan.schedule if on else None)
            self.on = on

    def before_update(self) -> None:
        self.ck.after_backward()

    def checkpoint(self, it: int) -> None:
        self.ck.after_step(it)

    def quiet(self, it: int) -> tuple[float, float]:
        """This iteration's checkpoint taken and waited for at once (the ``blocking`` schedule): the runtime's own
        record of when the copy was in local memory and when the peer had it."""
        if self.ck.schedule.name != "blocking":
            self.ck.set_schedule(dict(self.ck.plan.schedule, name="blocking"))
        self.ck.after_step(it)
        rec = self.ck.checkpoints[-1]
        return rec["copied_s"], rec["complete_s"] - rec["start_s"]

    def close(self) -> None:
        self.ck.close(finished=False)


class LMResiliency(Approach):
    name = "lm-resiliency"

    def __init__(self, model, opt, work: Path):
        from lm_resiliency.checkpointing.config import InMemoryCkptConfig
        from lm_resiliency.checkpointing.manager import InMemoryCheckpointManager

        self.model, self.opt, self.on = model, opt, True
        cfg = InMemoryCkptConfig(interval=1, replication_jump=1, pin_memory=False,
                                 disk_folder=str(work / "lmr-disk"), run_id=os.environ["PEER_JOB"])
        self.mgr = InMemoryCheckpointManager(cfg)  # its own signal handlers flush to its disk tier on SIGTERM

    def recover(self) -> int:
        got = self.mgr.load_tensors()
        if got is None:
            return 0
        saved, step, _ = got
        materialize(self.model, self.opt)
        with torch.no_grad():
            for t, s in zip(live_tensors(self.model, self.opt), saved, strict=True):
                local(t).copy_(s)
        return step

    def save(self, it: int) -> None:
        self.mgr.save_tensors(live_tensors(self.model, self.opt), it)

    def quiet(self, it: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        self.save(it)
        self.mgr.maybe_wait()
        t1 = time.perf_counter()
        self.mgr.finalize_replication()
        return t1 - t0, time.perf_counter() - t0

    def close(self) -> None:
        self.mgr.close()


class DCP(Approach):
    name = "dcp"

    def __init__(self, model, opt, work: Path):
        self.model, self.opt, self.on = model, opt, True
        self.root = work / "dcp"
        self.root.mkdir(parents=True, exist_ok=True)
        self.pruning: list[threading.Thread] = []

    def state(self) -> dict:
        m, o = get_state_dict(self.model, self.opt)
        return {"model": m, "optim": o}

    def recover(self) -> int:
        # the newest checkpoint DCP finished (its .metadata is written last), the same on every rank
        done = [it for it, p in self.steps().items() if (p / ".metadata").exists()]
        pick = torch.tensor([max(done, default=0)])
        dist.all_reduce(pick, op=dist.ReduceOp.MIN)
        it = int(pick)
        if it:
            materialize(self.model, self.opt)
            sd = self.state()
            dcp.load(sd, checkpoint_id=str(self.root / f"step-{it}"))
            set_state_dict(self.model, self.opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        return it

    def save(self, it: int) -> None:
        dcp.save(self.state(), checkpoint_id=str(self.root / f"step-{it}"))
        self.prune(it)

    def prune(self, done: int) -> None:
        """Checkpoint ``done`` is complete on every rank: the older ones go, in a thread (as TorchTitan's
        ``keep_latest_k`` purges), so the disk holds the newest complete checkpoint and the one being written."""
        old = [p for it, p in self.steps().items() if it < done]
        if old:
            t = threading.Thread(target=lambda: [shutil.rmtree(p, ignore_errors=True) for p in old], daemon=True)
            t.start()
            self.pruning.append(t)

    def close(self) -> None:
        for t in self.pruning:
            t.join()

    def steps(self) -> dict[int, Path]:
        """{iteration: its checkpoint's folder} of what is on disk, finished or not."""
        return {int(p.name[5:]): p for p in self.root.glob("step-*")}

    def on_disk(self) -> list[int]:
        return sorted(self.steps())

    def quiet(self, it: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        self.save(it)
        return None, time.perf_counter() - t0


class DCPAsync(DCP):
    name = "dcp-async"

    def __init__(self, model, opt, work: Path):
        super().__init__(model, opt, work)
        self.response = None
        # its own group: the save's collectives run in a thread beside training's (as DCP's docs and TorchTitan do)
        self.group = dist.new_group(backend="gloo")

    def _save(self, it: int):  # its response: staged, then uploaded
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=True,
                                              use_async_staging=True, use_non_blocking_copy=False))
        return dcp.async_save(self.state(), checkpoint_id=str(self.root / f"step-{it}"), async_stager=stager,
                              process_group=self.group)

    def before_update(self) -> None:  # the update may not overwrite the state while it is being staged
        if self.response is not None:
            self.response.staging_completion.result()

    def checkpoint(self, it: int) -> None:
        self.finish()  # one in flight at most
        if self.on:
            self.response, self.step = self._save(it), it

    def finish(self) -> None:
        """The checkpoint in flight uploaded, and the ones before it pruned."""
        if self.response is not None:
            self.response.upload_completion.result()
            self.response = None
            self.prune(self.step)

    def quiet(self, it: int) -> tuple[float, float]:
        self.finish()
        t0 = time.perf_counter()
        r = self._save(it)
        r.staging_completion.result()
        t1 = time.perf_counter()
        r.upload_completion.result()
        t2 = time.perf_counter()
        self.prune(it)
        return t1 - t0, t2 - t0

    def close(self) -> None:
        self.finish()
        super().close()


KINDS = {c.name: c for c in (Runtime, LMResiliency, DCPAsync, DCP)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--approach", choices=APPROACHES, required=True)
    ap.add_argument("--work", required=True, help="this job's folder (plan.json there for the runtime)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--latency", type=int, default=3)
    ap.add_argument("--kill", default="", help="worker@K or job@K")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    init_process_group("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = ModelConfig(dim=args.dim, layers=args.layers, batch=args.batch, seq=args.seq)
    model = TinyGPT(cfg)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ck = KINDS[args.approach](model, opt, work)

    dist.barrier()
    t0 = time.perf_counter()
    start = ck.recover()
    recover_s = time.perf_counter() - t0
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    kind, _, at = args.kill.partition("@")
    kill_at = int(at) if at else None
    relaunched = (work / "killed-at").exists()  # a job killed whole is launched again: it dies once
    train_iters = 2 * args.rounds * args.block
    iters: list[dict] = []

    def train(it: int) -> float:
        """Iteration ``it`` up to its update (dying after its backward where the kill says); the stall before it."""
        x, y = batch(cfg, 0, it, rank)
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        if kill_at is not None and it == kill_at + 1 and attempt == 0 and not relaunched:
            if kind == "worker" and rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "job" and rank == 0:
                (work / "killed-at").write_text(str(kill_at))
                time.sleep(3600)
        c = time.perf_counter()
        ck.before_update()
        stall = time.perf_counter() - c
        opt.step()
        opt.zero_grad(set_to_none=True)
        return stall

    def step(it: int) -> dict:
        t, cpu = time.perf_counter(), time.process_time()
        stall = train(it)
        c = time.perf_counter()
        ck.checkpoint(it)
        stall += time.perf_counter() - c
        return {"iteration": it, "iteration_s": time.perf_counter() - t, "stall_s": stall,
                "cpu_s": time.process_time() - cpu}  # every thread of the process

    digests = {}  # at the end of each round (a round's first iteration, which the figures leave out, follows)
    for it in range(start + 1, train_iters + 1):
        r, pos = divmod(it - 1, 2 * args.block)
        on = kill_at is not None or pos >= args.block  # a kill run checkpoints every iteration
        ck.set_on(on)
        rec = step(it)
        iters.append(dict(rec, round=r, on=on, pos=pos % args.block))
        if it % (2 * args.block) == 0:
            digests[it] = digest(model, opt)
    dist.barrier()

    latency = []
    if kill_at is None:
        ck.set_on(True)
        for it in range(train_iters + 1, train_iters + 1 + args.latency):
            train(it)
            latency.append(ck.quiet(it))
    ck.close()
    out = {"approach": args.approach, "rank": rank, "attempt": attempt, "recovered": start, "recover_s": recover_s,
           "digests": digests, "iterations": iters, "latency": latency, "train_iters": train_iters,
           "state_bytes": sum(local(t).numel() * local(t).element_size() for t in live_tensors(model, opt)),
           "torch": torch.__version__, "on_disk": ck.on_disk()}
    write_atomic(work / f"result-rank-{rank}.json", json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
