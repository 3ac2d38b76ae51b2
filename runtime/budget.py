"""The host memory a plan needs for its checkpoints, checked at start against what the store's file system has.

Every rank's machine keeps ``keep + 1`` files of its own shard and of every shard it receives from peers (the kept
checkpoints and the one being written; runtime/store.py). Ranks of one host share its ``/dev/shm``, so their needs
add up. :func:`verdict` compares, per host and file system, what the job's ranks need with the free space there
plus what the job already holds there (its files are reused), and says in one line what is short.

A shard's size is exact once the optimizer has state (a resumed job, or one that stepped before it started the
Checkpointer); before a fresh job's first step the optimizer has none yet and torch offers no way to ask what it will
hold, so its size is estimated from the optimizer's kind (:data:`PER_PARAM`: tensors of a parameter's shape it keeps
per parameter); an unknown optimizer counts as two (as Adam), and the line says the figure is an estimate.
"""

from __future__ import annotations

from dataclasses import dataclass



def size(n: int) -> str:
    """Bytes for people: 1.50 GiB, 3.20 MiB, 512 B."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"

# torch's optimizers: tensors of a parameter's shape kept per parameter, given its parameter group's settings
PER_PARAM = {
    "SGD": lambda g: 1 if g.get("momentum") else 0,
    "Adam": lambda g: 3 if g.get("amsgrad") else 2,
    "AdamW": lambda g: 3 if g.get("amsgrad") else 2,
    "RMSprop": lambda g: 1 + bool(g.get("momentum")) + bool(g.get("centered")),
    "Adagrad": lambda g: 1,
    "Adadelta": lambda g: 2,
    "Adamax": lambda g: 2,
    "NAdam": lambda g: 2,
    "RAdam": lambda g: 2,
    "Rprop": lambda g: 2,
    "ASGD": lambda g: 1,
}
UNKNOWN = 2


def optimizer_bytes(optimizer, local) -> tuple[int, bool]:
    """(bytes of state the optimizer will keep for this rank's parameters, whether that is exact by its kind);
    ``local(p)``: a parameter's local shard."""
    rule = PER_PARAM.get(type(optimizer).__name__)
    total = 0
    for g in optimizer.param_groups:
        per = rule(g) if rule else UNKNOWN
        for p in g["params"]:
            t = local(p)
            total += per * t.numel() * t.element_size() + 8  # and a step count, a scalar
    return total, rule is not None


@dataclass(frozen=True)
class Row:
    """What one rank reports: where its machine's store is, the free space there, what the job holds there."""

    host: str
    device: int  # st_dev of the store's file system
    store: str  # its machine's store folder
    shard: int  # bytes of its shard
    free: int  # bytes free in the file system
    held: int  # bytes this job already holds in its machine's store folder
    exact: bool  # the shard's size is known, not estimated


def verdict(rows: list[Row], receives: list[list[int]], files: int) -> str | None:
    """None if every host's file system has room for what its ranks keep, else one line saying what is short where.
    ``receives[r]``: the ranks whose shards rank r keeps besides its own."""
    need: dict[tuple[str, int], int] = {}
    held: dict[tuple[str, int], dict[str, int]] = {}
    for r, row in enumerate(rows):
        key = (row.host, row.device)
        need[key] = need.get(key, 0) + files * (row.shard + sum(rows[s].shard for s in receives[r]))
        held.setdefault(key, {})[row.store] = row.held
    for key, n in sorted(need.items()):
        here = [row for row in rows if (row.host, row.device) == key]
        free, mine = max(row.free for row in here), sum(held[key].values())  # seen at slightly different times
        if n > free + mine:
            how = "" if all(row.exact for row in rows) else ", estimated before the optimizer's first step"
            return (f"the checkpoint store on {key[0]} ({here[0].store.rsplit('/', 2)[0]}) needs {size(n)} for "
                    f"this job's {len(here)} rank(s) ({files} files of each shard kept there{how}) and has "
                    f"{size(free)} free, {size(mine)} more held by this job: free memory there "
                    "(python -m runtime jobs lists what jobs hold; python -m runtime free JOB frees it), keep fewer "
                    "copies, or set GEMINI_STORE_ROOT to a larger file system")
    return None
