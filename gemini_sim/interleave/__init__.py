"""Playing checkpoint traffic together with training traffic (traffic interleaving).

- model.py: the SimPy model of an iteration with a checkpoint's data path;
- schedules.py: the schedules' registry (add a schedule there);
- planner.py: GEMINI's planner (idle spans of the profiled iteration, chunks packed into them);
- simulation.py: :func:`simulate`, the public entry point, and the search for the smallest interval.
"""

from gemini_sim.interleave.model import SLICE, InterleaveConfig, build_placement, chunk_size, symmetric_slice
from gemini_sim.interleave.schedules import SCHEDULES
from gemini_sim.interleave.simulation import InterleaveResult, simulate

__all__ = ["SCHEDULES", "SLICE", "InterleaveConfig", "InterleaveResult", "build_placement", "chunk_size",
           "simulate", "symmetric_slice"]
