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
