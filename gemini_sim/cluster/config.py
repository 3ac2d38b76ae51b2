"""Cluster, model and recovery configuration: TOML presets read into frozen dataclasses.

A preset file has four tables, ``[cluster]``, ``[model]``, ``[storage]`` and ``[recovery]``; see
``gemini_sim/cluster/presets/*.toml``. Every key is checked: an unknown key or an impossible value raises
:class:`~gemini_sim.errors.UserError` naming the file and the key.

Checkpoint size. A checkpoint holds what training cannot recompute: the fp32 master weights and Adam's two fp32
moments, 12 bytes per parameter (``bytes_per_param``; the bf16 working copy is derived from the master weights and
gradients are not saved). This matches the GEMINI paper's example: MT-NLG 530B takes about 42 minutes to checkpoint
to remote storage at 20 Gbps, and 530e9 x 12 B / 2.5 GB/s = 2544 s = 42.4 min.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from gemini_sim.errors import UserError, unknown_name
from gemini_sim.files import load_toml

GBPS = 1e9 / 8  # bytes per second in one Gbit/s


@dataclass(frozen=True)
class ClusterConfig:
    machines: int
    gpus_per_machine: int
    gpu: str
    gpu_memory_gb: float
    gpu_peak_tflops: float  # dense bf16 peak per GPU
    cpu_memory_gb: float
    network_gbps: float  # per machine, inter-machine
    pcie_gbps: float  # per machine, GPU <-> CPU memory (all GPUs of the machine together)
    machines_per_rack: int = 0  # 0: no rack structure (failure domains come with the placement study)
    h2d_gbps: float = 0.0  # per machine, CPU memory -> GPU (recovery); 0: the same as pcie_gbps
    copy_slowdown: float = 0.0  # fraction by which compute slows while a GPU-to-CPU copy runs beside it
    machine_type: str = ""  # the machine type (machines.py) that filled the keys the preset left out

    @property
    def gpus(self) -> int:
        return self.machines * self.gpus_per_machine

    @property
    def h2d(self) -> float:
        """CPU memory -> GPU, Gbit/s per machine."""
        return self.h2d_gbps or self.pcie_gbps


@dataclass(frozen=True)
class ModelConfig:
    name: str
    parameters: float
    layers: int
    hidden: int
    seq_len: int
    global_batch_tokens: float
    mfu: float  # achieved fraction of peak FLOP/s
    bytes_per_param: float = 12.0  # fp32 master weights + Adam m and v
    iteration_time_s: float = 0.0  # 0: derive from FLOPs (6 * params * tokens / achieved FLOP/s)


@dataclass(frozen=True)
class StorageConfig:
    remote_gbps: float  # aggregate bandwidth of the remote persistent storage
    strawman_interval_hours: float = 3.0  # BLOOM checkpointed about every 3 hours
    gemini_persist_interval_hours: float = 3.0  # GEMINI's low-frequency remote checkpoints


@dataclass(frozen=True)
class RecoveryConfig:
    restart_s: float = 300.0  # restart the job's processes (software/network failure, no machine lost)
    replace_s: float = 600.0  # bring in a replacement machine for each lost one (done in parallel)
    replicas: int = 2  # GEMINI's m: copies of each machine's checkpoint in CPU memory
    placement: str = "auto"  # GEMINI's group (m | N) or mixed placement; or any placement strategy name


@dataclass(frozen=True)
class Preset:
    name: str
    cluster: ClusterConfig
    model: ModelConfig
    storage: StorageConfig
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)

    # Derived quantities, in bytes and seconds. Every strategy and report reads them from here.
    @property
    def checkpoint_bytes(self) -> float:
        return self.model.parameters * self.model.bytes_per_param

    @property
    def checkpoint_bytes_per_machine(self) -> float:
        return self.checkpoint_bytes / self.cluster.machines

    @property
    def iteration_time_s(self) -> float:
        if self.model.iteration_time_s > 0:
            return self.model.iteration_time_s
        flops = 6.0 * self.model.parameters * self.model.global_batch_tokens
        achieved = self.cluster.gpus * self.cluster.gpu_peak_tflops * 1e12 * self.model.mfu
        return flops / achieved

    @property
    def remote_write_s(self) -> float:
        """Whole checkpoint to (or from) remote storage, limited by its aggregate bandwidth."""
        return self.checkpoint_bytes / (self.storage.remote_gbps * GBPS)

    @property
    def gpu_to_cpu_s(self) -> float:
        """Copy one machine's shard between GPU and CPU memory (all machines in parallel)."""
        return self.checkpoint_bytes_per_machine / (self.cluster.pcie_gbps * GBPS)

    @property
    def cpu_to_gpu_s(self) -> float:
        """Copy one machine's shard back from CPU memory to its GPUs (recovery from memory)."""
        return self.checkpoint_bytes_per_machine / (self.cluster.h2d * GBPS)

    @property
    def peer_transfer_s(self) -> float:
        """Send one machine's shard to one peer over the machine's NIC."""
        return self.checkpoint_bytes_per_machine / (self.cluster.network_gbps * GBPS)

    def with_replicas(self, replicas: int) -> "Preset":
        return dataclasses.replace(self, recovery=dataclasses.replace(self.recovery, replicas=replicas))

    def summary(self) -> dict:
        return {
            "preset": self.name,
            "machines": self.cluster.machines,
            "gpus": self.cluster.gpus,
            "model": self.model.name,
            "parameters": self.model.parameters,
            "checkpoint_gb": self.checkpoint_bytes / 1e9,
            "checkpoint_gb_per_machine": self.checkpoint_bytes_per_machine / 1e9,
            "iteration_time_s": self.iteration_time_s,
            "remote_write_s": self.remote_write_s,
        }


_SECTIONS = {"cluster": ClusterConfig, "model": ModelConfig, "storage": StorageConfig, "recovery": RecoveryConfig}

# (minimum, strict, maximum) for numeric fields: strict means the value must be > minimum, else >= minimum. The
# maxima are far beyond any real machine or model, and keep every derived size (chunks, events, seconds) bounded.
_BOUNDS = {
    "machines": (1, False, 1_000_000), "gpus_per_machine": (1, False, 1024), "gpu_memory_gb": (1e-3, False, 1e6),
    "gpu_peak_tflops": (1e-3, False, 1e7), "cpu_memory_gb": (1e-3, False, 1e7), "network_gbps": (1e-3, False, 1e6),
    "pcie_gbps": (1e-3, False, 1e6), "machines_per_rack": (0, False, 1_000_000), "parameters": (1, False, 1e15),
    "layers": (1, False, 100_000), "hidden": (1, False, 10_000_000), "seq_len": (1, False, 100_000_000),
    "global_batch_tokens": (1, False, 1e13), "mfu": (1e-4, False, 1), "bytes_per_param": (0.1, False, 1024),
    "iteration_time_s": (0, False, 1e6), "remote_gbps": (1e-6, False, 1e6),
    "strawman_interval_hours": (1e-3, False, 1e6), "gemini_persist_interval_hours": (1e-3, False, 1e6), "restart_s": (0, False, 1e7), "replace_s": (0, False, 1e7),
    "replicas": (1, False, 1000), "h2d_gbps": (0, False, 1e6), "copy_slowdown": (0, False, 0.99),
}


def _check_value(where: str, key: str, value, ftype):
    if ftype is str:
        if not isinstance(value, str) or not value:
            raise UserError(f"{where}: key '{key}' must be a non-empty string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: key '{key}' must be a number, got {value!r}")
    if ftype is int and not float(value).is_integer():
        raise UserError(f"{where}: key '{key}' must be an integer, got {value!r}")
    if not math.isfinite(value):
        raise UserError(f"{where}: key '{key}' must be finite, got {value!r}")
    lo, strict, hi = _BOUNDS.get(key.rsplit(".", 1)[-1], (None, False, None))
    if lo is not None and (value <= lo if strict else value < lo):
        raise UserError(f"{where}: key '{key}' must be {'>' if strict else '>='} {lo:g}, got {value!r}")
    if hi is not None and value > hi:
        raise UserError(f"{where}: key '{key}' must be <= {hi:g}, got {value!r}")
    return int(value) if ftype is int else float(value)


def _build(where: str, section: str, table, cls):
    if not isinstance(table, dict):
        raise UserError(f"{where}: [{section}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            raise UserError(f"{where}: unknown key '{section}.{key}'; valid: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in table:
            ftype = {"int": int, "float": float, "str": str}[f.type]
            kwargs[name] = _check_value(where, f"{section}.{name}", table[name], ftype)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UserError(f"{where}: missing key '{section}.{name}'")
    return cls(**kwargs)


def _with_machine_type(where: str, cluster):
    """The ``[cluster]`` table with the keys its ``machine_type`` fills (gemini_sim/cluster/machines.py) where the
    preset leaves them out."""
    if not isinstance(cluster, dict) or "machine_type" not in cluster:
        return cluster
    from gemini_sim.cluster.machines import MACHINE_TYPES

    name = _check_value(where, "cluster.machine_type", cluster["machine_type"], str)
    if name not in MACHINE_TYPES:
        raise UserError(f"{where}: key 'cluster.machine_type': {unknown_name('machine type', name, MACHINE_TYPES)}")
    return {**MACHINE_TYPES[name].cluster_keys(), **cluster}


def preset_from_dict(data: dict, where: str = "<config>") -> Preset:
    """Build a validated :class:`Preset` from parsed TOML."""
    for key in data:
        if key not in _SECTIONS and key != "name":
            raise UserError(f"{where}: unknown key '{key}'; valid: name, {', '.join(_SECTIONS)}")
    for section in ("cluster", "model", "storage"):
        if section not in data:
            raise UserError(f"{where}: missing table [{section}]")
    data = {**data, "cluster": _with_machine_type(where, data["cluster"])}
    parts = {s: _build(where, s, data.get(s, {}), cls) for s, cls in _SECTIONS.items()}
    name = data.get("name", Path(where).stem)
    preset = Preset(name=str(name), **parts)
    check_consistency(where, preset)
    return preset


def check_consistency(where: str, p: Preset) -> None:
    if p.recovery.replicas > p.cluster.machines:
        raise UserError(f"{where}: key 'recovery.replicas' ({p.recovery.replicas}) exceeds "
                        f"'cluster.machines' ({p.cluster.machines})")
    if p.cluster.machines_per_rack > p.cluster.machines:
        raise UserError(f"{where}: key 'cluster.machines_per_rack' exceeds 'cluster.machines'")
    from gemini_sim.placement import layouts as placement

    if p.recovery.placement != "auto" and p.recovery.placement not in placement.PLACEMENTS:
        raise UserError(f"{where}: key 'recovery.placement' must be 'auto' or one of "
                        f"{', '.join(placement.PLACEMENTS)}, got {p.recovery.placement!r}")
    if p.recovery.placement == "group" and p.cluster.machines % p.recovery.replicas:
        raise UserError(f"{where}: key 'recovery.placement' is 'group' but 'cluster.machines' "
                        f"({p.cluster.machines}) is not a multiple of 'recovery.replicas' ({p.recovery.replicas})")
    need = p.recovery.replicas * p.checkpoint_bytes_per_machine / 1e9
    if need > p.cluster.cpu_memory_gb:
        raise UserError(f"{where}: {p.recovery.replicas} checkpoint replicas need {need:.1f} GB of CPU memory per "
                        f"machine but 'cluster.cpu_memory_gb' is {p.cluster.cpu_memory_gb:g} "
                        f"({need - p.cluster.cpu_memory_gb:.1f} GB missing)")


def preset_names() -> list[str]:
    folder = resources.files("gemini_sim.cluster.presets")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_config(path: str | Path) -> Preset:
    """Read a user's TOML file."""
    return preset_from_dict(load_toml(path, "config"), str(path))


def load_preset(name: str) -> Preset:
    """Read a bundled preset by name (``gemini-paper``, ``opt-175b``, ``llama3-405b``...)."""
    if name not in preset_names():
        raise unknown_name("preset", name, preset_names())
    text = resources.files("gemini_sim.cluster.presets").joinpath(f"{name}.toml").read_text()
    return preset_from_dict(tomllib.loads(text), f"preset {name}")
