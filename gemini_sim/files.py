"""The one place where files the user names are read and written.

Inputs are regular files (a folder, a device such as ``/dev/zero``, a FIFO or a socket is refused before a byte is
read, so nothing hangs or fills memory), opened without blocking and read with a byte limit, so a file that grows
while it is read cannot run past it. Reading is strict: text is UTF-8 (a byte-order mark is dropped); JSON has no NaN/Infinity, no
number that overflows to infinity, no duplicate keys and at most :data:`MAX_DEPTH` levels of nesting; TOML has no
``nan``/``inf``. Every problem is a one-line :class:`~gemini_sim.errors.UserError` naming the file.

Writing is checked before the work and atomic after it: :func:`output_file` and :func:`output_dir` refuse a path
that cannot be written (an existing folder where a file goes, a file where a folder goes, a device, FIFO or socket
where a file goes, a parent that is a file, no permission) before a command spends minutes computing, and
:func:`write_atomic` / :func:`save_figure` write a temporary name in the same folder and rename it, so a crash or
Ctrl-C leaves the old file or the new one, never half of one. A symbolic link is followed: the file it points to is
replaced, never the link. JSON is written with ``allow_nan=False``: a non-finite number in output is a bug, not a
file.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from pathlib import Path

from gemini_sim.errors import UserError

MAX_DEPTH = 64  # nesting of input JSON; the deepest real file (a plan) has 5 levels
MAX_BYTES = 1 << 30  # any input file; the largest real trace is a few hundred KB


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_bytes(path, what: str, limit: int = MAX_BYTES) -> bytes:
    """The bytes of a file the user named: a regular file (anything else refused before it is read), at most
    ``limit`` bytes; every problem is one line."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # a FIFO does not block
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{path}: is {_kind(st.st_mode)}, not a {what} file")
        if st.st_size > limit:
            raise UserError(f"{path}: {what} file is {st.st_size / 2**20:,.0f} MiB; at most {limit >> 20} MiB")
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # it grew while being read
                raise UserError(f"{path}: {what} file is larger than {limit >> 20} MiB")
        return b"".join(chunks)
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def read_text(path, what: str) -> str:
    """The text of a file the user named (UTF-8, BOM dropped); unreadable, not a regular file, too large or not
    text: one line."""
    try:
        return read_bytes(path, what).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: {what} is not UTF-8 text (byte {exc.start})") from None


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constants(name: str):
    raise ValueError(f"{name} is not allowed")


def _unique_keys(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _too_deep_at(text: str, limit: int) -> int | None:
    """The offset where brackets (outside strings) nest deeper than ``limit``, or None."""
    depth, in_string, escaped = 0, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return i
        elif ch in "]}":
            depth -= 1
    return None


def parse_json(text: str, where: str):
    """Strict JSON (see the module docstring); ``where`` names the source in errors."""
    too_deep = _too_deep_at(text, MAX_DEPTH)
    if too_deep is not None:
        line = text.count("\n", 0, too_deep) + 1
        raise UserError(f"{where}: JSON nested more than {MAX_DEPTH} levels deep (line {line})")
    try:
        return json.loads(text, parse_float=_finite_float, parse_constant=_no_constants,
                          object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except ValueError as exc:  # from the hooks, or an integer with too many digits
        raise UserError(f"{where}: invalid JSON: {exc}") from None


def load_json(path, what: str):
    """Read and parse a strict JSON file the user named."""
    return parse_json(read_text(path, what), str(path))


def load_toml(path, what: str) -> dict:
    """Read and parse a TOML file the user named; ``nan`` and ``inf`` are refused."""
    import tomllib

    text = read_text(path, what)
    too_deep = _too_deep_at(text, MAX_DEPTH)  # tomllib recurses per level: 20,000 would end in a RecursionError
    if too_deep is not None:
        raise UserError(f"{path}: TOML nested more than {MAX_DEPTH} levels deep (line "
                        f"{text.count(chr(10), 0, too_deep) + 1})")
    try:
        return tomllib.loads(text, parse_float=_finite_float)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: invalid TOML: {exc}") from None
    except ValueError as exc:
        raise UserError(f"{path}: invalid TOML: {exc}") from None


def dumps(obj, indent: int | None = 2) -> str:
    """JSON text of ``obj``; a non-finite number raises ValueError (output is strict too)."""
    return json.dumps(obj, indent=indent, allow_nan=False)


# ---------------------------------------------------------------------------------------------------- outputs


def _parent_ready(path: Path, flag: str) -> None:
    parent = path.parent
    for p in (parent, *parent.parents):  # the nearest existing ancestor must be a writable folder
        if p.exists():
            if not p.is_dir():
                raise UserError(f"{flag} {path}: {p} is a file, not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise UserError(f"{flag} {path}: folder {p} is not writable")
            return


def output_file(path, flag: str, suffixes: tuple[str, ...] | None = None) -> Path:
    """Check, before any work, that ``path`` can be written as a file (its missing folders are created later): a
    new name, or a regular file (through a symbolic link, the file it points to). Returns the path to write.

    ``flag`` names the option in errors; ``suffixes`` (like ``(".png", ".pdf")``) are the allowed extensions.
    """
    if str(path).endswith(os.sep):
        raise UserError(f"{flag} {path}: is a folder; give a file name")
    if any(len(part.encode()) > 255 for part in Path(path).parts):
        raise UserError(f"{flag} {str(path)[:60]}...: a name in the path is longer than 255 bytes")
    p = _followed(Path(path), flag)
    if p.exists():
        mode = p.stat().st_mode
        if stat.S_ISDIR(mode):
            raise UserError(f"{flag} {path}: is a folder; give a file name")
        if not stat.S_ISREG(mode):
            raise UserError(f"{flag} {path}: is {_kind(mode)}; give a file name")
    if suffixes is not None and p.suffix.lower() not in suffixes:
        raise UserError(f"{flag} {path}: the file name must end in {', '.join(suffixes)}")
    if p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"{flag} {path}: file is not writable")
    _parent_ready(p, flag)
    return p


def _followed(p: Path, flag: str) -> Path:
    """``p``, or the file its symbolic link points to (a link is followed, never replaced); a link that goes
    nowhere or round in a loop is refused."""
    if not p.is_symlink():
        return p
    try:
        target = p.resolve(strict=False)
    except (OSError, RuntimeError) as exc:
        raise UserError(f"{flag} {p}: a symbolic link that cannot be followed ({exc})") from None
    if not target.exists() and Path("/proc") in target.parents:  # /dev/stdout onto a pipe or a terminal
        raise UserError(f"{flag} {p}: is a pipe or a terminal, not a file")
    return target


def output_dir(path, flag: str) -> Path:
    """Check, before any work, that ``path`` is or can become a writable folder."""
    p = _followed(Path(path), flag)
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{flag} {path}: is a file, not a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {path}: folder is not writable")
        return p
    _parent_ready(p, flag)
    return p


def write_atomic(path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename (through a symbolic
    link: to the file it points to, the link kept)."""
    p = Path(path)
    if p.is_symlink():
        p = p.resolve(strict=False)
    if p.exists() and not p.is_file():  # checked before the work too (output_file); a device is never replaced
        raise UserError(f"{path}: is {_kind(p.stat().st_mode)}, not a file to write")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def write_json(path, obj) -> Path:
    return write_atomic(path, dumps(obj) + "\n")


def save_figure(fig, path, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically; the format comes from the file's extension."""
    import io

    p = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=p.suffix.lstrip(".").lower() or "png", dpi=dpi)
    return write_atomic(p, buf.getvalue())


FIGURE_SUFFIXES = (".png", ".pdf", ".svg")


def write_reporting(write, path, written: list) -> None:
    """``write(path)``, one of several outputs: if it fails, the one-line error also says what was already written
    (a multi-trace run that stops part-way leaves complete files only, and says which)."""
    try:
        write(path)
    except OSError as exc:
        done = f"; already wrote {', '.join(map(str, written))}" if written else "; nothing was written"
        raise UserError(f"cannot write {path} ({exc.strerror or exc}){done}") from None
    written.append(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
