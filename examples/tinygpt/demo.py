"""`make runtime-demo`: 4 machines x 2 processes on CPU train a small GPT with FSDP2 (train.py beside this file),
checkpoint to CPU memory every iteration with group placement (m = 2), lose a whole machine half-way, and recover
its state from its peer's memory. Then it checks that the whole final state of every rank (parameters, optimizer state) is bitwise
identical to that of a run without failures. Both jobs start afresh, whatever an earlier demo left in the folder,
and the check is made only where both trained every iteration."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from runtime.agent import Job, default_plan, summarize
from runtime.state import same_shard

TRAIN = Path(__file__).resolve().parent / "train.py"


def main() -> int:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="gemini-demo-"))
    plan_path = Path(sys.argv[2]) if len(sys.argv) > 2 else default_plan(work / "plan.json", 4, 2, persist=5)
    iters = 12
    print(f"runtime demo: 4 machines x 2 processes, gloo on CPU, plan {plan_path}, {iters} iterations")
    print("1) the same job without failures, for reference")
    entry = [str(TRAIN), "--iters", str(iters)]
    ref = Job(plan_path, work / "reference", entry, fresh=True)
    r0 = ref.run()
    ref.cleanup()
    summarize(r0)
    print("2) machine 1 is lost in iteration 7 (agent and workers killed, CPU memory wiped, replaced)")
    job = Job(plan_path, work / "failure", entry, faults="lose:1:7", fresh=True)
    r1 = job.run()
    job.cleanup()
    summarize(r1)
    if not (r0.ok and r1.ok):
        print("demo FAILED: a job did not finish")
        return 1
    trained = [sorted({e["iteration"] for e in r.records("iteration") if e["rank"] == 0}) for r in (r0, r1)]
    if r0.records("recovered") or trained[0] != list(range(1, iters + 1)) or trained[1] != trained[0]:
        print(f"demo FAILED: the runs did not each train iterations 1 to {iters} (the reference trained "
              f"{trained[0][:1]}..{trained[0][-1:]}, the other {trained[1][:1]}..{trained[1][-1:]})")
        return 1
    world = len(list(r0.out_dir.glob("final-rank-*.bin")))
    same = all(same_shard(r0.out_dir / f"final-rank-{r:05d}", r1.out_dir / f"final-rank-{r:05d}") for r in range(world))
    print(f"whole final state of all {world} ranks bitwise identical to the run without failures: {same}")
    print(f"logs and outputs in {work}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
