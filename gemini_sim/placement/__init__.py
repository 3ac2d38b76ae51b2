"""Placement of checkpoint replicas: the strategies' registry (layouts.py; add a placement there), the exact and
Monte Carlo probability that a burst of failures leaves a copy of every checkpoint (survival.py), and the traffic a
placement puts on each link (linkload.py)."""
