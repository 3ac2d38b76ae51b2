"""Bandwidth-limited "machines" on one host: one Linux network namespace per machine, joined by veth links to a
bridge, each link limited with ``tc`` (a token bucket in both directions, like a full-duplex NIC).

Layout for machine ``m``: namespace ``gemini-m{m}``, its NIC ``gm{m}`` (address 10.78.0.{m+1}) paired with
``gmh{m}`` on the bridge ``gemini-br`` (10.78.0.254, in the host's namespace, where the launcher's key-value store
listens). A set-up with ``tag`` t > 0 uses ``gemini{t}-m{m}``, ``g{t}m{m}``, ``g{t}h{m}``, ``gemini{t}-br`` and
10.78.t.0/24, so that several can coexist. Traffic between two processes of one machine stays on that namespace's
loopback, unlimited (like NVLink); traffic between machines crosses two limited links: the sender's NIC out and the
receiver's NIC in.

Needs root (CAP_NET_ADMIN) and the ``ip`` and ``tc`` tools; :func:`available` says whether they are there, and the
launcher falls back to plain localhost without them. ``make netns-up`` / ``make netns-down`` wrap :func:`up` and
:func:`down`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

MAX_MACHINES = 200
# Several independent set-ups can coexist (the tests use tag 1, make calibrate tag 0): names and subnet carry the tag.


def ns(m: int, tag: int = 0) -> str:
    return f"gemini-m{m}" if tag == 0 else f"gemini{tag}-m{m}"


def nic(m: int, tag: int = 0) -> str:
    return f"gm{m}" if tag == 0 else f"g{tag}m{m}"


def _peer(m: int, tag: int) -> str:
    return f"gmh{m}" if tag == 0 else f"g{tag}h{m}"


def bridge(tag: int = 0) -> str:
    return "gemini-br" if tag == 0 else f"gemini{tag}-br"


def addr(m: int, tag: int = 0) -> str:
    return f"10.78.{tag}.{m + 1}"


def host_addr(tag: int = 0) -> str:
    return f"10.78.{tag}.254"


def inside(m: int, tag: int = 0) -> tuple[list[str], dict[str, str]]:
    """How a process runs as machine ``m`` of set-up ``tag``: the command prefix that puts it in the machine's
    namespace, and the environment that makes gloo use the machine's limited NIC."""
    return ["ip", "netns", "exec", ns(m, tag)], {"GLOO_SOCKET_IFNAME": nic(m, tag)}


def _state(tag: int) -> Path:
    base = Path("/run") if os.access("/run", os.W_OK) else Path("/tmp")
    return base / f"gemini-netns-{tag}.json"




def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip() or f'exit status {r.returncode}'}")
    return r


def available() -> str | None:
    """None when the set-up :func:`up` makes can be made here, else why not (one line). Tried for real, in a
    namespace of its own that is removed after: a namespace, a bridge, a veth pair and a ``tc`` token bucket on it
    (a sandbox may allow namespaces and not the rest)."""
    if not (shutil.which("ip") and shutil.which("tc")):
        return "the ip and tc tools are not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    probe = f"gemini-probe-{os.getpid()}"  # unique: several processes may ask at once
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    try:  # inside the probe's namespace: nothing here can clash with the host's links, and all goes with it
        for what, args in (("a bridge", ("link", "add", "gpb", "type", "bridge")),
                           ("a veth link", ("link", "add", "gpv", "type", "veth", "peer", "name", "gpw"))):
            r = _ip("-n", probe, *args, check=False)
            if r.returncode != 0:
                return f"cannot create {what} in a network namespace: {r.stderr.strip()}"
        try:
            _limit("gpv", 100, probe)
        except subprocess.CalledProcessError as e:
            return f"cannot limit a link's bandwidth with tc: {e.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _limit(dev: str, mbit: float, netns: str | None = None) -> None:
    """A token bucket on ``dev``'s egress: ``mbit`` Mbit/s, a burst of 4 ms of traffic (at least 32 KiB)."""
    burst = max(32 * 1024, int(mbit * 1e6 / 8 * 0.004))
    cmd = ["tc"] + (["-n", netns] if netns else []) + ["qdisc", "replace", "dev", dev, "root", "tbf",
                                                       "rate", f"{mbit}mbit", "burst", str(burst), "latency", "20ms"]
    subprocess.run(cmd, capture_output=True, text=True, check=True)


def up(machines: int, mbit: float, tag: int = 0) -> dict:
    """(Re)create the namespaces, links and limits for ``machines`` machines at ``mbit`` Mbit/s per NIC direction."""
    if not 1 <= machines <= MAX_MACHINES:
        raise ValueError(f"machines must be between 1 and {MAX_MACHINES}, got {machines}")
    if mbit <= 0:
        raise ValueError(f"bandwidth must be positive, got {mbit} Mbit/s")
    if not 0 <= tag <= 250:
        raise ValueError(f"tag must be between 0 and 250, got {tag}")
    why = available()
    if why:
        raise RuntimeError(why)
    down(tag)
    br = bridge(tag)
    _ip("link", "add", br, "type", "bridge")
    _ip("addr", "add", f"{host_addr(tag)}/24", "dev", br)
    _ip("link", "set", br, "up")
    for m in range(machines):
        name, dev, peer = ns(m, tag), nic(m, tag), _peer(m, tag)
        _ip("netns", "add", name)
        _ip("link", "add", dev, "type", "veth", "peer", "name", peer)
        _ip("link", "set", dev, "netns", name)
        _ip("link", "set", peer, "master", br)
        _ip("link", "set", peer, "up")
        _ip("-n", name, "addr", "add", f"{addr(m, tag)}/24", "dev", dev)
        _ip("-n", name, "link", "set", dev, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        # A NIC whose window survives idle gaps, like a datacenter transport (and the simulator's flows): by
        # default Linux restarts TCP slow start after every idle period, i.e. in every gap between collectives.
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv4.tcp_slow_start_after_idle=0"],
                       capture_output=True, check=True)
        _limit(dev, mbit, name)  # machine -> network
        _limit(peer, mbit)  # network -> machine
    state = {"machines": machines, "mbit": mbit, "host": host_addr(tag), "tag": tag}
    _state(tag).write_text(json.dumps(state))
    return state


def down(tag: int = 0) -> None:
    """Remove every namespace and link of this set-up (missing ones are fine)."""
    prefix = ns(0, tag)[:-1]
    for name in _ip("netns", "list", check=False).stdout.split():
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            # Deleting the veth pair first is synchronous; the namespace's own deletion frees its devices later,
            # and a quick up() after it would find the old NIC's name still taken.
            _ip("-n", name, "link", "del", nic(int(name[len(prefix):]), tag), check=False)
            _ip("netns", "del", name, check=False)
    _ip("link", "del", bridge(tag), check=False)
    _state(tag).unlink(missing_ok=True)


def current(tag: int = 0) -> dict | None:
    """The set-up made by :func:`up` that is still there, or None."""
    try:
        state = json.loads(_state(tag).read_text())
    except (OSError, ValueError):
        return None
    present = set(_ip("netns", "list", check=False).stdout.split())
    return state if all(ns(m, tag) in present for m in range(state["machines"])) else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.netns", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("up", help="create the namespaces and limited links")
    p.add_argument("--machines", type=int, default=4)
    p.add_argument("--mbit", type=float, default=400.0, help="bandwidth of every NIC, each direction (Mbit/s)")
    sub.add_parser("down", help="remove them")
    sub.add_parser("status", help="print the current set-up")
    ap.add_argument("--tag", type=int, default=0, help="which set-up (default 0; the tests use 1)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "up":
            s = up(args.machines, args.mbit, args.tag)
            print(f"{s['machines']} machines in namespaces {ns(0, args.tag)}..{s['machines'] - 1}, "
                  f"{s['mbit']:g} Mbit/s per NIC and direction, host {s['host']}")
        elif args.cmd == "down":
            down(args.tag)
            print("network namespaces removed")
        else:
            print(json.dumps(current(args.tag)))
    except (ValueError, RuntimeError, subprocess.CalledProcessError) as e:
        msg = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
