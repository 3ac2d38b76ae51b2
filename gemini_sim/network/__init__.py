"""The network: a flow-level SimPy model with max-min fair sharing and priority classes (flows.py), on which the
interleaving model plays training and checkpoint traffic together."""
