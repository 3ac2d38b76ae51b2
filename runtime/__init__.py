"""gemini-sim's runtime: a library that a user's own FSDP2 training script calls to run a Plan.

In-memory checkpoints that outlive a crashed worker, replicated to peers by the plan's placement and schedule,
durable DCP checkpoints, and tiered recovery (this machine's memory, a peer's, DCP). See runtime/api.py.
"""

from .api import Checkpointer, ConfigError
from .plan import Plan, PlanError
from .state import StateError
from .store import StoreError

__all__ = ["Checkpointer", "ConfigError", "Plan", "PlanError", "StateError", "StoreError"]
