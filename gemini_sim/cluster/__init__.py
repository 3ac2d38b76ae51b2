"""The cluster and its workload: presets (config.py: TOML -> frozen dataclasses, presets/), the network as a graph
(topology.py), and one training iteration as a DAG of compute and collectives (workload.py: analytical or a
runtime's measured profile)."""
