"""The backend choice (runtime/distributed.py): NCCL only where every rank on the host has a GPU of its own, gloo on
the GPUs where ranks share them, gloo on the CPU without GPUs; an impossible request fails at once, in one line."""

import pytest

from runtime.distributed import BackendError, choose, host_ranks


@pytest.mark.parametrize("requested, gpus, ranks, expected", [
    ("auto", 0, 4, ("gloo", "cpu")),
    ("auto", 8, 8, ("cpu:gloo,cuda:nccl", "cuda")),
    ("auto", 1, 2, ("cpu:gloo,cuda:gloo", "cuda")),  # the agent's machines sharing one GPU
    ("nccl", 2, 2, ("cpu:gloo,cuda:nccl", "cuda")),
    ("gloo", 8, 8, ("cpu:gloo,cuda:gloo", "cuda")),
    ("cpu", 8, 8, ("gloo", "cpu")),
])
def test_backend_choice(requested, gpus, ranks, expected):
    assert choose(requested, gpus, ranks) == expected


@pytest.mark.parametrize("requested, gpus, ranks, message", [
    ("nccl", 1, 2, "NCCL needs a GPU per rank: 2 ranks on this host share 1 GPU"),
    ("nccl", 0, 1, "needs a GPU and this host has none"),
    ("mpi", 1, 1, "unknown backend 'mpi'"),
])
def test_impossible_backends_fail_at_once_in_one_line(requested, gpus, ranks, message):
    with pytest.raises(BackendError, match=message) as e:
        choose(requested, gpus, ranks)
    assert "\n" not in str(e.value)


def test_ranks_on_this_host_under_torchrun_and_under_the_agent(monkeypatch):
    monkeypatch.delenv("GEMINI_HOST_RANKS", raising=False)
    monkeypatch.delenv("GEMINI_HOST_RANK_BASE", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert host_ranks() == (4, 3)
    monkeypatch.setenv("GEMINI_HOST_RANKS", "8")  # the agent: 4 machines x 2 on one host, this is machine 2
    monkeypatch.setenv("GEMINI_HOST_RANK_BASE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert host_ranks() == (8, 5)
