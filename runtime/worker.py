"""The training worker that torchrun starts on every "machine" (one torchrun agent per machine).

Per iteration: train one step (FSDP2 ``fully_shard``, gloo on CPU or NCCL on GPUs); every ``interval_iters``
checkpoint this rank's model and optimizer shard to CPU memory (its machine's :class:`ShardStore`) and to the peers
the plan names, with the traffic scheduled as the plan says (``blocking``, ``naive`` or ``gemini``: see
runtime/traffic.py); every ``persist_interval_iters`` write a standard DCP checkpoint to durable storage.

Profiling: the first ``--profile-iters`` iterations (20) are recorded, collectives and compute spans, and written as
``profile.json`` (rank 0) and ``profile-rank-*.json`` in gemini-sim's profile format (runtime/profiler.py).
``--probe`` measures the point-to-point network bandwidth and the memory-copy rate (``probe.json``). At the end each
rank writes ``timings-rank-*.json``: mean timings, and one record per iteration and per checkpoint. ``--rotate
PLAN,none,...`` runs several schedules in turn, ``--block`` iterations each, in one job (make calibrate).

Cores (``--compute-cores``, ``--host-cores``): on a GPU machine the model computes on the GPU while the host's CPU
moves checkpoint bytes. Training on CPU, both would share the same cores, and every CPU-second the checkpoint costs
(copy, hash, file writes, TCP) would slow the "GPU" down. With these options training's own thread (forward, backward,
update: torch runs them on one thread here) runs on the compute cores, which stand in for the accelerator, and every
other thread (gloo's collective and I/O threads, the checkpoint copier, sender and receivers) on the host cores.

On start (first launch or a restart by the root agent) the ranks agree on the newest iteration that is complete
somewhere (an all-gather of what every machine's store holds, plus the DCP checkpoints on durable storage), and every
rank takes its state from its own machine's memory, from a peer that holds it (sent over the network), or from DCP
when some shard has no copy left, and logs which tier it used and how long it took.

Faults for tests (``GEMINI_FAULT``, only on the first attempt of the job) strike just before iteration ITER's update,
once every rank has finished the checkpoint traffic in flight (so which copies exist is deterministic):
``kill:RANK:ITER`` (SIGKILL), ``lose:MACHINE:ITER`` (local rank 0 of MACHINE announces it and waits there, so that
the launcher can kill the whole machine and replace it), ``corrupt-kill:RANK:ITER`` (once ITER's checkpoint is
replicated, at iteration ITER + 1: flip a byte of this machine's copy, then SIGKILL). ``kill-write:RANK:ITER``
kills the rank once ITER's shard is written into its machine's store, before it is committed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
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
from .profiler import Recorder
from .store import ShardStore, pack, unpack
from .traffic import SCHEDULES, Checkpoint, Receiver, isend_bytes, pin_thread, recv_bytes, stop

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
        self.compute_cores, self.host_cores = _cores(args.compute_cores), _cores(args.host_cores)
        pin_thread(self.host_cores)  # the threads gloo starts from here on run on the host's cores
        self.cuda = torch.cuda.is_available() and not args.cpu
        backend = "nccl" if self.cuda else "gloo"
        if self.cuda:
            torch.cuda.set_device(self.local)
        dist.init_process_group(backend, rank=self.rank, world_size=self.world,
                                timeout=timedelta(seconds=args.pg_timeout))
        self.backend = backend
        # Checkpoint traffic beside training, one group per direction (see runtime/traffic.py).
        self.repl_groups = tuple(dist.new_group(backend="gloo", timeout=timedelta(seconds=args.pg_timeout))
                                 for _ in range(2))
        holders = self.plan["placement"]["holders"]
        if len(holders) * self.ppm != self.world or self.plan["cluster"]["processes_per_machine"] != self.ppm:
            raise SystemExit(f"plan is for {len(holders)} x {self.plan['cluster']['processes_per_machine']} ranks, "
                             f"this job has {self.world // self.ppm} x {self.ppm}")
        self.holders = [list(h) for h in holders]
        self.ckpt = self.plan["checkpoint"]
        self.store = ShardStore(args.store_root, self.machine)
        self.store.clean_partial()
        self.durable = Path(args.durable_dir)
        self.cfg = ModelConfig(dim=args.dim, layers=args.layers, batch=args.batch, seq=args.seq,
                               accel_ms=args.accel_ms)
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
        self.schedule = self.plan["schedule"]
        # --rotate: several schedules side by side in one job, in blocks of --block iterations ("none": no
        # checkpoint), so that a noisy host slows them alike; the plans differ only in their schedule.
        self.rotation = [None if p == "none" else json.loads(Path(p).read_text())["schedule"]
                         for p in filter(None, args.rotate.split(","))]
        for sched in [self.schedule] + [r for r in self.rotation if r]:
            if sched["name"] not in SCHEDULES:
                raise SystemExit(f"schedule {sched['name']!r} is not run by the runtime (it runs "
                                 f"{', '.join(SCHEDULES)})")
        self.inflight: Checkpoint | None = None
        self.receivers: dict[int, Receiver] | None = None  # one per peer that sends us its checkpoints
        self.sent_count = 0
        self.recorder = Recorder(args.profile_iters)
        self.recorder.install()
        self.timings: dict[str, list[float]] = {}
        self.iter_log: list[dict] = []  # one record per iteration
        self.ckpt_log: list[dict] = []  # one record per checkpoint
        pin_thread(self.compute_cores)  # training's own thread: on the cores that stand in for the accelerator

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

    # -- checkpointing (the data path and schedules live in runtime/traffic.py) ----------------------------------
    def _commit_local(self, slot, manifest: dict) -> None:
        """Commit this rank's copy of a checkpoint in its machine's store (called by the copier thread)."""
        t0 = time.perf_counter()
        hook = (lambda: self._die("killed while writing a checkpoint")) if self._fault("kill-write", slot.iteration) \
            else None
        slot.commit(manifest, before_commit=hook)
        self.timings.setdefault("local_write_s", []).append(time.perf_counter() - t0)

    def start_checkpoint(self, iteration: int, release_at: float, released_in: int,
                         iteration_start: float | None = None) -> Checkpoint:
        if self.receivers is None:  # posted once, before any peer sends
            self.receivers = {src: Receiver(self, src) for src in self._peers()[1]}
        self.inflight = Checkpoint(self, iteration, self.schedule, release_at, self.sent_count, released_in,
                                   iteration_start).start()
        self.sent_count += 1
        return self.inflight

    def finish_checkpoint(self) -> float:
        """Wait for the checkpoint in flight (copy, sends, receives); return how long this waited."""
        ck, self.inflight = self.inflight, None
        if ck is None:
            return 0.0
        t = time.perf_counter()
        done = ck.wait()
        self.store.keep_newest(self.ckpt["keep"], recycle=[self.rank] + self._peers()[1])
        t0 = ck.iteration_start
        self.ckpt_log.append({"iteration": ck.iteration, "schedule": ck.schedule["name"],
                              "released_in": ck.released_in, "start_s": ck.release_at - t0,
                              "copied_s": (ck.copied_at or done) - ck.release_at, "complete_s": done - t0,
                              "data_s": ck.data_done() - t0,
                              "cpu_s": ck.cpu_seconds(),
                              "bytes": ck.size, "peers": len(ck.send_to), "cores": ck.cores,
                              "chunks": [[k, round(a, 5), round(b, 5)] for k, a, b in ck.sent]})
        self.timings.setdefault("replicated_s", []).append(done - ck.release_at)
        return time.perf_counter() - t

    def _peers(self) -> tuple[list[int], list[int]]:
        """Ranks I send my shard to, and ranks whose shards I keep (same local rank on the other machines)."""
        me = self.machine
        send = [h for h in self.holders[me][1:]]
        recv = [j for j, hs in enumerate(self.holders) if j != me and me in hs]
        to_rank = lambda m: m * self.ppm + self.local
        return [to_rank(m) for m in send], [to_rank(m) for m in recv]

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
    def _fault_point(self, iteration: int) -> None:
        """Where injected faults strike, just before iteration ITER's update: first every rank finishes the
        checkpoint traffic in flight (so which copies exist is deterministic), then the faulty rank acts."""
        first = self.attempt == 0 and self.job_attempt == 0
        due = [(k, who) for k, who, i in self.faults
               if (k in ("kill", "lose") and i == iteration) or (k == "corrupt-kill" and i == iteration - 1)]
        if not first or not due:
            return
        self.finish_checkpoint()
        dist.barrier()
        if self._fault("kill", iteration):
            self._die("killed mid-iteration")
        if self._fault("lose", iteration):
            log(self.rank, "lose-me", iteration=iteration, machine=self.machine)
            time.sleep(3600)  # the launcher kills this machine now
        if self._fault("corrupt-kill", iteration - 1):  # the peers have it: a bit flips in this machine's copy
            bin_path = self.store._paths(iteration - 1, self.rank)[0]
            raw = bytearray(bin_path.read_bytes())
            raw[len(raw) // 3] ^= 0xFF
            bin_path.write_bytes(bytes(raw))
            self._die("corrupted its stored shard")

    def step(self, iteration: int) -> tuple[float, float]:
        """One training iteration; returns (loss, seconds the update waited for a checkpoint's copy)."""
        x, y = batch(self.cfg, self.args.seed, iteration, self.rank)
        x, y = x.to(self.device), y.to(self.device)
        rec = self.recorder
        rec.phase("forward")
        out = self.model(x)
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, self.cfg.vocab), y.reshape(-1))
        rec.phase("backward")
        loss.backward()
        rec.phase("host")
        waited = 0.0
        if self.inflight is not None:
            self.inflight.backward_ended()  # gemini: what did not fit the idle spans may go now
            t = time.perf_counter()
            self.inflight.wait_copied()  # the update may overwrite the state only once it is in CPU memory
            waited = time.perf_counter() - t
            rec.skip_until(time.perf_counter())
        self._fault_point(iteration)
        rec.skip_until(time.perf_counter())
        rec.phase("optimizer")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach()), waited

    def run(self) -> None:
        start = self.recover()
        if self.args.probe:
            self.probe()
        every, persist = self.ckpt["interval_iters"], self.ckpt["persist_interval_iters"]
        blocking = self.schedule["name"] == "blocking"
        checkpointing = not self.args.no_checkpoint
        pending = None  # naive/gemini: the iteration whose state goes out while the next iteration trains
        for it in range(start + 1, self.args.iters + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            stall = 0.0
            if self.rotation and (it - 1) % self.args.block == 0:  # the next schedule's block begins
                stall += self.finish_checkpoint()
                pending = None
                sched = self.rotation[(it - 1) // self.args.block % len(self.rotation)]
                checkpointing = sched is not None
                self.schedule = sched or self.plan["schedule"]
                blocking = self.schedule["name"] == "blocking"
            if pending is not None:
                stall += self.finish_checkpoint()  # a checkpoint starts only when the one before it is done
                self.start_checkpoint(pending, time.perf_counter(), released_in=it)
                pending = None
            elif self.inflight is not None:
                self.inflight.iteration_started(t0)  # an interval of K > 1: its traffic may use this iteration too
            self.recorder.begin(it)
            loss, waited = self.step(it)
            if self.recorder.end():
                self.write_profile()
            if checkpointing and it % every == 0:
                if blocking:  # training waits while the whole checkpoint is copied out and sent
                    self.start_checkpoint(it, time.perf_counter(), released_in=it, iteration_start=t0)
                    stall += self.finish_checkpoint()
                else:
                    pending = it
            if checkpointing and it % persist == 0:
                self.persist(it)
            dt = time.perf_counter() - t0
            self.timings.setdefault("iteration_s", []).append(dt)
            self.iter_log.append({"iteration": it, "iteration_s": dt, "stall_s": stall, "update_wait_s": waited,
                                  "cpu_s": time.process_time() - c0,  # every thread of this rank
                                  "schedule": self.schedule["name"] if checkpointing else "none",
                                  "block_pos": (it - 1) % self.args.block if self.rotation else None})
            log(self.rank, "iteration", iteration=it, loss=round(loss, 6), machine=self.machine)
        self.finish_checkpoint()
        if self.receivers is not None:
            send_to, recv_from = self._peers()
            stop(self, send_to, self.sent_count, [self.receivers[s] for s in recv_from])
        if self.recorder.iterations and len(self.recorder.iterations) < self.recorder.limit:
            self.write_profile()  # a run shorter than the profiling window: what it has
        dist.barrier()
        self.finish()

    def probe(self) -> None:
        """Measure what the simulator needs to know about this set-up: the network's point-to-point bandwidth
        between machine 0 and machine 1 (rank 0 and its counterpart, each direction), and the rate at which this
        rank copies memory (the stand-in for the GPU-to-CPU copy when training on CPU)."""
        nbytes, reps = 8 << 20, 3
        rates = []
        other = self.ppm if self.world > self.ppm else None
        for src, dst in ((0, other), (other, 0)) if other is not None else ():
            for _ in range(reps):
                dist.barrier()
                t = time.perf_counter()
                g = self.repl_groups[0 if src < dst else 1]
                if self.rank == src:
                    dist.send(torch.ones(nbytes, dtype=torch.uint8), dst, group=g)
                elif self.rank == dst:
                    dist.recv(torch.empty(nbytes, dtype=torch.uint8), src, group=g)
                    rates.append(nbytes / (time.perf_counter() - t))
        if self.rank == 0 and rates:
            pin_thread(self.host_cores)  # alone, where the checkpoint's copier thread runs
            a = torch.ones(64 << 20, dtype=torch.uint8)
            b = torch.empty_like(a)
            best = min(_timed(lambda: b.copy_(a)) for _ in range(5))
            pin_thread(self.compute_cores)
            Path(self.args.out_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.args.out_dir) / "probe.json").write_text(json.dumps({
                "network_bytes_per_s": sorted(rates)[len(rates) // 2], "network_samples": rates,
                "copy_bytes_per_s": a.numel() / best, "probe_bytes": nbytes}))
        dist.barrier()

    def write_profile(self) -> None:
        out = Path(self.args.out_dir)
        n = self.world // self.ppm
        src = f"runtime rank {self.rank}, {n} x {self.ppm} ranks, {self.backend}, schedule {self.schedule['name']}" \
              + (" (no checkpoint)" if self.args.no_checkpoint else "")
        self.recorder.write(out / f"profile-rank-{self.rank:05d}.json", n, self.ppm, src)
        if self.rank == 0:
            self.recorder.write(out / "profile.json", n, self.ppm, src)

    def finish(self) -> None:
        out = Path(self.args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        snap = self.snapshot()
        params = {k: v for k, v in snap.items() if k.startswith("model.")}
        data, manifest = pack(params)
        (out / f"final-rank-{self.rank:05d}.bin").write_bytes(data)
        (out / f"final-rank-{self.rank:05d}.json").write_text(json.dumps(manifest))
        stats = {k: sum(v) / len(v) for k, v in self.timings.items() if v}
        stats["shard_bytes"] = len(pack(snap)[0])
        stats["params"] = sum(p.numel() for p in self.model.parameters())  # DTensor numel: the whole model's
        stats["schedule"] = self.schedule["name"]
        stats["checkpointing"] = not self.args.no_checkpoint
        stats["cores"] = sorted(os.sched_getaffinity(0))  # where training's own thread ran
        stats["backend"] = dist.get_backend()
        stats["device"] = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"
        stats["iterations"] = self.iter_log
        stats["checkpoints"] = self.ckpt_log
        (out / f"timings-rank-{self.rank:05d}.json").write_text(json.dumps(stats))
        log(self.rank, "done", iterations=self.args.iters)
        dist.destroy_process_group()


def _cores(spec: str) -> set[int] | None:
    return {int(c) for c in spec.split(",")} if spec else None


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def send_shard(data: bytes, manifest: dict, dst: int, group, tag: int) -> list:
    """Start sending a stored shard (its manifest, a newline, its bytes), length first; returns the works."""
    return isend_bytes(json.dumps(manifest).encode() + b"\n" + data, dst, group, (tag, tag + 1000))


def recv_shard(src: int, group, tag: int) -> tuple[bytes, dict]:
    """Receive what :func:`send_shard` sent: (bytes, manifest)."""
    head, _, body = recv_bytes(src, group, (tag, tag + 1000)).partition(b"\n")
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
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank per iteration")
    ap.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--accel-ms", type=float, default=0.0, help="emulated accelerator: each block's forward waits "
                    "this many ms more, its backward twice as many, with the CPU free (default 0: off)")
    ap.add_argument("--pg-timeout", type=float, default=120.0)
    ap.add_argument("--no-checkpoint", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="gloo on CPU even when CUDA is present")
    ap.add_argument("--profile-iters", type=int, default=20, help="iterations recorded in profile.json")
    ap.add_argument("--probe", action="store_true", help="measure network and copy bandwidth (probe.json)")
    ap.add_argument("--rotate", default="", help="comma-separated plans (or 'none') to run in turn, in blocks")
    ap.add_argument("--block", type=int, default=4, help="iterations per block with --rotate (default 4)")
    ap.add_argument("--compute-cores", default="", help="cores of training's own thread, standing in for the "
                    "accelerator (comma-separated; default: no pinning)")
    ap.add_argument("--host-cores", default="", help="cores of every other thread: gloo's (collectives, I/O) and "
                    "the checkpoint's copier, sender and receivers (default: no pinning)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    Worker(args).run()


if __name__ == "__main__":
    sys.exit(main())
