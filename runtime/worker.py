"""The training worker that torchrun starts on every "machine" (one torchrun agent per machine).

Per iteration: train one step (FSDP2 ``fully_shard``, gloo on CPU or NCCL on GPUs), then every ``interval_iters``
snapshot this rank's model and optimizer shard to CPU memory (its machine's :class:`ShardStore`), hand the snapshot
to a background thread that replicates it to the peers the plan names over a process group of its own, and every
``persist_interval_iters`` write a standard DCP checkpoint to durable storage.

On start (first launch or a restart by the elastic agent) the ranks agree on the newest iteration that is complete
somewhere (an all-gather of what every machine's store holds, plus the DCP checkpoints on durable storage), and every
rank takes its state from its own machine's memory, from a peer that holds it (sent over the network), or from DCP
when some shard has no copy left, and logs which tier it used and how long it took.

Faults for tests (``GEMINI_FAULT``, only on the first attempt of the job): ``kill:RANK:ITER`` (SIGKILL during
iteration ITER's forward pass), ``kill-write:RANK:ITER`` (SIGKILL half-way through writing ITER's shard),
``corrupt-kill:RANK:ITER`` (once ITER's shard is replicated, flip a byte of this machine's copy, then SIGKILL),
``lose:MACHINE:ITER`` (local rank 0 of MACHINE announces it and waits there, so that the launcher can kill the whole
machine and replace it at a known point).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from .model import ModelConfig, TinyGPT, batch
from .store import ShardStore, pack, unpack

INVENTORY_SLOTS = 64


def log(rank: int, msg: str, **fields) -> None:
    rec = {"t": round(time.time(), 4), "rank": rank, "msg": msg, **fields}
    print("GEMINI " + json.dumps(rec), flush=True)


class Worker:
    def __init__(self, args):
        self.args = args
        self.plan = json.loads(Path(args.plan).read_text())  # validated by the launcher (gemini_sim.plan.read)
        self.machine = int(os.environ["GEMINI_MACHINE_ID"])
        self.local = int(os.environ["LOCAL_RANK"])
        self.ppm = int(os.environ["LOCAL_WORLD_SIZE"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.rank = self.machine * self.ppm + self.local  # tied to the machine, whatever order rendezvous chose
        self.attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.generation = int(os.environ.get("GEMINI_MACHINE_GENERATION", "0"))  # > 0 on a restarted machine
        self.job_attempt = int(os.environ.get("GEMINI_JOB_ATTEMPT", "0"))  # > 0 after the root agent restarted it
        self.cuda = torch.cuda.is_available() and not args.cpu
        backend = "nccl" if self.cuda else "gloo"
        if self.cuda:
            torch.cuda.set_device(self.local)
        dist.init_process_group(backend, rank=self.rank, world_size=self.world,
                                timeout=timedelta(seconds=args.pg_timeout))
        self.repl = dist.new_group(backend="gloo", timeout=timedelta(seconds=args.pg_timeout))  # beside training
        holders = self.plan["placement"]["holders"]
        if len(holders) * self.ppm != self.world or self.plan["cluster"]["processes_per_machine"] != self.ppm:
            raise SystemExit(f"plan is for {len(holders)} x {self.plan['cluster']['processes_per_machine']} ranks, "
                             f"this job has {self.world // self.ppm} x {self.ppm}")
        self.holders = [list(h) for h in holders]
        self.ckpt = self.plan["checkpoint"]
        self.store = ShardStore(args.store_root, self.machine)
        self.store.clean_partial()
        self.durable = Path(args.durable_dir)
        self.cfg = ModelConfig(dim=args.dim, layers=args.layers)
        self.device = torch.device("cuda", self.local) if self.cuda else torch.device("cpu")
        torch.manual_seed(args.seed)
        model = TinyGPT(self.cfg).to(self.device)
        mesh = init_device_mesh(self.device.type, (self.world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        for p in model.parameters():  # create Adam's state now, so that recovery can copy into it
            self.opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                 "exp_avg_sq": torch.zeros_like(p)}
        self.faults = self._parse_faults(os.environ.get("GEMINI_FAULT", ""))
        self.thread: threading.Thread | None = None
        self.timings: dict[str, list[float]] = {}

    # -- state ---------------------------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        """This rank's shard of the model and optimizer state: references to the live local tensors."""
        out = {}
        for name, p in self.model.named_parameters():
            out[f"model.{name}"] = p.to_local()
            st = self.opt.state[p]
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"optim.{name}.{key}"] = st[key].to_local()
            out[f"optim.{name}.step"] = st["step"]
        return out

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self._tensors().items()}

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        live = self._tensors()
        if set(live) != set(tensors):
            raise RuntimeError("checkpoint does not match the model")
        with torch.no_grad():
            for k, t in live.items():
                t.copy_(tensors[k].to(t.device))

    # -- faults --------------------------------------------------------------------------------------------------
    @staticmethod
    def _parse_faults(text: str) -> list[tuple[str, int, int]]:
        out = []
        for item in filter(None, text.split(",")):
            kind, rank, it = item.split(":")
            out.append((kind, int(rank), int(it)))
        return out

    def _fault(self, kind: str, iteration: int) -> bool:
        who = self.machine if kind == "lose" else self.rank
        if kind == "lose" and self.local != 0:
            return False
        first = self.attempt == 0 and self.job_attempt == 0
        return first and (kind, who, iteration) in self.faults

    def _die(self, why: str) -> None:
        log(self.rank, "fault", what=why)
        os.kill(os.getpid(), signal.SIGKILL)

    # -- checkpointing -------------------------------------------------------------------------------------------
    def checkpoint(self, iteration: int) -> None:
        t0 = time.perf_counter()
        tensors = self.snapshot()
        data, manifest = pack(tensors)
        t_snap = time.perf_counter() - t0
        hook = (lambda: self._die("killed while writing a checkpoint")) if self._fault("kill-write", iteration) \
            else None
        self.store.put(iteration, self.rank, data, manifest, before_commit=hook)
        t_local = time.perf_counter() - t0
        self.wait_replication()
        self.thread = threading.Thread(target=self._replicate, args=(iteration, data, manifest, t0), daemon=True)
        self.thread.start()
        if self._fault("corrupt-kill", iteration):  # once the peers have it, a bit flips in this machine's copy
            self.wait_replication()
            bin_path = self.store._paths(iteration, self.rank)[0]
            raw = bytearray(bin_path.read_bytes())
            raw[len(raw) // 3] ^= 0xFF
            bin_path.write_bytes(bytes(raw))
            self._die("corrupted its stored shard")
        self.timings.setdefault("snapshot_s", []).append(t_snap)
        self.timings.setdefault("local_write_s", []).append(t_local)

    def wait_replication(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def _peers(self) -> tuple[list[int], list[int]]:
        """Ranks I send my shard to, and ranks whose shards I keep (same local rank on the other machines)."""
        me = self.machine
        send = [h for h in self.holders[me][1:]]
        recv = [j for j, hs in enumerate(self.holders) if j != me and me in hs]
        to_rank = lambda m: m * self.ppm + self.local
        return [to_rank(m) for m in send], [to_rank(m) for m in recv]

    def _replicate(self, iteration: int, data: bytes, manifest: dict, t0: float) -> None:
        send_to, recv_from = self._peers()
        tag = iteration % 1000
        works = [w for dst in send_to for w in send_shard(data, manifest, dst, self.repl, tag)]
        for src in recv_from:
            body, meta = recv_shard(src, self.repl, tag)
            self.store.put(iteration, src, body, meta)
        for w in works:
            w.wait()
        self.store.keep_newest(self.ckpt["keep"])
        self.timings.setdefault("replicated_s", []).append(time.perf_counter() - t0)

    def persist(self, iteration: int) -> None:
        t0 = time.perf_counter()
        msd, osd = get_state_dict(self.model, self.opt)
        path = self.durable / f"step-{iteration:08d}"
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
        dist.barrier()
        if self.rank == 0:
            (path / "COMPLETE").write_text(str(iteration))  # a marker: DCP writes .metadata before all ranks end
        self.timings.setdefault("persist_s", []).append(time.perf_counter() - t0)

    # -- recovery ------------------------------------------------------------------------------------------------
    def _gather_inventory(self) -> list[set[tuple[int, int]]]:
        """What every machine's store holds, as seen by every rank (an all-gather of fixed-size tensors)."""
        inv = self.store.inventory()[-INVENTORY_SLOTS:]
        t = torch.full((INVENTORY_SLOTS, 2), -1, dtype=torch.int64)
        if inv:
            t[: len(inv)] = torch.tensor(inv, dtype=torch.int64)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        per_machine: list[set] = [set() for _ in range(self.world // self.ppm)]
        for r, rows in enumerate(out):
            for it, rank in rows.tolist():
                if it >= 0:
                    per_machine[r // self.ppm].add((it, rank))
        return per_machine

    def _durable_iterations(self) -> list[int]:
        return sorted(int(p.name.split("-")[1]) for p in self.durable.glob("step-*") if (p / "COMPLETE").exists())

    def recover(self) -> int:
        """Agree on the newest complete iteration, load it, return it (0: fresh start)."""
        dist.barrier()  # every rank is up: the time below is recovery's, not the other ranks' start-up
        t0 = time.perf_counter()
        per_machine = self._gather_inventory()
        ranks = range(self.world)
        in_memory = {it for held in per_machine for it, _ in held}
        complete = sorted(it for it in in_memory if all(any((it, r) in held for held in per_machine) for r in ranks))
        durable = self._durable_iterations()
        target = max(complete[-1] if complete else 0, durable[-1] if durable else 0)
        if target == 0:
            log(self.rank, "start", tier="fresh", iteration=0)
            return 0
        if complete and complete[-1] == target:
            tier, source = self._recover_from_memory(target, per_machine)
        else:
            tier, source = self._recover_from_storage(target), None
        dt = time.perf_counter() - t0
        log(self.rank, "recovered", iteration=target, tier=tier, source_machine=source, seconds=round(dt, 4))
        return target

    def _source(self, it: int, rank: int, per_machine) -> int:
        """The machine a shard is fetched from: its own machine, else the plan's holders in retrieval order."""
        owner = rank // self.ppm
        order = self.holders[owner] + [m for m in range(len(per_machine)) if m not in self.holders[owner]]
        return next(m for m in order if (it, rank) in per_machine[m])

    def _recover_from_memory(self, it: int, per_machine) -> tuple[str, int]:
        sources = {r: self._source(it, r, per_machine) for r in range(self.world)}
        mine = sources[self.rank]
        works = []
        # Serve every shard that this machine holds and another machine needs (one sender per shard: the rank with
        # the same local rank on the source machine).
        for r, m in sources.items():
            if m == self.machine and r // self.ppm != self.machine and r % self.ppm == self.local:
                works += send_shard(*self.store.get(it, r), r, None, 1)
        if mine == self.machine:
            data, manifest = self.store.get(it, self.rank)
            tier = "local"
        else:
            data, manifest = recv_shard(mine * self.ppm + self.local, None, 1)
            self.store.put(it, self.rank, data, manifest)  # the local copy is back
            tier = "peer"
        for w in works:
            w.wait()
        self.restore(unpack(data, manifest))
        dist.barrier()
        return tier, mine

    def _recover_from_storage(self, it: int) -> str:
        msd, osd = get_state_dict(self.model, self.opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(self.durable / f"step-{it:08d}"))
        set_state_dict(self.model, self.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        dist.barrier()
        return "storage"

    # -- training ------------------------------------------------------------------------------------------------
    def step(self, iteration: int) -> float:
        x, y = batch(self.cfg, self.args.seed, iteration, self.rank)
        x, y = x.to(self.device), y.to(self.device)
        if self._fault("kill", iteration):
            self._die("killed mid-iteration")
        if self._fault("lose", iteration):
            log(self.rank, "lose-me", iteration=iteration, machine=self.machine)
            time.sleep(3600)  # the launcher kills this machine now
        loss = torch.nn.functional.cross_entropy(self.model(x).reshape(-1, self.cfg.vocab), y.reshape(-1))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def run(self) -> None:
        start = self.recover()
        every, persist = self.ckpt["interval_iters"], self.ckpt["persist_interval_iters"]
        for it in range(start + 1, self.args.iters + 1):
            t0 = time.perf_counter()
            loss = self.step(it)
            t_step = time.perf_counter() - t0
            if not self.args.no_checkpoint and it % every == 0:
                self.checkpoint(it)
            if not self.args.no_checkpoint and it % persist == 0:
                self.wait_replication()
                self.persist(it)
            self.timings.setdefault("iteration_s", []).append(time.perf_counter() - t0)
            self.timings.setdefault("step_s", []).append(t_step)
            log(self.rank, "iteration", iteration=it, loss=round(loss, 6), machine=self.machine)
        self.wait_replication()
        dist.barrier()
        self.finish()

    def finish(self) -> None:
        out = Path(self.args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        params = {k: v for k, v in self.snapshot().items() if k.startswith("model.")}
        data, manifest = pack(params)
        (out / f"final-rank-{self.rank:05d}.bin").write_bytes(data)
        (out / f"final-rank-{self.rank:05d}.json").write_text(json.dumps(manifest))
        stats = {k: sum(v) / len(v) for k, v in self.timings.items() if v}
        stats["shard_bytes"] = len(pack(self.snapshot())[0])
        stats["params"] = sum(p.numel() for p in self.model.parameters())
        (out / f"timings-rank-{self.rank:05d}.json").write_text(json.dumps(stats))
        log(self.rank, "done", iterations=self.args.iters)
        dist.destroy_process_group()


def send_shard(data: bytes, manifest: dict, dst: int, group, tag: int) -> list:
    """Start sending a stored shard (its manifest, a newline, its bytes), length first; returns the works."""
    blob = torch.frombuffer(bytearray(json.dumps(manifest).encode() + b"\n" + data), dtype=torch.uint8)
    size = torch.tensor([blob.numel()], dtype=torch.int64)
    return [dist.isend(size, dst, group=group, tag=tag), dist.isend(blob, dst, group=group, tag=tag + 1000)]


def recv_shard(src: int, group, tag: int) -> tuple[bytes, dict]:
    """Receive what :func:`send_shard` sent: (bytes, manifest)."""
    n = torch.empty(1, dtype=torch.int64)
    dist.recv(n, src, group=group, tag=tag)
    buf = torch.empty(int(n.item()), dtype=torch.uint8)
    dist.recv(buf, src, group=group, tag=tag + 1000)
    head, _, body = buf.numpy().tobytes().partition(b"\n")
    return body, json.loads(head)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="runtime.worker")
    ap.add_argument("--plan", required=True)
    ap.add_argument("--store-root", required=True)
    ap.add_argument("--durable-dir", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--pg-timeout", type=float, default=120.0)
    ap.add_argument("--no-checkpoint", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="gloo on CPU even when CUDA is present")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    Worker(args).run()


if __name__ == "__main__":
    sys.exit(main())
