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


def name_list(text: str | None, valid, what: str) -> list[str]:
    """A comma-separated list of names from a registry: all of ``valid`` when ``text`` is None; an empty or
    repeated name, or one not in ``valid``, is an error (``--strategies ,`` is a mistake, not "all")."""
    if text is None:
        return list(valid)
    names = [s.strip() for s in text.split(",")]
    for n in names:
        if not n:
            raise UserError(f"empty {what} name in {text!r}; give names like {','.join(list(valid)[:2])}")
        if n not in valid:
            raise unknown_name(what, n, valid)
        if names.count(n) > 1:
            raise UserError(f"{what} {n!r} is named twice in {text!r}")
    return names
