"""Failure traces: the CSV format, its strict loader, and the in-memory :class:`Trace`.

Format (documented for users in ``traces/README.md``)::

    # duration_hours: 2608        optional metadata lines, '# key: value', before the header
    # machines: 48
    time_hours,kind,machines,note
    232.876,hardware,1,"GPU crashed ..."

``time_hours`` is hours since the job started (non-decreasing), ``kind`` is one of :data:`KINDS`, ``machines``
is how many machines the failure took (an integer >= 1), ``note`` is free text. Any error stops the load with
one line naming the file, the line and the field.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gemini_sim.errors import UserError
from gemini_sim.files import read_text

KINDS = ("hardware", "software", "network", "unknown")
COLUMNS = ("time_hours", "kind", "machines", "note")
METADATA = {"duration_hours": float, "machines": int, "source": str, "synthetic": str}
MAX_HOURS = 1e9  # times and durations; a century is 876,600 hours
MAX_MACHINES = 1_000_000  # per failure row and per trace, as for --machines

# Which kinds take the machine's memory with them. A software crash or a network fault kills the job's processes,
# but the machine, and the checkpoints in its CPU memory, are still there; a hardware fault or an unknown cause
# (maintenance, a lost host) means the machine is replaced and its memory is gone. Our modelling choice.
MEMORY_LOST = {"hardware": True, "unknown": True, "software": False, "network": False}


@dataclass(frozen=True)
class FailureEvent:
    time_h: float
    kind: str
    machines: int
    note: str = ""

    @property
    def loses_machines(self) -> bool:
        return MEMORY_LOST[self.kind]


@dataclass(frozen=True)
class Trace:
    name: str
    events: tuple[FailureEvent, ...]
    duration_h: float  # the job's length; replay runs the job from 0 to here
    source_machines: int | None = None  # machines of the run the trace came from, if known
    synthetic: bool = False
    description: str = ""
    metadata: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.events and self.events[-1].time_h > self.duration_h:
            raise UserError(f"trace {self.name}: duration {self.duration_h} h is before the last failure "
                            f"at {self.events[-1].time_h} h")

    @property
    def times_h(self) -> np.ndarray:
        return np.array([e.time_h for e in self.events], dtype=float)

    @property
    def mtbf_h(self) -> float:
        """Mean time between failures of the whole job, estimated as duration / failures."""
        return self.duration_h / len(self.events) if self.events else math.inf

    def kind_counts(self) -> dict[str, int]:
        return {k: sum(e.kind == k for e in self.events) for k in KINDS}

    def to_csv(self) -> str:
        out = io.StringIO()
        out.write(f"# duration_hours: {self.duration_h:.6g}\n")
        if self.source_machines:
            out.write(f"# machines: {self.source_machines}\n")
        if self.synthetic:
            out.write(f"# synthetic: {self.description or 'yes'}\n")
        w = csv.writer(out, lineterminator="\n")
        w.writerow(COLUMNS)
        for e in self.events:
            w.writerow([f"{e.time_h:.6f}", e.kind, e.machines, e.note])
        return out.getvalue()


def _fail(path, line: int, field_name: str, problem: str):
    raise UserError(f"{path}:{line}: field '{field_name}': {problem}")


def _metadata(path, line: int, key: str, text: str):
    kind = METADATA[key]
    if kind is str:
        return text
    try:
        value = kind(text)
    except ValueError:
        _fail(path, line, key, f"bad metadata value {text!r}")
    if kind is float and not (math.isfinite(value) and 0 < value <= MAX_HOURS):
        _fail(path, line, key, f"must be a number > 0 and <= {MAX_HOURS:g}, got {text!r}")
    if kind is int and not 1 <= value <= MAX_MACHINES:
        _fail(path, line, key, f"must be a whole number from 1 to {MAX_MACHINES:,}, got {text!r}")
    return value


def _rows(lines: list[str], path, first_line: int):
    """csv rows; a malformed line (an unclosed quote, a huge field) is a one-line error."""
    reader = csv.reader(lines, strict=True)
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise UserError(f"{path}:{first_line + reader.line_num - 1}: malformed CSV: {exc}") from None


def parse_trace(text: str, path: str = "<trace>") -> Trace:
    """Parse the CSV text of a trace; ``path`` is used in error messages and as the trace's name."""
    lines = text.splitlines()
    meta: dict = {}
    start = 0
    for start, raw in enumerate(lines):
        s = raw.strip()
        if not s:
            continue
        if not s.startswith("#"):
            break
        body = s.lstrip("#").strip()
        if ":" in body:
            key, value = (x.strip() for x in body.split(":", 1))
            if key in METADATA:
                meta[key] = _metadata(path, start + 1, key, value)
    else:
        raise UserError(f"{path}: empty trace (no header line '{','.join(COLUMNS)}')")

    reader = _rows(lines[start:], path, start + 1)
    header = [h.strip() for h in next(reader)]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise UserError(f"{path}:{start + 1}: missing column '{missing[0]}' (header must be {','.join(COLUMNS)})")
    extra = [h for h in header if h not in COLUMNS] + [h for i, h in enumerate(header) if h in header[:i]]
    if extra:
        raise UserError(f"{path}:{start + 1}: unexpected or repeated column {extra[0]!r} (header must be "
                        f"{','.join(COLUMNS)})")
    col = {c: header.index(c) for c in COLUMNS}
    events: list[FailureEvent] = []
    last = 0.0
    for offset, row in enumerate(reader, start=start + 2):
        if not row or all(not x.strip() for x in row) or row[0].lstrip().startswith("#"):
            continue
        if len(row) != len(header):
            _fail(path, offset, header[len(row)] if len(row) < len(header) else "note",
                  f"row has {len(row)} fields, header has {len(header)}"
                  + (" (quote a note that contains commas)" if len(row) > len(header) else ""))
        t_raw, kind, m_raw = row[col["time_hours"]].strip(), row[col["kind"]].strip(), row[col["machines"]].strip()
        try:
            t = float(t_raw)
        except ValueError:
            _fail(path, offset, "time_hours", f"not a number: {t_raw!r}")
        if not (math.isfinite(t) and 0 <= t <= MAX_HOURS):
            _fail(path, offset, "time_hours", f"must be a number from 0 to {MAX_HOURS:g}, got {t_raw!r}")
        if t < last:
            _fail(path, offset, "time_hours", f"time goes backwards ({t_raw} h after {last:g} h)")
        if kind not in KINDS:
            _fail(path, offset, "kind", f"unknown kind {kind!r}; valid: {', '.join(KINDS)}")
        try:
            m = int(m_raw)
        except ValueError:
            _fail(path, offset, "machines", f"not an integer: {m_raw!r}")
        if not 1 <= m <= MAX_MACHINES:
            _fail(path, offset, "machines", f"must be a whole number from 1 to {MAX_MACHINES:,}, got {m_raw!r}")
        last = t
        events.append(FailureEvent(t, kind, m, row[col["note"]].strip()))
    if not events:
        raise UserError(f"{path}: empty trace (header but no failure rows)")
    duration = meta.get("duration_hours", events[-1].time_h)
    if duration < events[-1].time_h:
        _fail(path, 1, "duration_hours", f"{duration:g} h is before the last failure at {events[-1].time_h:g} h")
    return Trace(name=Path(path).stem, events=tuple(events), duration_h=duration,
                 source_machines=meta.get("machines"), synthetic="synthetic" in meta,
                 description=str(meta.get("synthetic", meta.get("source", ""))), metadata=meta)


def load_trace(path: str | Path) -> Trace:
    return parse_trace(read_text(path, "trace"), str(path))
