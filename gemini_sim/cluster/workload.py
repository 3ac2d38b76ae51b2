"""One training iteration as a small DAG of operations on two streams.

An :class:`Op` runs on the ``compute`` or the ``comm`` stream, after its dependencies: ``("end", j)`` waits for
op j to finish, ``("start", j)`` only for it to start (how ZeRO-3 prefetches the next layer's parameters while the
current layer computes). Each stream runs one op at a time, in the order the ops become ready.

Two sources:

- :func:`zero3` builds the analytical timeline of ZeRO-3 data parallelism from a preset: per layer, an all-gather
  of the layer's bf16 parameters before the forward pass, another before the backward pass, and a reduce-scatter of
  its gradients after it; compute spans from FLOPs at the achieved throughput (``model.mfu`` of peak); then the
  optimizer update. One collective prefetched ahead (DeepSpeed's default behaviour, simplified).
- :func:`from_profile` replays a timeline measured by the runtime (format below), op after op on one stream with
  measured compute durations; collectives keep their measured bytes so their time follows from the network model.

Collectives are machine-level rings (NCCL's ring across machines; the GPUs inside a machine talk over NVLink, which
we do not model): every machine sends (N-1)/N of the collective's bytes to its ring successor, as one flow.

Profile JSON format (version 1)::

    {"format": "gemini-sim-profile", "version": 1,
     "machines": 4, "processes_per_machine": 2, "source": "runtime ...",
     "iterations": [
       {"iteration": 5, "start_s": 0.0, "end_s": 0.84,
        "ops": [{"kind": "compute", "name": "forward", "start_s": 0.0, "end_s": 0.11},
                {"kind": "collective", "name": "all_gather", "start_s": 0.11, "end_s": 0.13, "bytes": 1048576},
                ...,
                {"kind": "compute", "name": "optimizer", "start_s": 0.8, "end_s": 0.84}]}]}

Times are seconds from the iteration's start on one rank; ``bytes`` is the full size of the collective's result
(all-gather output, reduce-scatter input, all-reduce tensor). The op named ``optimizer`` is the update.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from statistics import median

from gemini_sim.cluster.config import Preset
from gemini_sim.errors import UserError
from gemini_sim.files import load_json

COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce", "broadcast")
OPTIMIZER_BYTES_PER_PARAM = 32  # Adam reads and writes master weights, m, v and reads the gradient (fp32)
HBM_BYTES_PER_S = {"A100": 1.5e12, "H100": 3.0e12}  # sustained, our rounded figures for the update's memory traffic


@dataclass(frozen=True)
class Op:
    name: str
    stream: str  # "compute" or "comm"
    deps: tuple[tuple[str, int], ...] = ()
    duration_s: float = 0.0  # compute
    collective: str = ""  # comm: all_gather | reduce_scatter | all_reduce | broadcast
    bytes: float = 0.0  # comm: full size of the collective
    layer: int = -1


@dataclass(frozen=True)
class Timeline:
    ops: tuple[Op, ...]
    update: int  # index of the optimizer update op
    source: str  # "zero3" or "profile"
    machines: int

    def compute_s(self) -> float:
        return sum(op.duration_s for op in self.ops if op.stream == "compute")

    def collective_bytes(self) -> float:
        return sum(op.bytes for op in self.ops if op.stream == "comm")


def ring_bytes_per_machine(op: Op, machines: int) -> float:
    """Bytes each machine sends for a ring collective over ``machines``."""
    if machines <= 1:
        return 0.0
    share = (machines - 1) / machines * op.bytes
    return 2 * share if op.collective == "all_reduce" else share


def zero3(preset: Preset) -> Timeline:
    m, c = preset.model, preset.cluster
    layers = m.layers
    layer_params = m.parameters / layers
    layer_bytes = 2.0 * layer_params  # bf16
    tokens_per_gpu = m.global_batch_tokens / c.gpus
    achieved = c.gpu_peak_tflops * 1e12 * m.mfu
    fwd = 2.0 * layer_params * tokens_per_gpu / achieved
    bwd = 2 * fwd
    hbm = next((v for k, v in HBM_BYTES_PER_S.items() if k in c.gpu), 1.5e12)
    update_s = m.parameters / c.gpus * OPTIMIZER_BYTES_PER_PARAM / hbm

    ops: list[Op] = []

    def add(op: Op) -> int:
        ops.append(op)
        return len(ops) - 1

    ag_f, f = [], []
    for layer in range(layers):
        deps = (("start", f[layer - 1]),) if layer else ()
        ag_f.append(add(Op(f"AG fwd {layer}", "comm", deps, collective="all_gather", bytes=layer_bytes, layer=layer)))
        deps = (("end", ag_f[layer]),) + ((("end", f[layer - 1]),) if layer else ())
        f.append(add(Op(f"forward {layer}", "compute", deps, duration_s=fwd, layer=layer)))
    ag_b: dict[int, int] = {}
    b: dict[int, int] = {}
    rs: list[int] = []
    top = layers - 1
    ag_b[top] = add(Op(f"AG bwd {top}", "comm", (("end", f[top]),), collective="all_gather", bytes=layer_bytes,
                       layer=top))
    for layer in range(top, -1, -1):
        prev = (("end", b[layer + 1]),) if layer < top else (("end", f[top]),)
        b[layer] = add(Op(f"backward {layer}", "compute", (("end", ag_b[layer]),) + prev, duration_s=bwd,
                          layer=layer))
        if layer > 0:
            ag_b[layer - 1] = add(Op(f"AG bwd {layer - 1}", "comm", (("start", b[layer]),),
                                     collective="all_gather", bytes=layer_bytes, layer=layer - 1))
        rs.append(add(Op(f"RS {layer}", "comm", (("end", b[layer]),), collective="reduce_scatter",
                         bytes=layer_bytes, layer=layer)))
    update = add(Op("optimizer", "compute", tuple(("end", i) for i in rs) + (("end", b[0]),), duration_s=update_s))
    return Timeline(tuple(ops), update, "zero3", c.machines)


def load_profile(path) -> dict:
    data = load_json(path, "profile")
    _validate_profile(data, str(path))
    return data


def _validate_profile(data, where: str) -> None:
    from gemini_sim.plan import check_format

    check_format(data, "gemini-sim-profile", where)  # gemini_sim/schema/profile-v1.schema.json
    its = data.get("iterations")
    if not isinstance(its, list) or not its:
        raise UserError(f"{where}: key 'iterations' must be a non-empty list")
    for i, it in enumerate(its):
        ops = it.get("ops") if isinstance(it, dict) else None
        if not isinstance(ops, list) or not ops:
            raise UserError(f"{where}: iterations[{i}].ops must be a non-empty list")
        for j, op in enumerate(ops):
            at = f"{where}: iterations[{i}].ops[{j}]"
            if not isinstance(op, dict) or op.get("kind") not in ("compute", "collective"):
                raise UserError(f"{at}.kind must be 'compute' or 'collective'")
            for key in ("start_s", "end_s"):
                if not isinstance(op.get(key), (int, float)):
                    raise UserError(f"{at}.{key} must be a number")
            if op["end_s"] < op["start_s"]:
                raise UserError(f"{at}: end_s is before start_s")
            if op["kind"] == "collective":
                if op.get("name") not in COLLECTIVES:
                    raise UserError(f"{at}.name must be one of {', '.join(COLLECTIVES)}")
                if not isinstance(op.get("bytes"), (int, float)) or op["bytes"] < 0:
                    raise UserError(f"{at}.bytes must be a number >= 0")


def _signature(it: dict) -> tuple:
    return tuple((op["kind"], op.get("name")) for op in sorted(it["ops"], key=lambda o: o["start_s"]))


def typical_iteration(data: dict) -> dict:
    """One iteration that stands for the profile: when every iteration after the first (warm-up) runs the same
    sequence of ops, each op's start gap and duration is the median over those iterations (robust to the odd slow
    one); otherwise the median-length iteration."""
    its = data["iterations"]
    steady = its[1:] if len(its) > 2 else its
    sig = _signature(steady[0])
    if len(steady) < 3 or any(_signature(it) != sig for it in steady):
        order = sorted(range(len(its)), key=lambda i: its[i]["end_s"] - its[i]["start_s"])
        return its[order[len(order) // 2]]
    ordered = [sorted(it["ops"], key=lambda o: o["start_s"]) for it in steady]
    ops, t = [], 0.0
    for j, op in enumerate(ordered[0]):
        prev_end = [(o[j - 1]["end_s"] if j else it["start_s"]) for o, it in zip(ordered, steady)]
        gap = median([o[j]["start_s"] - pe for o, pe in zip(ordered, prev_end)])
        dur = median([o[j]["end_s"] - o[j]["start_s"] for o in ordered])
        start = t + max(0.0, gap)
        ops.append(dict(op, start_s=start, end_s=start + dur))
        t = start + dur
    tail = median([it["end_s"] - o[-1]["end_s"] for o, it in zip(ordered, steady)])
    return {"iteration": "median", "start_s": 0.0, "end_s": t + max(0.0, tail), "ops": ops}


def from_profile(data: dict, iteration: int | None = None, link_bytes_per_s: float | None = None) -> Timeline:
    """A timeline from a measured profile: by default :func:`typical_iteration`, else the iteration at that index.

    ``link_bytes_per_s``: the profile was measured on a network whose NICs carry that many bytes per second; each
    collective then gets the bytes that make its time alone on the ring model equal to its measured duration (its
    *effective* bytes). Use it to calibrate the model to a collective library whose algorithms move more than a
    ring would (gloo's reduce-scatter is an all-reduce, for one); without it the profile's logical bytes are used."""
    it = typical_iteration(data) if iteration is None else data["iterations"][iteration]
    machines = data["machines"]
    ops: list[Op] = []
    update = -1
    cursor = it["ops"][0]["start_s"]
    for raw in sorted(it["ops"], key=lambda o: o["start_s"]):
        deps = (("end", len(ops) - 1),) if ops else ()
        gap = raw["start_s"] - cursor  # time between ops on the rank: host work, counted as compute
        if gap > 1e-6:
            ops.append(Op("host", "compute", deps, duration_s=gap))
            deps = (("end", len(ops) - 1),)
        if raw["kind"] == "compute":
            ops.append(Op(raw.get("name", "compute"), "compute", deps, duration_s=raw["end_s"] - raw["start_s"]))
            if raw.get("name") == "optimizer":
                update = len(ops) - 1
        else:
            op = Op(raw["name"], "comm", deps, collective=raw["name"], bytes=float(raw["bytes"]))
            if link_bytes_per_s and machines > 1:
                unit = ring_bytes_per_machine(dataclasses.replace(op, bytes=1.0), machines)
                op = dataclasses.replace(op, bytes=(raw["end_s"] - raw["start_s"]) * link_bytes_per_s / unit)
            ops.append(op)
        cursor = max(cursor, raw["end_s"])
    if update < 0:  # no optimizer op recorded: the last op stands for it
        update = len(ops) - 1
    return Timeline(tuple(ops), update, "profile", machines)
