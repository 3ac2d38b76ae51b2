"""gemini-sim's runtime: a library that a user's own FSDP2 training script calls to run a Plan.

In-memory checkpoints that outlive a crashed worker, replicated to peers by the plan's placement and schedule,
durable DCP checkpoints, and tiered recovery (this machine's memory, a peer's, DCP). See runtime/api.py.

The names below load their module (and torch) when first used, so the agent and ``python -m runtime plan``, which
need no torch of their own, start at once.
"""

import importlib

from .plan import Plan, PlanError

_LAZY = {"Checkpointer": "api", "ConfigError": "config", "StateError": "state", "StoreError": "store",
         "init_process_group": "distributed"}
__all__ = ["Checkpointer", "ConfigError", "Plan", "PlanError", "StateError", "StoreError", "init_process_group"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
