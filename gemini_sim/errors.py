"""User-facing errors.

Anything a user can get wrong (a bad config key, a malformed trace line, an unknown strategy name) raises
:class:`UserError`. The CLI turns it into one line on stderr and exit code 2; library callers can catch it.
"""


class UserError(ValueError):
    """A mistake in the user's input. Its message is one line that names what is wrong and where."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def unknown_name(what: str, name: str, valid) -> UserError:
    """The standard error for a name that is not in a registry."""
    return UserError(f"unknown {what} '{name}'; valid: {', '.join(sorted(valid))}")


def read_user_file(path, what: str) -> str:
    """Read a file the user named; a missing or unreadable file is a one-line :class:`UserError`."""
    from pathlib import Path

    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UserError(f"{path}: cannot read {what} ({reason})") from None


def load_user_json(path, what: str):
    """Read and parse a JSON file the user named; errors are one line with the position."""
    import json

    try:
        return json.loads(read_user_file(path, what))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def load_user_toml(path, what: str) -> dict:
    """Read and parse a TOML file the user named; errors are one line."""
    import tomllib

    try:
        return tomllib.loads(read_user_file(path, what))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: invalid TOML: {exc}") from None
