"""Communication cost of a placement: the checkpoint bytes each machine sends and receives per checkpoint, and the
load on every link of the topology when every machine sends its shard to its m-1 peers."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import networkx as nx

from gemini_sim.cluster import topology
from gemini_sim.cluster.config import GBPS
from gemini_sim.placement.layouts import Placement, replica_of


@dataclass(frozen=True)
class CommCost:
    sent_bytes: tuple[float, ...]  # per machine
    received_bytes: tuple[float, ...]  # per machine
    link_bytes: dict  # (node, node, direction) -> bytes; direction is 'a>b'
    link_seconds: dict  # same keys: bytes / bandwidth
    transfers: int

    @property
    def busiest_link(self):
        return max(self.link_seconds.items(), key=lambda kv: kv[1]) if self.link_seconds else (None, 0.0)

    @property
    def min_time_s(self) -> float:
        """No schedule can move one checkpoint's replicas faster than its busiest link allows."""
        return self.busiest_link[1]

    def summary(self) -> dict:
        (link, secs) = self.busiest_link
        return {"max_sent_gb": max(self.sent_bytes) / 1e9, "max_received_gb": max(self.received_bytes) / 1e9,
                "total_gb": sum(self.sent_bytes) / 1e9, "busiest_link": link, "busiest_link_s": secs,
                "transfers": self.transfers}


def cost(p: Placement, shard_bytes: float, graph: nx.Graph, own_bytes: float = 0.0) -> CommCost:
    """Route every replica transfer (owner -> each peer holder) on its shortest path; links are full duplex. A
    holder that holds the owner's shard as an HSDP replica (layouts.replica_of) is sent ``own_bytes`` only."""
    sent = [0.0] * p.machines
    recv = [0.0] * p.machines
    load: dict = defaultdict(float)
    paths = {}
    transfers = 0
    for owner, hs in enumerate(p.holders):
        for h in hs[1:]:
            nbytes = own_bytes if replica_of(p, owner, h) else shard_bytes
            sent[owner] += nbytes
            recv[h] += nbytes
            transfers += 1
            key = (owner, h)
            if key not in paths:
                paths[key] = nx.shortest_path(graph, topology.machine(owner), topology.machine(h))
            path = paths[key]
            for a, b in zip(path, path[1:]):
                load[(a, b)] += nbytes
    seconds = {k: v / (graph.edges[k]["gbps"] * GBPS) for k, v in load.items()}
    return CommCost(tuple(sent), tuple(recv), dict(load), seconds, transfers)
