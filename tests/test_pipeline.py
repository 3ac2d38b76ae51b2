"""The checkpoint pipeline's threads (runtime/pipeline.py); its checkpoints are tested through the Checkpointer."""

import threading

from runtime.pipeline import Worker


def test_a_worker_runs_its_jobs_in_turn_on_one_thread_outlives_a_failing_one_and_stops():
    w = Worker("gemini-test")
    seen = []

    def job(k):
        seen.append((k, threading.current_thread().name))
        if k == 1:
            raise RuntimeError("a job that breaks its promise not to raise")

    done = [w.submit(lambda k=k: job(k)) for k in range(4)]
    w.stop()  # after the jobs given before
    assert all(d.wait(timeout=10) for d in done)
    assert seen == [(k, "gemini-test") for k in range(4)]
    w.thread.join(timeout=10)
    assert not w.thread.is_alive()
