"""Replaying a failure trace: the checkpointing strategies as policies (policies.py: registry; add a replay policy
there) and the SimPy model of the job that trains, fails and recovers (engine.py)."""
