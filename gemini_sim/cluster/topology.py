"""The cluster's network as a networkx graph.

Nodes: ``m{i}`` machines, ``rack{r}`` leaf switches (when the cluster has racks), ``spine`` and ``storage``.
Every edge carries ``gbps``, its bandwidth in each direction. By default the fabric is non-blocking: a rack's
uplink carries all its machines' NIC bandwidth; ``oversubscription`` > 1 divides it. Without racks
(``machines_per_rack = 0``) every machine hangs off one non-blocking switch.
"""

from __future__ import annotations

import networkx as nx

from gemini_sim.cluster.config import ClusterConfig, StorageConfig
from gemini_sim.errors import UserError


def machine(i: int) -> str:
    return f"m{i}"


def build(cluster: ClusterConfig, storage: StorageConfig | None = None, oversubscription: float = 1.0) -> nx.Graph:
    if oversubscription < 1:
        raise UserError(f"oversubscription must be >= 1, got {oversubscription}")
    g = nx.Graph()
    per_rack = cluster.machines_per_rack
    for i in range(cluster.machines):
        if per_rack:
            rack = f"rack{i // per_rack}"
            g.add_edge(machine(i), rack, gbps=cluster.network_gbps, kind="nic")
        else:
            g.add_edge(machine(i), "spine", gbps=cluster.network_gbps, kind="nic")
    if per_rack:
        racks = -(-cluster.machines // per_rack)
        for r in range(racks):
            members = min(per_rack, cluster.machines - r * per_rack)
            g.add_edge(f"rack{r}", "spine", gbps=members * cluster.network_gbps / oversubscription, kind="uplink")
    if storage is not None:
        g.add_edge("storage", "spine", gbps=storage.remote_gbps, kind="storage")
    return g


def rack_of(graph: nx.Graph, i: int) -> str:
    return next((n for n in graph.neighbors(machine(i)) if n.startswith("rack")), "spine")
