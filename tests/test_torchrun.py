"""The examples under plain torchrun, without the project's agent: a relaunch of the same job resumes from memory
and ends where an uninterrupted run ends; two c10d-rendezvous nodes on one host need a store each, and say so."""

import filecmp
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import needs_fsdp
from gemini_sim import plan as contract

pytestmark = needs_fsdp  # the example trains with FSDP2
ROOT = Path(__file__).resolve().parent.parent
MLP = ROOT / "examples" / "mlp" / "train.py"


def torchrun(tmp_path, plan, iters, out, job, nodes=1, procs=2, env=None, extra=()):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               GEMINI_JOB=job, GEMINI_STORE_ROOT=str(tmp_path / "shm"),
               GEMINI_DURABLE_DIR=str(tmp_path / "durable" / job), GEMINI_EVENTS="1", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}", *extra, str(MLP), "--plan",
           str(plan), "--iters", str(iters), "--out-dir", str(tmp_path / out)]
    if nodes == 1:
        cmd.insert(3, "--standalone")
    return subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(p, timeout=180):
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def same_finals(a: Path, b: Path, ranks: int) -> bool:
    return all(filecmp.cmp(a / f"final-rank-{r:05d}.bin", b / f"final-rank-{r:05d}.bin", shallow=False)
               for r in range(ranks))


def test_a_relaunched_single_node_job_resumes_from_memory(tmp_path):
    plan = tmp_path / "plan.json"
    contract.write(contract.default(1, 2, replicas=1, persist=4), plan)
    rc, out = finish(torchrun(tmp_path, plan, 6, "first", "job"))
    assert rc == 0, out
    for rank in (0, 1):  # both ranks share the machine's store: from the second checkpoint on (keep 2), each is
        # written through a mapping made ready while the first was written, or of one of its own that was dropped,
        # whichever rank dropped it
        cks = json.loads((tmp_path / "first" / f"timings-rank-{rank:05d}.json").read_text())["checkpoints"]
        assert [c["memory"] for c in cks] == ["new"] + ["held"] * 5, rank
    rc, out = finish(torchrun(tmp_path, plan, 10, "resumed", "job"))  # the same job, launched again
    assert rc == 0, out
    assert out.count('"msg": "recovered", "iteration": 6, "tier": "local"') == 2
    for rank in (0, 1):  # the files the last launch left (its spare and its kept shards) are mapped once recovery
        # is done, while training goes on: no checkpoint maps memory
        cks = json.loads((tmp_path / "resumed" / f"timings-rank-{rank:05d}.json").read_text())["checkpoints"]
        assert [c["memory"] for c in cks] == ["held"] * 4, rank
    rc, out = finish(torchrun(tmp_path, plan, 10, "straight", "other"))
    assert rc == 0 and '"tier": "fresh"' in out, out
    assert same_finals(tmp_path / "resumed", tmp_path / "straight", 2)


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(tmp_path, plan, iters, out, job, machine_ids):
    port = _port()
    extra = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={job}"]
    procs = [torchrun(tmp_path, plan, iters, out, job, nodes=2, procs=1, extra=extra,
                      env={"GEMINI_MACHINE_ID": str(m)} if m is not None else {}) for m in machine_ids]
    return [finish(p) for p in procs]


def test_two_c10d_nodes_on_one_host_need_a_store_each(tmp_path):
    plan = tmp_path / "plan.json"
    contract.write(contract.default(2, 1, replicas=2, persist=4), plan)
    results = _two_nodes(tmp_path, plan, 4, "shared", "clash", [None, None])
    assert all(rc != 0 for rc, _ in results)
    assert any("share the store folder" in out and "GEMINI_MACHINE_ID" in out for _, out in results)

    results = _two_nodes(tmp_path, plan, 5, "first", "pair", [0, 1])
    assert all(rc == 0 for rc, _ in results), results
    results = _two_nodes(tmp_path, plan, 8, "resumed", "pair", [0, 1])  # both nodes relaunched
    assert all(rc == 0 for rc, _ in results), results
    logs = "".join(out for _, out in results)
    assert logs.count('"msg": "recovered", "iteration": 5') == 2
    results = _two_nodes(tmp_path, plan, 8, "straight", "fresh", [0, 1])
    assert all(rc == 0 for rc, _ in results), results
    assert same_finals(tmp_path / "resumed", tmp_path / "straight", 2)
